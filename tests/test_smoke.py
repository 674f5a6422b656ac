import subprocess
import sys

import torch

import layerzero as lz


def test_import_does_not_load_optional_backends():
    code = ("import sys, layerzero; bad=[m for m in sys.modules if m.split('.')[0] in "
            "('flashinfer','liger_kernel','flash_attn','flash_attn_interface','xformers','triton')]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_attention_runs_and_is_cached():
    q = torch.randn(1, 8, 2, 16)
    out = lz.attention(q, q, q)
    assert out.shape == q.shape
    assert lz.explain("attention", q, q, q).cached
