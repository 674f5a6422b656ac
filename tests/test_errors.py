"""Every error message of the public API is read by a test: it names the argument, the expected
value and the actual one, and is a LayerZeroError subclass."""

from __future__ import annotations

import pytest
import torch

import layerzero as lz
from layerzero.errors import (
    InvalidInputError,
    KernelExecutionError,
    LayerZeroError,
    NoKernelFoundError,
    UnknownNameError,
)
from tests.test_attention import reference_attention


def bshd(b=2, s=5, h=4, d=64, dtype=torch.float32, device="cpu"):
    return torch.randn(b, s, h, d, dtype=dtype, device=device)


def raises(call, error=InvalidInputError):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, LayerZeroError)
    return info.value


# (call, exact message): q/k/v default to BSHD (2, 5, 4, 64) unless the case changes them.
Q = bshd()
ATTENTION_ERRORS = {
    "q_rank": (lambda: lz.attention(Q[0], Q, Q),
               "q: expected a 4-D tensor (B, S, H, D), got 3-D shape (5, 4, 64)"),
    "k_rank_bhsd": (lambda: lz.attention(Q, Q[..., None], Q, layout="BHSD"),
                    "k: expected a 4-D tensor (B, H, S, D), got 5-D shape (2, 5, 4, 64, 1)"),
    "batch": (lambda: lz.attention(Q, bshd(b=3), bshd(b=3)), "k: expected batch 2 (as q), got 3"),
    "v_batch": (lambda: lz.attention(Q, Q, bshd(b=1)), "v: expected batch 2 (as q), got 1"),
    "head_dim": (lambda: lz.attention(Q, bshd(d=128), bshd(d=128)), "k: expected head_dim 64 (as q), got 128"),
    "v_seq": (lambda: lz.attention(Q, bshd(s=7), bshd(s=6)), "v: expected seq_len 7 (as k) in BSHD, got 6"),
    "dtype": (lambda: lz.attention(Q, Q.half(), Q.half()), "k: expected dtype torch.float32 (as q), got torch.float16"),
    "v_dtype": (lambda: lz.attention(Q, Q, Q.double()), "v: expected dtype torch.float32 (as q), got torch.float64"),
    "device": (lambda: lz.attention(Q, Q.to("meta"), Q), "k: expected device cpu (as q), got meta"),
    "int_q": (lambda: lz.attention(Q.long(), Q.long(), Q.long()),
              "q: expected a floating-point dtype, got torch.int64"),
    "gqa": (lambda: lz.attention(bshd(s=7, h=6), Q, Q),
            "k: expected a head count dividing q's 6 heads (GQA/MQA) in BSHD, got 4"),
    "v_heads": (lambda: lz.attention(bshd(h=8), bshd(h=4), bshd(h=2)), "v: expected 4 heads (as k) in BSHD, got 2"),
    "not_tensor": (lambda: lz.attention(Q.tolist(), Q, Q), "q: expected a torch.Tensor, got list"),
    "mask_with_causal": (lambda: lz.attention(Q, Q, Q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True),
                         "attn_mask: expected None when is_causal=True (give a mask or is_causal, not both), "
                         "got a (5, 5) mask"),
    "mask_shape": (lambda: lz.attention(Q, Q, Q, attn_mask=torch.ones(2, 4, 5, 6, dtype=torch.bool)),
                   "attn_mask: expected a shape broadcastable to (B, Hq, Sq, Sk) = (2, 4, 5, 5), got (2, 4, 5, 6)"),
    "mask_rank": (lambda: lz.attention(Q, Q, Q, attn_mask=torch.ones(5, dtype=torch.bool)),
                  "attn_mask: expected a shape broadcastable to (B, Hq, Sq, Sk) = (2, 4, 5, 5), got (5,)"),
    "mask_dtype": (lambda: lz.attention(Q, Q, Q, attn_mask=torch.zeros(5, 5, dtype=torch.float16)),
                   "attn_mask: expected dtype torch.bool or torch.float32 (additive, as q), got torch.float16"),
    "mask_device": (lambda: lz.attention(Q, Q, Q, attn_mask=torch.zeros(5, 5, device="meta")),
                    "attn_mask: expected device cpu (as q), got meta"),
    "dropout": (lambda: lz.attention(Q, Q, Q, dropout_p=1.5), "dropout_p: expected a probability in [0, 1), got 1.5"),
    "window": (lambda: lz.attention(Q, Q, Q, window_size=(3,)),
               "window_size: expected (left, right) ints >= -1 (-1 = unbounded), got (3,)"),
    "softcap": (lambda: lz.attention(Q, Q, Q, softcap=-1.0), "softcap: expected a float >= 0 (0 = off), got -1.0"),
    "scale": (lambda: lz.attention(Q, Q, Q, scale="0.1"), "scale: expected None or a float, got str"),
    "alibi_shape": (lambda: lz.attention(Q, Q, Q, alibi_slopes=torch.ones(3)),
                    "alibi_slopes: expected shape (4,) or (2, 4), got (3,)"),
    "alibi_dtype": (lambda: lz.attention(Q, Q, Q, alibi_slopes=torch.ones(4, dtype=torch.float64)),
                    "alibi_slopes: expected dtype torch.float32, got torch.float64"),
}


@pytest.mark.parametrize("case", list(ATTENTION_ERRORS))
def test_attention_error_message(case):
    call, message = ATTENTION_ERRORS[case]
    error = raises(call)
    assert str(error) == message
    assert message.startswith(f"{error.argument}: expected {error.expected}, got ")
    assert isinstance(error, ValueError)


def test_layout_hint_when_the_shapes_fit_the_other_layout():
    """BHSD tensors passed as BSHD: the error says which layout would fit; nothing is guessed."""
    q, k = torch.randn(2, 8, 5, 64), torch.randn(2, 2, 7, 64)  # BHSD: Hq 8, Hkv 2, Sq 5, Sk 7
    error = raises(lambda: lz.attention(q, k, k))
    assert str(error) == ("k: expected a head count dividing q's 5 heads (GQA/MQA) in BSHD, got 7; "
                          "the shapes fit layout='BHSD'; pass layout='BHSD' if that is what they are")
    error = raises(lambda: lz.attention(torch.randn(2, 5, 8, 64), torch.randn(2, 7, 2, 64), torch.randn(2, 7, 2, 64),
                                        layout="BHSD"))
    assert "the shapes fit layout='BSHD'; pass layout='BSHD'" in str(error)


def test_ambiguous_shapes_follow_the_given_layout():
    """Shapes valid in both layouts are read in the layout given (BSHD by default), never guessed."""
    q, k, v = (torch.randn(2, 4, 4, 64) for _ in range(3))
    out = lz.attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, is_causal=True), rtol=1e-4, atol=1e-5)
    bhsd = reference_attention(q, k, v, layout="BHSD", is_causal=True)
    assert not torch.allclose(out.double(), bhsd, atol=1e-3)


def test_unknown_layout_lists_close_matches():
    error = raises(lambda: lz.attention(Q, Q, Q, layout="BHDS"), UnknownNameError)
    assert str(error) == "unknown layout 'BHDS'; did you mean 'BSHD', 'BHSD'? (known: BHSD, BSHD)"
    assert error.close_matches == ["BSHD", "BHSD"]
    error = raises(lambda: lz.attention(Q, Q, Q, layout="NHD"), UnknownNameError)
    assert str(error).startswith("unknown layout 'NHD'") and "(known: BHSD, BSHD)" in str(error)


def test_unknown_kernel_id_lists_close_matches():
    error = raises(lambda: lz.validate("torch.sdpa_flsh", "attention", Q, Q, Q), UnknownNameError)
    assert str(error).startswith("unknown kernel 'torch.sdpa_flsh'; did you mean 'torch.sdpa_flash'")
    assert "torch.sdpa_flash" in error.close_matches
    assert isinstance(error, KeyError) and not str(error).startswith('"'), "KeyError must not quote the message"
    error = raises(lambda: lz.validate("nothing_like_it", "attention", Q, Q, Q), UnknownNameError)
    assert "did you mean" not in str(error) and "(known: " in str(error)


def test_unknown_operation_lists_close_matches():
    error = raises(lambda: lz.explain("attenton", Q, Q, Q), UnknownNameError)
    assert str(error).startswith("unknown operation 'attenton'; did you mean 'attention'")


def test_unknown_backend_lists_close_matches():
    error = raises(lambda: lz.disabled("torhc"), UnknownNameError)
    assert str(error).startswith("unknown backend 'torhc'; did you mean 'torch'")


def test_register_kernel_id_without_backend():
    error = raises(lambda: lz.register_kernel(id="nodot", ops=("norm.rms",), impl=print), LayerZeroError)
    assert "'nodot'" in str(error) and "backend.name" in str(error)


def test_no_kernel_found_in_strict_mode_lists_every_candidate():
    """strict mode forbids the reference fallback; the error carries the report of every candidate."""
    x = torch.randn(2, 8)
    lz.configure(strict_mode=True)
    with lz.disabled():
        error = raises(lambda: lz.rms_norm(x), NoKernelFoundError)
    text = str(error)
    assert text.startswith("strict mode: only the reference can run norm.rms")
    assert "torch.rms_norm" in text and "BACKEND_DISABLED" in text
    assert error.report is not None and error.report.rejection_reasons


def test_kernel_execution_error_names_the_kernel():
    error = KernelExecutionError("mine.rms", RuntimeError("CUDA error: illegal memory access"))
    assert str(error) == "kernel mine.rms failed: RuntimeError: CUDA error: illegal memory access"
    assert error.kernel_id == "mine.rms" and isinstance(error.error, RuntimeError)
