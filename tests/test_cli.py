"""The `layerzero` command."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch

import layerzero as lz
from layerzero import cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_doctor_table_and_json(capsys):
    code, out, _ = run(capsys, "doctor", "--no-smoke")
    assert code == 0 and out.startswith("LayerZero doctor: READY")
    assert "backends:" in out and "reference" in out
    code, out, _ = run(capsys, "doctor", "--json", "--no-smoke")
    data = json.loads(out)
    assert code == 0 and data["ready"] is True and {b["name"] for b in data["backends"]} >= {"torch", "reference"}


def test_list_filters_by_glob(capsys):
    code, out, _ = run(capsys, "list", "norm.*")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["kernel", "available", "on", "priority", "ops"]
    assert any(line.split()[:2] == ["torch.rms_norm", "cpu"] for line in lines[1:])
    assert not any("attention" in line for line in lines)
    code, out, _ = run(capsys, "list", "torch.*", "--json")
    assert all(k["id"].startswith("torch.") for k in json.loads(out))


def test_backends_lists_availability_and_reasons(capsys):
    code, out, _ = run(capsys, "backends", "--json")
    rows = {b["name"]: b for b in json.loads(out)}
    assert code == 0 and rows["torch"]["available"] and rows["torch"]["version"]
    assert all(b["reason"] for b in rows.values() if not b["available"])


def test_explain_attention_and_rms_norm(capsys, monkeypatch):
    monkeypatch.setenv("LAYERZERO_PERFDB", "off")  # not the user's cache: priorities decide
    lz.reset()
    code, out, _ = run(capsys, "explain", "attention", "--shape", "1x64x64x8x2x64x1", "--dtype", "float32",
                       "--device", "cpu")
    assert code == 0 and out.startswith("op attention.causal: selected ")
    assert "PLATFORM_MISMATCH" in out  # the CUDA kernels say why they cannot run here
    code, out, _ = run(capsys, "explain", "rms_norm", "--shape", "4x32", "--dtype", "float32", "--device", "cpu",
                       "--json")
    data = json.loads(out)
    assert data["op"] == "norm.rms" and data["selected"] == "torch.rms_norm"
    assert (data["regime"], data["decided_by"]) == ("eager", "priority")  # no PerfDB rows: priorities decided
    assert {c["kernel"] for c in data["candidates"]} >= {"torch.rms_norm", "reference.rms_norm"}


def test_errors_exit_2_with_a_message(capsys):
    code, _, err = run(capsys, "explain", "rms_nrom", "--shape", "4x32", "--device", "cpu")
    assert code == 2 and "did you mean 'rms_norm'" in err
    code, _, err = run(capsys, "explain", "rms_norm", "--shape", "4x32x9", "--device", "cpu")
    assert code == 2 and "shape: expected 2 non-negative ints (rows, hidden)" in err
    code, _, err = run(capsys, "explain", "rms_norm", "--shape", "4x32", "--dtype", "float17", "--device", "cpu")
    assert code == 2 and "--dtype: expected a torch dtype name" in err
    code, out, _ = run(capsys)
    assert code == 2 and "doctor" in out


def one_line_error(capsys, code_wanted: int, *argv: str) -> str:
    """Run the CLI expecting an error: exit code `code_wanted`, nothing on stdout, one line on stderr."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == code_wanted and out == "", (code, out, err)
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_a_cuda_device_on_a_cpu_only_torch_is_one_line_with_the_fix(capsys):
    err = one_line_error(capsys, 2, "explain", "attention", "--shape", "1x512x512x32x8x128x1", "--dtype", "float16",
                         "--device", "cuda")
    assert err.startswith("layerzero explain: error: --device: expected a device of this machine (cpu), got 'cuda'")
    assert "pass --device cpu" in err


@pytest.mark.parametrize("argv, message", [
    (("explain",), "layerzero explain: error: the following arguments are required: op, --shape "
                   "(see `layerzero explain --help`)"),
    (("nosuch",), "layerzero: error: argument COMMAND: invalid choice: 'nosuch'"),
    (("explain", "rms_norm", "--shape", "4x32", "--device", "gpu"), "--device: expected a device such as cpu, cuda"),
    (("explain", "rms_norm", "--shape", "4xx", "--device", "cpu"), "layerzero explain: error: "),
    (("solve", "rms_norm", "--dim", "rows=a:b", "--out", "x.py"), "--dim: expected NAME=LO:HI or NAME=V1,V2"),
    (("list", "--json", "--bogus"), "unrecognized arguments: --bogus"),
])
def test_every_error_is_one_line_exit_2(capsys, argv, message):
    assert message in one_line_error(capsys, 2, *argv)


def test_an_unexpected_exception_is_one_line_and_traceback_shows_it(capsys, monkeypatch):
    def add_boom(sub):
        cli.add_command(sub, "boom", "raise", lambda args: [][1])

    monkeypatch.setattr(sys.modules[__name__], "add_boom", add_boom, raising=False)
    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, f"{__name__}:add_boom"])
    err = one_line_error(capsys, 2, "boom")
    assert err.startswith("layerzero boom: error: IndexError: list index out of range")
    with pytest.raises(IndexError):
        cli.main(["--traceback", "boom"])


@pytest.mark.parametrize("dtype", ["fp32", "float32", "torch.float32", "float"])
def test_dtype_accepts_the_names_policy_conditions_accept(capsys, dtype):
    code, out, _ = run(capsys, "explain", "rms_norm", "--shape", "4x32", "--dtype", dtype, "--device", "cpu", "--json")
    assert code == 0 and "dtype" not in json.loads(out)["context"]  # float32 is the context's default
    assert cli.parse_dtype("bf16") is torch.bfloat16 and cli.parse_dtype("fp16") is torch.float16


def test_list_says_on_which_device_a_kernel_is_available(capsys):
    code, out, _ = run(capsys, "list", "torch.sdpa_*", "--json")
    rows = {k["id"]: k for k in json.loads(out)}
    assert code == 0 and rows["torch.sdpa_cudnn"]["platforms"] == ["cuda"]
    assert rows["torch.sdpa_cudnn"]["devices"] == (["cuda"] if torch.cuda.is_available() else [])
    assert "cpu" in rows["torch.sdpa_flash_cpu"]["devices"]
    code, out, _ = run(capsys, "list", "torch.sdpa_cudnn")
    if not torch.cuda.is_available():
        assert "no (runs on cuda)" in out.splitlines()[1]


@pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is not None, reason="Liger is installed here")
def test_canary_of_a_backend_that_is_not_installed_says_so_exit_1(capsys):
    err = one_line_error(capsys, 1, "canary", "liger")
    assert err == ("layerzero canary: backend liger is not installed here (python module 'liger_kernel' not "
                   "found); nothing to check: install liger-kernel first\n")
    with pytest.raises(lz.BackendNotAvailableError, match="liger is not installed"):
        lz.canary("liger", "cpu")


def test_canary_with_nothing_to_check_on_this_device_is_not_a_pass(capsys):
    lz.register_backend(lz.Backend("gpuonly", (lz.KernelSpec(id="gpuonly.rms", ops="norm.rms", impl=lambda x, w, e: x,
                                                             platforms="cuda"),)))
    code, out, err = run(capsys, "canary", "gpuonly", "--device", "cpu")
    assert code == 1 and out.startswith("canary gpuonly on cpu: 0 claims")
    assert "no claim of gpuonly can be checked on cpu (its kernels run on cuda" in err


def test_version_and_python_dash_m_are_the_layerzero_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    out, _ = capsys.readouterr()
    assert exit_.value.code == 0 and out == f"layerzero {lz.__version__}\n"
    via_m = subprocess.run([sys.executable, "-m", "layerzero", "--version"], capture_output=True, text=True, timeout=120)
    assert via_m.returncode == 0 and via_m.stdout == out
    via_m = subprocess.run([sys.executable, "-m", "layerzero", "list", "reference.rms*"], capture_output=True,
                           text=True, timeout=120)
    assert via_m.returncode == 0 and via_m.stdout.splitlines()[1].split()[:2] == ["reference.rms_norm", "cpu"]
    via_m = subprocess.run([sys.executable, "-m", "layerzero", "explain"], capture_output=True, text=True, timeout=120)
    assert via_m.returncode == 2 and via_m.stderr.startswith("layerzero explain: error:")


def test_a_broken_subcommand_module_does_not_break_the_cli(capsys, monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, "layerzero.no_such_module:add_cli"])
    code, out, err = run(capsys, "list", "torch.rms*")
    assert code == 0 and "torch.rms_norm" in out
    assert "subcommand layerzero.no_such_module:add_cli unavailable" in err


def test_adding_a_subcommand_is_one_function(capsys, monkeypatch):
    def add_hello(sub):
        p = cli.add_command(sub, "hello", "say hello", lambda args: print("hello", args.name) or 0)
        p.add_argument("name")

    monkeypatch.setattr(sys.modules[__name__], "add_hello", add_hello, raising=False)
    monkeypatch.setattr(cli, "SUBCOMMANDS", [*cli.SUBCOMMANDS, f"{__name__}:add_hello"])
    code, out, _ = run(capsys, "hello", "world")
    assert code == 0 and out == "hello world\n"


@pytest.mark.skipif(shutil.which("layerzero") is None and not (
        __import__("pathlib").Path(sys.executable).parent / "layerzero").exists(), reason="script not installed")
def test_installed_script_runs():
    from pathlib import Path

    script = shutil.which("layerzero") or str(Path(sys.executable).parent / "layerzero")
    out = subprocess.run([script, "list", "reference.*"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "reference.rms_norm" in out.stdout
