"""Per-call cost of `lz.*` on the GPU host: each op next to the kernel it runs called directly and next
to what a user writes in plain torch, on the same tensors, in the two regimes of use.

    PYTHONPATH=src python3 benchmarks/call_overhead.py [--json out.json] [--quick] [--profile DIR]

Regimes (see ../shared/gpu/README.md, "Method"):
- eager: N back-to-back calls between two CUDA events, per call = elapsed / N; about
  max(host time, device time), what a model's eager forward sees.
- graph: the same N calls captured in one CUDA graph and replayed; per call = replay / N, the device
  time alone (for `lz.*` the kernel chosen under capture, which may differ).
- host: perf_counter around the N calls without waiting for the device (the Python and dispatcher
  time per call, while the launch queue does not fill).
Paths: `lz` (the public call, plan-cache hit), `direct` (the kernel that `lz.which` reports, called
as directly as torch allows: torch's aten entry point of an SDPA sub-backend with the layout
transposes, torch.rms_norm, ...; for other backends the kernel's adapter), `torch` (plain torch as a
user writes it: F.scaled_dot_product_attention(enable_gqa=True) on transposed views, F.rms_norm,
Hugging Face's rotate_half RoPE, F.silu(g) * u, ...). Rounds interleave the paths so drift hits all
alike; each figure is the median over rounds. Prints one table (per-call microseconds and the ratios
lz/direct and torch/lz) and writes the rows as JSON.

--profile DIR: also writes a cProfile of 10k `lz.attention` calls at the decode shape, and the CUDA
kernels that plain torch and each SDPA sub-backend run there (torch.profiler), into DIR.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import importlib
import io
import json
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import layerzero as lz

Fn = Callable[[], object]
BASE = None  # --base: an older LayerZero imported as `layerzero_base`, timed in the same process


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:  # as transformers' Llama writes it
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _hf_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, D) -> broadcast over BSHD heads
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _direct_attention(kernel: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> Fn | None:
    """The aten entry point of an SDPA sub-backend, called as a user who knows it would (BSHD tensors)."""
    c = causal and q.shape[1] > 1
    if kernel == "torch.sdpa_cudnn":
        op = torch._scaled_dot_product_cudnn_attention
        return lambda: _t(op(_t(q), _t(k), _t(v), None, False, 0.0, c, False)[0])
    if kernel == "torch.sdpa_flash":
        op = torch._scaled_dot_product_flash_attention
        return lambda: _t(op(_t(q), _t(k), _t(v), 0.0, c, False)[0])
    if kernel == "torch.sdpa_efficient":
        op = torch._scaled_dot_product_efficient_attention
        return lambda: _t(op(_t(q), _t(k), _t(v), None, False, 0.0, c)[0])
    return None


def _adapter(op: str, args: tuple, kernel: str) -> Fn:
    """Any other kernel: its adapter bound by the op family as before prepared plans (transposes, no guard)."""
    from layerzero.ops import FAMILIES
    from layerzero.state import runtime

    fam = FAMILIES[op]
    spec = runtime.registry.kernel(kernel)
    run, _ = fam.bind(spec, fam.context(*args))
    call_args = {
        "attention": lambda a: (a[0], a[1], a[2], None, a[4], 0.0, None, None, 0.0, None),
        "rms_norm": lambda a: a,
        "layer_norm": lambda a: a,
        "swiglu": lambda a: a,
    }[op](args)
    return lambda: run(*call_args)


def _impl(kernel: str) -> Callable[..., object]:
    """A kernel's adapter, which takes its op's calling convention (BSHD for RoPE and paged KV)."""
    from layerzero.state import runtime

    return runtime.registry.kernel(kernel).impl


def cases(quick: bool, device: torch.device) -> list[dict]:
    """Each case: name, regime label, lz call, direct call, plain-torch call (or None)."""
    bf16 = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape: int, dtype: torch.dtype = bf16) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype, generator=g)

    out = []

    def attention(name: str, b: int, sq: int, sk: int, hq: int, hk: int, d: int, causal: bool = True) -> None:
        q, k, v = r(b, sq, hq, d), r(b, sk, hk, d), r(b, sk, hk, d)
        kernel = lz.which("attention", q, k, v, is_causal=causal)
        direct = _direct_attention(kernel, q, k, v, causal) or _adapter(
            "attention", (q, k, v, None, causal), kernel)
        tc = causal and sq > 1  # plain torch: no mask for a decode row (its causal mask is top-left)
        case = dict(
            name=name, kernel=kernel,
            lz=lambda: lz.attention(q, k, v, is_causal=causal),
            direct=direct,
            torch=lambda: _t(F.scaled_dot_product_attention(_t(q), _t(k), _t(v), is_causal=tc, enable_gqa=hq != hk)))
        if BASE is not None:
            case["base"] = lambda: BASE.attention(q, k, v, is_causal=causal)
        for sub in ("torch.sdpa_cudnn", "torch.sdpa_flash", "torch.sdpa_efficient"):  # every candidate, eager and graphed
            fn = _direct_attention(sub, q, k, v, causal)
            try:
                fn()
            except RuntimeError:
                continue
            case[sub.split(".")[1]] = fn
        out.append(case)
        # (closures of this function's own locals: each call of attention() binds its own tensors)

    attention("attn prefill 1x512 32/8 d128", 1, 512, 512, 32, 8, 128)
    attention("attn decode 1x32k 32/8 d128", 1, 1, 32768, 32, 8, 128)
    attention("attn decode 8x2k 64/8 d128", 8, 1, 2048, 64, 8, 128)
    attention("attn decode 32x4k 32/8 d128", 32, 1, 4096, 32, 8, 128)
    attention("attn prefill 4x3000 28/4 d128", 4, 3000, 3000, 28, 4, 128)
    if not quick:
        attention("attn prefill 1x16k 32/8 d128", 1, 16384, 16384, 32, 8, 128)

    for rows, hidden in ((1, 4096), (8, 4096), (32768, 4096)):
        x, w = r(rows, hidden), r(hidden)
        kernel = lz.which("rms_norm", x, w, 1e-6)
        direct = (lambda x=x, w=w: torch.rms_norm(x, (x.shape[-1],), w, 1e-6)) if kernel == "torch.rms_norm" else \
            _adapter("rms_norm", (x, w, 1e-6), kernel)
        out.append(dict(name=f"rms_norm {rows}x{hidden}", kernel=kernel,
                        lz=lambda x=x, w=w: lz.rms_norm(x, w, 1e-6), direct=direct,
                        torch=lambda x=x, w=w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
                        base=None if BASE is None else lambda x=x, w=w: BASE.rms_norm(x, w, 1e-6)))

    x, w, bias = r(1, 4096), r(4096), r(4096)
    kernel = lz.which("layer_norm", x, w, bias, 1e-5)
    out.append(dict(name="layer_norm 1x4096", kernel=kernel, lz=lambda x=x, w=w, b=bias: lz.layer_norm(x, w, b, 1e-5),
                    direct=_adapter("layer_norm", (x, w, bias, 1e-5), kernel),
                    torch=lambda x=x, w=w, b=bias: F.layer_norm(x, (4096,), w, b, 1e-5),
                    base=None if BASE is None else lambda x=x, w=w, b=bias: BASE.layer_norm(x, w, b, 1e-5)))

    for b, s in ((1, 1), (1, 512)):
        q, k = r(b, s, 32, 128), r(b, s, 8, 128)
        cos, sin = (t[None].expand(b, -1, -1).to(bf16) for t in lz.rope_cache(s, 128, device=device))
        kernel = lz.which("rope_qk", q, k, cos, sin)
        impl = _impl(kernel)
        out.append(dict(name=f"rope_qk {b}x{s} 32/8 d128", kernel=kernel,
                        lz=lambda q=q, k=k, c=cos, s_=sin: lz.rope_qk(q, k, c, s_),
                        direct=lambda q=q, k=k, c=cos, s_=sin, run=impl: run(q, k, c, s_),
                        torch=lambda q=q, k=k, c=cos, s_=sin: _hf_rope(q, k, c, s_),
                        base=None if BASE is None else lambda q=q, k=k, c=cos, s_=sin: BASE.rope_qk(q, k, c, s_)))

    for rows in (1, 4096):
        gate, up = r(rows, 14336), r(rows, 14336)
        kernel = lz.which("swiglu", gate, up)
        out.append(dict(name=f"swiglu {rows}x14336", kernel=kernel, lz=lambda g_=gate, u=up: lz.swiglu(g_, u),
                        direct=_adapter("swiglu", (gate, up), kernel),
                        torch=lambda g_=gate, u=up: F.silu(g_) * u,
                        base=None if BASE is None else lambda g_=gate, u=up: BASE.swiglu(g_, u)))

    x = r(1, 4096)
    wg, wu, wd = r(14336, 4096) * 0.02, r(14336, 4096) * 0.02, r(4096, 14336) * 0.02
    kernel = lz.which("fused_mlp", x, wg, wu, wd)
    impl = _impl(kernel)
    out.append(dict(name="fused_mlp 1x4096x14336", kernel=kernel,
                    lz=lambda x=x, wg=wg, wu=wu, wd=wd: lz.fused_mlp(x, wg, wu, wd),
                    direct=lambda x=x, wg=wg, wu=wu, wd=wd, run=impl: run(x, wg, wu, wd, "swiglu"),
                    torch=lambda x=x, wg=wg, wu=wu, wd=wd: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd),
                    base=None if BASE is None else lambda x=x, wg=wg, wu=wu, wd=wd: BASE.fused_mlp(x, wg, wu, wd)))

    # paged decode: no plain-torch form; direct = the selected kernel's adapter
    from layerzero.perf import workloads
    b, sk, page = 8, 4096, 16
    args = workloads.workload("paged_attention").make((b, 1, sk, 32, 8, 128, page), bf16, device, g)
    kernel = lz.which("paged_attention", *args)
    impl = _impl(kernel)
    out.append(dict(name=f"paged decode {b}x{sk} 32/8 p{page}", kernel=kernel,
                    lz=lambda args=args: lz.paged_attention(*args),
                    direct=lambda args=args, run=impl: run(*args, True, None, None, 0.0, "NHD"), torch=None,
                    base=None if BASE is None else lambda args=args: BASE.paged_attention(*args)))
    return out


def eager_us(fn: Fn, n: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


def host_us(fn: Fn, n: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e6 / n


def graph_of(fn: Fn, n: int) -> torch.cuda.CUDAGraph | None:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            for _ in range(n):
                fn()
    except Exception as e:  # a kernel that cannot be captured: no graph figure
        print(f"  (capture failed: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
        return None
    return graph


def graph_us(graph: torch.cuda.CUDAGraph, n: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / n


PATHS = ("lz", "base", "direct", "torch")


def measure_case(case: dict, rounds: int, n: int) -> dict:
    """Median (and p95) per-call time of every path of the case: eager, host, graph; paths interleaved."""
    paths = {p: fn for p, fn in case.items() if callable(fn)}
    for fn in paths.values():  # warm up: selection, JIT, cuDNN plans
        for _ in range(5):
            fn()
    torch.cuda.synchronize()
    # fewer calls per round for slow calls, so a measurement takes about 20 ms
    per = eager_us(paths["direct"], 3)
    calls = max(5, min(n, int(20_000 / max(per, 1.0))))
    eager: dict[str, list[float]] = {p: [] for p in paths}
    host: dict[str, list[float]] = {p: [] for p in paths}
    gc.collect()
    gc.disable()  # a collection inside one path's round would be charged to it alone
    try:
        for i in range(rounds):
            order = list(paths) if i % 2 == 0 else list(reversed(paths))
            for p in order:
                eager[p].append(eager_us(paths[p], calls))
                host[p].append(host_us(paths[p], calls))
    finally:
        gc.enable()
    graphs = {p: graph_of(fn, calls) for p, fn in paths.items()}
    graph: dict[str, list[float]] = {p: [] for p in paths if graphs[p] is not None}
    for _ in range(rounds):
        for p in graph:
            graph[p].append(graph_us(graphs[p], calls))
    del graphs
    row = {"name": case["name"], "kernel": case["kernel"], "calls": calls}
    for label, data in (("eager", eager), ("host", host), ("graph", graph)):
        for p, values in data.items():
            row[f"{label}_{p}"] = statistics.median(values)
            if label == "eager":
                row[f"eager_{p}_p95"] = sorted(values)[int(0.95 * (len(values) - 1))]
    return row


def profile(out_dir: Path) -> None:
    """cProfile of 10k lz.attention calls at the decode shape; the CUDA kernels of each SDPA path there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    q = torch.randn(1, 1, 32, 128, device=dev, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 32768, 8, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(10):
        lz.attention(q, k, v, is_causal=True)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10_000):
        lz.attention(q, k, v, is_causal=True)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    (out_dir / "cprofile_attention_decode.txt").write_text(text.getvalue())

    qh, kh, vh = _t(q), _t(k), _t(v)
    qc, kc, vc = (t.contiguous() for t in (qh, kh, vh))
    paths = {
        "plain F.sdpa enable_gqa (BSHD views)": lambda: F.scaled_dot_product_attention(qh, kh, vh, enable_gqa=True),
        "plain F.sdpa enable_gqa (BHSD contiguous)": lambda: F.scaled_dot_product_attention(qc, kc, vc, enable_gqa=True),
        "aten cudnn (BSHD views)": lambda: torch._scaled_dot_product_cudnn_attention(qh, kh, vh, None, False)[0],
        "aten cudnn (BHSD contiguous)": lambda: torch._scaled_dot_product_cudnn_attention(qc, kc, vc, None, False)[0],
        "aten flash (BSHD views)": lambda: torch._scaled_dot_product_flash_attention(qh, kh, vh)[0],
        "aten flash (BHSD contiguous)": lambda: torch._scaled_dot_product_flash_attention(qc, kc, vc)[0],
        "lz.attention": lambda: lz.attention(q, k, v, is_causal=True),
    }
    lines = [f"decode B=1 Sq=1 Sk=32768 Hq=32 Hkv=8 D=128 bf16; lz picks {lz.which('attention', q, k, v, is_causal=True)}"]
    for name, fn in paths.items():
        try:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as p:
                for _ in range(20):
                    fn()
                torch.cuda.synchronize()
            kernels = [(e.key, e.device_time_total / e.count, e.count) for e in p.key_averages() if e.device_time_total > 0]
            lines.append(f"\n{name}: eager {eager_us(fn, 200):.1f} us/call")
            lines += [f"    {us:8.1f} us x{c // 20}  {key[:140]}" for key, us, c in sorted(kernels, key=lambda t: -t[1])]
        except Exception as e:
            lines.append(f"\n{name}: {type(e).__name__}: {str(e)[:200]}")
    # what each raw aten op does with a last dimension of stride 2 (F.sdpa never gives them one)
    g = torch.Generator(device=dev).manual_seed(1)
    qs, ks, vs = (torch.randn(2, 8, 64, 128, device=dev, dtype=torch.bfloat16, generator=g)[..., ::2] for _ in range(3))
    ref = F.scaled_dot_product_attention(qs.double(), ks.double(), vs.double(), is_causal=True)
    raw = {
        "flash": lambda: torch._scaled_dot_product_flash_attention(qs, ks, vs, 0.0, True)[0],
        "cudnn": lambda: torch._scaled_dot_product_cudnn_attention(qs, ks, vs, None, False, 0.0, True)[0],
        "efficient": lambda: torch._scaled_dot_product_efficient_attention(qs, ks, vs, None, False, 0.0, True)[0],
    }
    lines.append("\nraw aten ops on q/k/v whose last dim has stride 2 (2x8x64x64 bf16, causal):")
    for name, fn in raw.items():
        try:
            err = (fn().double() - ref).abs().max().item()
            lines.append(f"    {name}: ran, max abs err {err:.3g} ({'ok' if err < 2e-2 else 'WRONG'})")
        except Exception as e:
            lines.append(f"    {name}: raised {type(e).__name__}: {str(e)[:120]}")
    (out_dir / "sdpa_decode_kernels.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--profile", type=Path)
    ap.add_argument("--label", default="")
    ap.add_argument("--base", type=Path, help="a folder holding an older LayerZero as package layerzero_base")
    args = ap.parse_args()
    global BASE
    if args.base:
        sys.path.insert(0, str(args.base))
        BASE = importlib.import_module("layerzero_base")
    if not torch.cuda.is_available():
        sys.exit("call_overhead.py times CUDA calls; no GPU here")
    dev = torch.device("cuda")
    rows = []
    for case in cases(args.quick, dev):
        row = measure_case(case, args.rounds, args.calls)
        rows.append(row)
        print(f"{row['name']:<32} {row['kernel']:<24} " + " ".join(
            f"{k.removeprefix('eager_')} {v:.2f}" for k, v in row.items() if k.startswith("eager_") and "p95" not in k),
            flush=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "label": args.label,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "layerzero": lz.__file__}
    print(render(meta, rows))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.profile:
        profile(args.profile)


def render(meta: dict, rows: list[dict]) -> str:
    """Per-call microseconds: eager (max of host and device), host, graph (device); then the other
    candidate kernels of each attention row, eager and graphed."""
    nan = float("nan")
    lines = [f"{meta['device']}, torch {meta['torch']}, {meta['date']} {meta['label']}", "",
             "| call | kernel | eager lz | eager base | eager direct | eager torch | lz - direct | torch / lz | "
             "host lz | host base | host direct | host torch | graph lz | graph direct | graph torch |",
             "|---|---|" + "---|" * 13]
    for r in rows:
        g = r.get
        lines.append(
            f"| {r['name']} | {r['kernel']} | {r['eager_lz']:.2f} | {g('eager_base', nan):.2f} | {r['eager_direct']:.2f} | "
            f"{g('eager_torch', nan):.2f} | {r['eager_lz'] - r['eager_direct']:+.2f} | "
            f"{g('eager_torch', nan) / r['eager_lz']:.3f} | {r['host_lz']:.2f} | {g('host_base', nan):.2f} | "
            f"{r['host_direct']:.2f} | {g('host_torch', nan):.2f} | {g('graph_lz', nan):.2f} | "
            f"{g('graph_direct', nan):.2f} | {g('graph_torch', nan):.2f} |")
    subs = ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient")
    lines += ["", "| attention call | " + " | ".join(f"eager {s}" for s in subs) + " | "
              + " | ".join(f"graph {s}" for s in subs) + " |", "|---|" + "---|" * 6]
    for r in rows:
        if r["name"].startswith("attn"):
            lines.append(f"| {r['name']} | " + " | ".join(f"{r.get('eager_' + s, nan):.2f}" for s in subs) + " | "
                         + " | ".join(f"{r.get('graph_' + s, nan):.2f}" for s in subs) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
