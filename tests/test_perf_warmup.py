"""perf/warmup.py: JIT variants built in parallel worker processes (real processes, each calling the
kernel once with the shape) with a progress bar, then pre-selection in this process.

The JIT library is a STAND-IN (tests/standins/jit_standin.py): its "compiler" sleeps, then waits until
a given number of compiles have started (met only when that many workers run at once), and writes its
on-disk cache. FlashInfer's own variants and AOT packages: tests/test_flashinfer_mapping.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

import pytest
import torch

import layerzero as lz
from layerzero.cli import main as cli
from layerzero.kernel import JitVariant
from layerzero.perf import warmup as W

CPU = torch.device("cpu")
SHAPES = [(8, 64), (8, 96), (8, 128), (16, 64)]  # (16, 64) shares the variant of (8, 64)


@pytest.fixture
def jit_lib(tmp_path, monkeypatch):
    """The stand-in JIT kernel registered, its build cache in a temporary directory."""
    monkeypatch.setenv("LZ_STANDIN_JIT_DIR", str(tmp_path))
    module = importlib.import_module("tests.standins.jit_standin")  # registers on first import
    module.register()
    return module


def weight_like(hidden):
    return torch.ones(hidden)


def test_variants_are_built_in_parallel_worker_processes_with_a_progress_bar(jit_lib, monkeypatch, capfd):
    monkeypatch.setenv("LZ_STANDIN_JIT_BARRIER", "3")  # each compile waits until all three have started
    x = torch.randn(8, 64)
    assert lz.which("rms_norm", x, weight_like(64)) == "torch.rms_norm"  # not built yet: the JIT gate
    report = lz.warmup("rms_norm", SHAPES, [torch.float32], "cpu", jobs=3)
    assert report.processes == 3
    assert sorted(v.label for v in report.variants) == ["standin rms_float32_128", "standin rms_float32_64",
                                                        "standin rms_float32_96"]
    assert all(v.ok for v in report.variants), report.variants
    built = [jit_lib.built(f"rms_float32_{h}") for h in (64, 96, 128)]
    assert all(b["barrier_met"] for b in built), built  # all three compiles ran at the same time
    pids = {b["pid"] for b in built}
    assert len(pids) == 3 and os.getpid() not in pids  # three worker processes, not this one
    assert {v.pid for v in report.variants} == pids
    spans = [(v.started, v.finished) for v in report.variants]
    assert max(s for s, _ in spans) < min(f for _, f in spans)  # the three kernel calls overlapped in time
    # phase 2: this process selects the built kernel and its first call compiles nothing
    assert [e.kernel for e in report.entries] == ["standin_jit.rms_norm"] * 4
    assert all(e.first_ms < 1e3 * jit_lib.COMPILE_S for e in report.entries)
    assert lz.which("rms_norm", x, weight_like(64)) == "standin_jit.rms_norm"
    err = capfd.readouterr().err
    assert "building 3 JIT variant(s) in 3 worker process(es) at once" in err
    for k in (1, 2, 3):
        assert f"] {k}/3 " in err
    assert "standin rms_float32_96: " in err and " ok" in err and "] 3/3" in err and "done" in err
    assert "JIT variants built in parallel: 3" in str(report)


def test_serial_warmup_builds_in_this_process(jit_lib):
    report = lz.warmup("rms_norm", [(8, 64)], [torch.float32], "cpu", parallel=False)
    assert report.variants == () and report.processes == 0
    first = report.entries[0]
    assert first.kernel == "torch.rms_norm"  # nothing built the variant before selection: the gate held
    assert jit_lib.built("rms_float32_64") is None


def test_a_variant_that_fails_in_its_worker_is_reported_and_stays_unbuilt(jit_lib, monkeypatch, capsys):
    monkeypatch.setenv("LZ_STANDIN_JIT_FAIL", "rms_float32_96")
    report = lz.warmup("rms_norm", [(8, 64), (8, 96)], [torch.float32], "cpu", progress=False)
    by_label = {v.label: v for v in report.variants}
    assert by_label["standin rms_float32_64"].ok
    failed = by_label["standin rms_float32_96"]
    assert not failed.ok and failed.error.startswith("kernel: RuntimeError: standin: rms_float32_96 failed")
    assert "out of registers" in str(report)
    assert [e.kernel for e in report.entries] == ["standin_jit.rms_norm", "torch.rms_norm"]  # the call answers
    assert cli(["warmup", "rms_norm", "--shape", "8x96", "--dtype", "float32", "--device", "cpu", "--quiet"]) == 1


def test_worker_processes_are_sized_to_cores_and_free_memory(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(W, "_free_ram", lambda: 9 << 30)  # room for two compilers of NVCC_BYTES
    assert W.compile_slots() == (min(cores, 2), cores, 9 << 30)
    monkeypatch.setattr(W, "_free_ram", lambda: 1 << 30)
    assert W.compile_slots()[0] == 1  # always at least one
    monkeypatch.setattr(W, "_free_ram", lambda: 1 << 50)
    assert W.compile_slots()[0] == cores


def test_cli_warmup(jit_lib, capsys):
    assert cli(["warmup", "rms_norm", "--shape", "8x64", "--shape", "8x96", "--dtype", "float32", "--device", "cpu",
                "--quiet", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(v["label"] for v in out["variants"]) == ["standin rms_float32_64", "standin rms_float32_96"]
    assert all(v["ok"] for v in out["variants"])
    assert [e["kernel"] for e in out["entries"]] == ["standin_jit.rms_norm"] * 2


def test_what_is_built_is_what_selection_will_run(jit_lib):
    lz.register_kernel(dataclasses.replace(jit_lib.SPEC, priority=1))
    problems = [((8, 64), torch.float32, {}), ((16, 64), torch.float32, {})]
    assert W.jit_tasks("rms_norm", problems, CPU) == []  # torch.rms_norm outranks it even once built
    lz.lock("norm.rms", "standin_jit")
    (task,) = W.jit_tasks("rms_norm", problems, CPU)  # one variant for both shapes
    assert (task.kernel, task.label, task.module) == ("standin_jit.rms_norm", "standin rms_float32_64",
                                                      "tests.standins.jit_standin")
    assert json.loads(task.payload())["shape"] == [8, 64]


def test_a_shape_may_carry_its_own_keyword_arguments(jit_lib):
    report = lz.warmup("rms_norm", [(8, 64), ((8, 96), {"eps": 1e-3})], [torch.float32], "cpu", parallel=False)
    assert [e.shape for e in report.entries] == [(8, 64), (8, 96)]
    x = torch.randn(8, 96)
    w = (1.0 + 0.1 * torch.randn(96)).to(torch.float32)
    assert lz.explain("rms_norm", x, w, eps=1e-3).cached


def test_a_lock_ranks_among_the_kernels_it_names(jit_lib):
    """Two JIT kernels of one backend under a backend lock: the variant built is the better one's."""
    worse = dataclasses.replace(jit_lib.SPEC, id="standin_jit.rms_norm_slow", priority=5,
                                jit_variant=lambda ctx: JitVariant("slow", "standin slow"))
    lz.register_kernel(worse)  # considered first
    lz.register_kernel(dataclasses.replace(jit_lib.SPEC, priority=10))
    lz.lock("norm.rms", "standin_jit")
    (task,) = W.jit_tasks("rms_norm", [((8, 64), torch.float32, {})], CPU)
    assert task.kernel == "standin_jit.rms_norm"
