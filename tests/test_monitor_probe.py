"""monitor/probe.py: a backend's kernels compete only after one tiny call of each of its kernel families
ran on the device and matched the reference; a library that imports but cannot run is BACKEND_BROKEN
(with its own error text) and no user call ever reaches it.

The libraries are STAND-INS (tests/standins/): what is tested is LayerZero's probing of them. The
xformers backend's declaration (its kernel and probe) is moved to the CPU here so that the probe can
really run on this machine; the IPEX stand-in runs on the CPU as declared.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import subprocess
import sys
import time

import pytest
import torch

import layerzero as lz
from layerzero.backends import ipex
from layerzero.backends import reference as R
from layerzero.backends import xformers as xf
from layerzero.cli import main as cli
from layerzero.context import SelectionContext
from layerzero.monitor.probe import CACHE_ENV, cache_key
from layerzero.ops.attention import ATTENTION
from layerzero.reasons import Reason
from layerzero.state import runtime
from tests.standins import attention_libs as standin
from tests.standins import ipex_standin

from .conftest import tolerance

CPU = torch.device("cpu")
AVX2 = "avx2" in SelectionContext.device_fields(CPU)["isa"]


@pytest.fixture
def cpu_xformers(monkeypatch):
    """install(modules) -> the xformers backend with its kernel declared for the CPU (priority 99: it
    wins whenever it is available) and `modules` as the library."""

    def install(modules: dict) -> lz.Backend:
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        standin.CALLS.clear()
        spec = dataclasses.replace(xf.BACKEND.kernels[0], platforms=frozenset({"cpu"}), priority=99)
        lz.register_backend(dataclasses.replace(xf.BACKEND, kernels=(spec,)))
        return runtime.registry.backend("xformers")

    return install


def xformers_calls() -> int:
    return sum(1 for name, _ in standin.CALLS if name == "xformers.ops.memory_efficient_attention")


def qkv(seq: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, seq, 4, 32, generator=g) for _ in range(3))


def ref_attention(q, k, v, causal):
    t = lambda x: x.transpose(1, 2).double()  # noqa: E731
    return R.attention(t(q), t(k), t(v), None, causal, 0.0, None).transpose(1, 2)


# ----------------------------------------------------------------------------- broken libraries

@pytest.mark.parametrize("mode,text", [("raises", "No operator found"), ("wrong", "differs from the reference")])
def test_an_xformers_that_imports_but_cannot_run_is_broken_and_never_selected(cpu_xformers, mode, text, capsys):
    backend = cpu_xformers(standin.make_broken_xformers(mode))
    assert backend.availability[0]  # installed: the import-level check cannot tell
    q, k, v = qkv()
    out = lz.attention(q, k, v, is_causal=True)  # no user call fails
    torch.testing.assert_close(out.double(), ref_attention(q, k, v, True), **tolerance(torch.float32))
    assert lz.which("attention", q, k, v, is_causal=True) != "xformers.memory_efficient"
    assert xformers_calls() == 1  # the probe's call; the user's call never reached the library
    assert lz.health().failures == 0
    ok, _, why = backend.availability
    assert not ok and why.reason is Reason.BACKEND_BROKEN and text in why.detail
    assert "xformers.memory_efficient" in why.detail  # which case failed
    report = lz.explain("attention", q, k, v, is_causal=True)
    assert report.rejection_reasons["xformers.memory_efficient"] == [Reason.BACKEND_BROKEN]
    assert text in str(report)
    info = {b.name: b for b in lz.list_backends()}["xformers"]
    assert not info.available and info.reason.startswith("BACKEND_BROKEN") and text in info.reason
    assert cli(["backends"]) == 0
    assert "BACKEND_BROKEN" in capsys.readouterr().out
    doctor = lz.doctor(smoke=False)
    assert any(b.name == "xformers" and b.reason and text in b.reason for b in doctor.backends)
    assert xformers_calls() == 1  # explain, list_backends and doctor reuse the verdict


def test_a_working_library_is_verified_once_then_selected(cpu_xformers):
    cpu_xformers(dict(standin.make_broken_xformers("raises"), **_spec_xformers()))
    q, k, v = qkv()
    out = lz.attention(q, k, v, is_causal=True)
    assert lz.which("attention", q, k, v, is_causal=True) == "xformers.memory_efficient"
    torch.testing.assert_close(out.double(), ref_attention(q, k, v, True), **tolerance(torch.float32))
    result = runtime.probes.results[("xformers", "cpu")]
    assert result.ok and result.verified == ("xformers.memory_efficient",)
    probe_and_call = xformers_calls()
    assert probe_and_call == 2
    lz.attention(*qkv(seq=20), is_causal=False)  # a new key: selection again, no second probe
    assert xformers_calls() == probe_and_call + 1


def _spec_xformers() -> dict:
    """The working stand-in, with __spec__ set so that find_spec sees it installed."""
    import importlib.machinery

    modules = standin.make_xformers()
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return modules


@pytest.fixture
def ipex_lib(monkeypatch):
    """install(module) -> the ipex backend with `module` as intel_extension_for_pytorch; its verdict
    (availability, process-wide) is forgotten before and after."""
    if not AVX2:
        pytest.skip("this CPU has no AVX2: every ipex kernel is rejected before any probe")

    def install(module):
        monkeypatch.setitem(sys.modules, "intel_extension_for_pytorch", module)
        ipex.BACKEND.__dict__.pop("availability", None)
        ipex_standin.CALLS.clear()
        return ipex.BACKEND

    yield install
    ipex.BACKEND.__dict__.pop("availability", None)


def test_ipex_is_probed_on_the_cpu_in_each_of_its_kernel_families(ipex_lib):
    ipex_lib(ipex_standin.make_ipex())
    x = torch.randn(4, 64)
    lz.rms_norm(x, torch.ones(64))  # first consideration of ipex on the CPU: every family is probed
    result = runtime.probes.results[("ipex", "cpu")]
    assert result.ok and set(result.verified) == {"ipex.rms_norm", "ipex.rope", "ipex.varlen"}
    assert {name for name, _ in ipex_standin.CALLS} == {"rms_norm", "rotary_embedding", "varlen_attention"}
    assert "verified on cpu" in {b.name: b for b in lz.list_backends()}["ipex"].probe


def test_an_ipex_computing_wrong_norms_is_broken_and_the_call_still_answers(ipex_lib, monkeypatch):
    module = ipex_standin.make_ipex()
    module.llm.functional.rms_norm = lambda x, w, eps: x * w  # not normalized
    backend = ipex_lib(module)
    q = torch.randn(7, 4, 32)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out = lz.attention_varlen(q, q, q, cu, cu, 4, 4, True)
    ref = R.attention_varlen(q.double(), q.double(), q.double(), cu, cu, 4, 4, True, None, None, 0.0)
    torch.testing.assert_close(out.double(), ref, **tolerance(torch.float32))
    ok, _, why = backend.availability
    assert not ok and why.reason is Reason.BACKEND_BROKEN
    assert why.detail.startswith("ipex.rms_norm: output differs from the reference: max error")
    assert lz.which("attention_varlen", q, q, q, cu, cu, 4, 4, True) == "reference.attention_varlen"
    assert not any(name == "varlen_attention" for name, _ in ipex_standin.CALLS)  # the probe stopped at rms_norm


def test_a_library_raising_system_exit_is_broken_not_fatal(ipex_lib):
    module = ipex_standin.make_ipex()

    def exits(*args):
        raise SystemExit(127)  # IPEX exits the process on a torch version mismatch

    module.llm.functional.rms_norm = exits
    backend = ipex_lib(module)
    lz.rms_norm(torch.randn(3, 64), torch.ones(64))
    assert backend.availability[2].reason is Reason.BACKEND_BROKEN
    assert "SystemExit: 127" in backend.availability[2].detail


# ----------------------------------------------------------------------------- FlashAttention-2 detection

@pytest.fixture
def site(tmp_path, monkeypatch):
    """A directory on sys.path holding files named like installed packages (never imported here)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    runtime.ensure_loaded()
    for backend in ("flash_attn", "flash_attn4"):
        monkeypatch.delitem(runtime.registry.backend(backend).__dict__, "availability", raising=False)
    yield tmp_path
    for backend in ("flash_attn", "flash_attn4"):
        runtime.registry.backend(backend).__dict__.pop("availability", None)


def test_flash_attn_4_alone_does_not_make_flash_attention_2_available(site):
    """flash-attn-4 installs a `flash_attn` package holding only `flash_attn.cute`."""
    (site / "flash_attn" / "cute").mkdir(parents=True)
    (site / "flash_attn" / "__init__.py").write_text("")
    (site / "flash_attn" / "cute" / "__init__.py").write_text("")
    runtime.ensure_loaded()
    fa2, fa4 = runtime.registry.backend("flash_attn"), runtime.registry.backend("flash_attn4")
    assert fa4.availability[0]
    ok, _, why = fa2.availability
    assert not ok and why.reason is Reason.BACKEND_NOT_INSTALLED and "'flash_attn_2_cuda' not found" in why.detail
    assert "flash_attn" not in sys.modules  # found without importing


def test_flash_attention_2_is_found_by_its_extension(site):
    (site / "flash_attn").mkdir()
    (site / "flash_attn" / "__init__.py").write_text("")
    (site / "flash_attn_2_cuda.py").write_text("")
    runtime.ensure_loaded()
    assert runtime.registry.backend("flash_attn").availability[0]
    assert "flash_attn_2_cuda" not in sys.modules


# ----------------------------------------------------------------------------- the disk cache

@pytest.fixture
def versioned(monkeypatch, tmp_path):
    """The stand-in xformers reports version 0.0.35; the probe cache is a temporary file."""
    path = tmp_path / "cache" / "probes.json"
    monkeypatch.setenv(CACHE_ENV, str(path))
    real = importlib.metadata.version
    version = {"xformers": "0.0.35"}
    monkeypatch.setattr(importlib.metadata, "version", lambda d: version[d] if d in version else real(d))
    return path, version


@pytest.mark.parametrize("mode", ["raises", "working"])
def test_verdicts_are_cached_on_disk_and_read_back_in_well_under_50_ms(cpu_xformers, versioned, mode):
    path, _ = versioned
    modules = standin.make_broken_xformers("raises") if mode == "raises" else _spec_xformers()
    backend = cpu_xformers(modules)
    first = runtime.probes.probe(backend, CPU)
    assert xformers_calls() == 1 and not first.cached and first.ok == (mode == "working")
    stored = json.loads(path.read_text())["verdicts"]
    key = cache_key(backend, CPU)
    assert "xformers=0.0.35" in key and f"torch {torch.__version__}" in key and list(stored) == [key]
    lz.reset()  # a new runtime (as a new process would have): verdicts come from the file
    backend = cpu_xformers(modules)
    t0 = time.perf_counter()
    again = runtime.probes.probe(backend, CPU)
    elapsed_ms = (time.perf_counter() - t0) * 1e3
    assert again.cached and again.ok == first.ok and again.detail == first.detail
    assert xformers_calls() == 0  # not run again
    assert elapsed_ms < 50, f"a cached verdict took {elapsed_ms:.1f} ms"
    assert (backend.availability[0]) == (mode == "working")


def test_a_new_library_version_is_probed_again(cpu_xformers, versioned):
    path, version = versioned
    backend = cpu_xformers(_spec_xformers())
    runtime.probes.probe(backend, CPU)
    lz.reset()
    version["xformers"] = "0.0.36"
    backend = cpu_xformers(_spec_xformers())
    assert not runtime.probes.probe(backend, CPU).cached and xformers_calls() == 1
    assert len(json.loads(path.read_text())["verdicts"]) == 2


@pytest.mark.parametrize("where", ["under_a_file", "corrupt"])
def test_an_unusable_cache_never_fails_a_call(cpu_xformers, versioned, monkeypatch, tmp_path, where):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    if where == "under_a_file":
        monkeypatch.setenv(CACHE_ENV, str(blocker / "probes.json"))  # mkdir fails: NotADirectoryError
    else:
        path, _ = versioned
        path.parent.mkdir(parents=True)
        path.write_text("{not json")
    cpu_xformers(_spec_xformers())
    q, k, v = qkv()
    out = lz.attention(q, k, v, is_causal=True)
    assert lz.which("attention", q, k, v, is_causal=True) == "xformers.memory_efficient"
    torch.testing.assert_close(out.double(), ref_attention(q, k, v, True), **tolerance(torch.float32))
    if where == "corrupt":  # replaced by a valid file holding this verdict
        assert len(json.loads(versioned[0].read_text())["verdicts"]) == 1


def test_without_a_version_nothing_is_cached(cpu_xformers, monkeypatch, tmp_path):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "probes.json"))
    backend = cpu_xformers(_spec_xformers())
    assert backend.availability[1] is None and cache_key(backend, CPU) is None
    assert runtime.probes.probe(backend, CPU).ok
    assert not (tmp_path / "probes.json").exists()


# ----------------------------------------------------------------------------- capture and laziness

def test_while_tracing_an_unprobed_backend_is_skipped_then_considered_once_probed(cpu_xformers, monkeypatch):
    """torch.compile tracing on the CPU (CUDA graph capture, the other case, is tests/gpu/test_probe_gpu.py)."""
    cpu_xformers(_spec_xformers())
    q, k, v = qkv()
    ctx = ATTENTION.context(q, k, v, None, True)
    with monkeypatch.context() as m:
        m.setattr(torch.compiler, "is_compiling", lambda: True)  # what dynamo answers while tracing
        report = runtime.engine.evaluate(ctx, ATTENTION.transforms, complete=False)
        assert report.selected_kernel != "xformers.memory_efficient"
        full = runtime.engine.evaluate(ctx, ATTENTION.transforms)
    assert full.rejection_reasons["xformers.memory_efficient"] == [Reason.BACKEND_UNPROBED]
    assert "before capturing" in str(full)
    assert xformers_calls() == 0  # nothing ran while "tracing"
    generation = runtime.generation
    lz.attention(q, k, v, is_causal=True)  # not tracing: probed
    assert runtime.generation > generation  # plans chosen while it was skipped are dropped
    assert runtime.engine.evaluate(ctx, ATTENTION.transforms, complete=False).selected_kernel == \
        "xformers.memory_efficient"


def test_contexts_of_a_device_this_process_lacks_are_not_probed(cpu_xformers):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    backend = cpu_xformers(_spec_xformers())
    ctx = SelectionContext(op="attention.causal", device_type="cuda", sm=90, generation="hopper",
                           dtype=torch.bfloat16, batch=1, seq_len_q=8, seq_len_k=8, num_heads=2, num_kv_heads=2,
                           head_dim=64, head_dim_v=64, layout="BSHD", is_causal=True)
    assert runtime.probes.rejection(backend, ctx) is None
    assert runtime.probes.results == {} and xformers_calls() == 0


def test_import_layerzero_runs_no_probe_and_imports_no_backend_library():
    code = ("import sys, layerzero\n"
            "from layerzero.state import runtime\n"
            "assert runtime.probes.results == {}, runtime.probes.results\n"
            "libs = ('xformers', 'flash_attn', 'flashinfer', 'liger_kernel', 'intel_extension_for_pytorch', 'triton')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in libs))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_probe_never_builds_a_jit_variant(monkeypatch, tmp_path):
    """Even with the JIT gate off (LAYERZERO_ALLOW_JIT=1's effect), an unbuilt variant is not probed; once
    built it is. The JIT library is the stand-in of tests/standins/jit_standin.py."""
    monkeypatch.setenv("LZ_STANDIN_JIT_DIR", str(tmp_path))
    jit = importlib.import_module("tests.standins.jit_standin")
    ungated = dataclasses.replace(jit.SPEC, check=None)
    backend = lz.register_backend(lz.Backend("standin_jit", (ungated,), probes=(("standin_jit.rms_norm", "rms_norm"),)))
    first = runtime.probes.probe(backend, CPU)
    assert first.ok and first.verified == () and "rms_float32_256 is not built yet" in first.skipped[0]
    assert jit.built("rms_float32_256") is None  # nothing compiled
    jit.rms_norm(torch.randn(2, 256), None, 1e-6)  # built (by a first call, or lz.warmup)
    lz.reset()
    backend = lz.register_backend(lz.Backend("standin_jit", (ungated,), probes=(("standin_jit.rms_norm", "rms_norm"),)))
    assert runtime.probes.probe(backend, CPU).verified == ("standin_jit.rms_norm",)
