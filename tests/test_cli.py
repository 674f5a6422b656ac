"""The `layerzero` command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

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
    assert lines[0].split() == ["kernel", "available", "priority", "ops"]
    assert any(line.split()[0] == "torch.rms_norm" for line in lines[1:])
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
