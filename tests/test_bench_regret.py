"""benchmarks/regret.py on CPU: the --quick run (tiny shapes, a few seconds), its files and its
plain-torch baselines (what a user writes without LayerZero) checked against the reference."""

from __future__ import annotations

import datetime
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from layerzero.perf import workloads
from layerzero.perf.bench import compare

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "regret.py"


@pytest.fixture(scope="module")
def regret():
    spec = importlib.util.spec_from_file_location("regret_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_on_cpu_prints_a_table_last_and_writes_markdown_and_json(regret, tmp_path, capsys):
    out = tmp_path / "regret.md"
    assert regret.main(["--quick", "--kernels", "torch.*", "--repeats", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-3].startswith("| regime | shapes | before geomean") and printed[-1].startswith("| eager | ")
    assert out.read_text().rstrip().splitlines() == printed
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["device"] == "CPU" and saved["date"] == str(datetime.date.today()) and saved["quick"] is True
    rows = {r["label"]: r for r in saved["rows"]}
    assert {"attention.causal 1x16x80x4x2x32x1", "attention.sliding_window 1x48x48x4x2x32x1x16x0",
            "attention.causal 2x1x96x4x2x32x1", "norm.rms 1x256", "activation.swiglu 8x256"} <= set(rows)
    for label, row in rows.items():
        assert set(row["regimes"]) == {"eager"}, label  # no CUDA graphs on CPU
        m = row["regimes"]["eager"]
        assert m["before"] in m["times_us"] and m["after"] in m["times_us"] and m["after_ratio"] >= 1.0
        assert m["lz_us"] > 0 and m["plain_us"] > 0, label
        assert row["notes"] == [], label  # plain torch and the lz call matched the reference
    assert "## eager" in out.read_text() and "## graph" not in out.read_text()
    joined = tmp_path / "joined.md"
    assert regret.main(["--render", str(out.with_suffix(".json")), str(out.with_suffix(".json")),
                        "--out", str(joined)]) == 0
    assert f"| eager | {2 * len(rows)} |" in joined.read_text()
    assert len(json.loads(joined.with_suffix(".json").read_text())["rows"]) == 2 * len(rows)


@pytest.mark.parametrize(("name", "shape"), [
    ("attention", (2, 24, 24, 4, 2, 16, 1)),            # Sq == Sk: torch's is_causal
    ("attention", (1, 8, 40, 4, 2, 16, 1)),             # chunked prefill: bottom-right mask
    ("attention", (3, 1, 40, 4, 1, 16, 1)),             # decode: no mask
    ("attention", (1, 24, 24, 4, 4, 16, 0)),            # non-causal MHA
    ("attention_ext", (1, 32, 32, 4, 2, 16, 1, 8, 0)),   # causal sliding window
    ("attention_ext", (1, 32, 32, 4, 2, 16, 0, 6, 0)),   # symmetric window
    ("attention_ext", (1, 32, 32, 4, 2, 16, 1, 0, 5)),   # softcap: transformers' eager attention
    ("attention_ext", (2, 1, 40, 4, 2, 16, 1, 8, 5)),    # softcap + window, decode
    ("rms_norm", (5, 48)), ("layer_norm", (5, 48)), ("rope_qk", (2, 6, 4, 2, 16)), ("swiglu", (5, 48)),
])
def test_plain_torch_baselines_compute_what_layerzero_computes(regret, name, shape):
    args = workloads.workload(name).make(shape, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(0))
    reference, cut = workloads.reference_output(name, args)
    ok, err = compare(cut(regret.PLAIN[name](args)(*args)), reference, torch.float32)
    assert ok, err
