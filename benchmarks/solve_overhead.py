"""Overhead of a solved module (lz.solve) vs calling the kernel directly, and vs the dynamic `lz.*`
call (plan-cache hit), in two regimes: launch-bound calls, where host time shows in full, and GPU-bound
calls, where it hides behind device work. A second table times the host side alone: the same paths
with the kernel replaced by a no-op (the guard and dispatch cost, nothing else).

    PYTHONPATH=src python3 benchmarks/solve_overhead.py [--out benchmarks/results/solve_overhead-<dev>.md]

Paths: kernel (the kernel called the way a solved branch calls it: no wrapper, layout transposes
inline), plan.run (the cached plan's bound run: health guard, layout wrapper, kernel), solved (the
generated function: guard, bucket bounds, kernel) and dynamic (`lz.*`: key, plan lookup, plan.run).
Each is timed in interleaved rounds (so drift hits all alike): per round, N calls timed with
perf_counter and a device sync at the end; the tables give the median over rounds of time per call
and the difference to the kernel call in nanoseconds. Slow calls get fewer calls per round
(--round-s) and slow cases fewer rounds (--case-s, at least 3), so the GPU-bound shapes also run on
a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import layerzero as lz
from layerzero.graphs import warmup_for_capture
from layerzero.perf import workloads
from layerzero.perf.solve import FAMILY_CODE
from layerzero.state import runtime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calls(fn, args):
    """A function that makes n calls fn(*args)."""
    def run(n: int) -> None:
        for _ in range(n):
            fn(*args)
    return run


def _kernel_calls(op: str, kernel_id: str, impl, call_args: tuple):
    """A function that makes n calls of `impl` written as the solved branch writes them (no frame between)."""
    sig = inspect.signature(workloads.public_op(op))
    bound = sig.bind(*call_args)
    bound.apply_defaults()
    call = FAMILY_CODE[op].kernel_call(runtime.registry.kernel(kernel_id), "K")
    scope: dict = {}
    exec(f"def loop(n, K, {', '.join(sig.parameters)}):\n    for _ in range(n):\n        {call}\n", scope)  # noqa: S102
    loop, values = scope["loop"], tuple(bound.arguments.values())
    return lambda n: loop(n, impl, *values)


def _per_call_ns(run, device: torch.device, n: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    run(n)
    _sync(device)
    return (time.perf_counter() - t0) * 1e9 / n


def _import(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _interleaved(variants: dict, device: torch.device, rounds: int, calls: int) -> dict[str, float]:
    """Median ns per call of each variant over `rounds` rounds of `calls` calls, variants interleaved."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(rounds):
        for key, run in variants.items():
            times[key].append(_per_call_ns(run, device, calls))
    return {k: statistics.median(v) for k, v in times.items()}


def _noop(*args):
    return args[0]


def _paths(op: str, solved, plan, call_args: tuple, impl) -> dict:
    """The timed paths; "kernel again" is a second, separate copy of the kernel loop: its difference to
    "kernel" is the noise floor (what any two identical paths differ by in this run)."""
    return {"kernel": _kernel_calls(op, plan.kernel_id, impl, call_args),
            "kernel again": _kernel_calls(op, plan.kernel_id, impl, call_args),
            "plan.run": _calls(plan.run, workloads.run_args(op, call_args)),
            "solved": _calls(getattr(solved, op), call_args), "dynamic": _calls(getattr(lz, op), call_args)}


def _host_only(op: str, solved, plan, call_args: tuple, device: torch.device, rounds: int, calls: int):
    """The four paths with the kernel a no-op: registered under its id (so plan.run and lz.* bind and
    guard the no-op as they would the kernel), and put in place of every kernel of the solved module."""
    spec = runtime.registry.kernel(plan.kernel_id)
    kernels = {var: getattr(solved, var) for var in solved.KERNEL_IDS}
    try:
        lz.register_kernel(dataclasses.replace(spec, impl=_noop))
        noop_plan = lz.select(op, *call_args)
        assert noop_plan.kernel_id == plan.kernel_id, noop_plan
        for var in kernels:
            setattr(solved, var, _noop)
        variants = _paths(op, solved, noop_plan, call_args, _noop)
        for run in variants.values():
            _per_call_ns(run, device, 1000)
        return _interleaved(variants, device, rounds, calls)
    finally:
        lz.register_kernel(spec)
        for var, impl in kernels.items():
            setattr(solved, var, impl)


# --- a decoder step: the overhead where it matters -------------------------------------------------------

_STEP = """
def step(n, h0, layers, B, QD, HQ, D, eps, {params}):
    for _ in range(n):
        h = h0
        for w1, wqkv, k, v, wo, w2, wgu, wd in layers:
            x, weight = h, w1
            a = {norm}
            q = (a @ wqkv)[..., :QD].view(B, 1, HQ, D)
            o = {attn}
            h = h + o.reshape(B, 1, QD) @ wo
            x, weight = h, w2
            a = {norm}
            g, u = (a @ wgu).chunk(2, -1)
            h = h + (silu(g) * u) @ wd
    return h
"""


def _step_fn(norm: str, attn: str, scope: dict):
    """A decode step of a Llama-style stack (norm, QKV, attention over a KV cache, O, norm, gated MLP) with
    the norm and attention calls written as `norm` and `attn`; every other line is the same in all paths."""
    sig = inspect.signature(workloads.public_op("attention"))
    params = ", ".join(f"{p.name}={p.default!r}" for p in sig.parameters.values()
                       if p.name not in ("q", "k", "v", "layout"))
    scope = {"silu": torch.nn.functional.silu, **scope}
    exec(_STEP.format(params=params, norm=norm, attn=attn), scope)  # noqa: S102
    return scope["step"]


def _model(device: torch.device, dtype: torch.dtype, randn, batch: int, cfg: dict):
    """Weights and a KV cache of `cfg['layers']` layers; returns (h0, layers, fixed step arguments)."""
    hid, hq, hkv, d, inter, sk = (cfg[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "inter", "seq_k"))
    scale = hid ** -0.5
    layers = [(1 + 0.1 * randn(hid), randn(hid, (hq + 2 * hkv) * d) * scale, randn(batch, sk, hkv, d),
               randn(batch, sk, hkv, d), randn(hq * d, hid) * scale, 1 + 0.1 * randn(hid),
               randn(hid, 2 * inter) * scale, randn(inter, hid) * inter ** -0.5) for _ in range(cfg["layers"])]
    return randn(batch, 1, hid), layers, (batch, hq * d, hq, d, 1e-6)


def _step_paths(solved, norm_id: str, attn_id: str) -> dict:
    registry = runtime.registry
    kn, ka = registry.kernel(norm_id), registry.kernel(attn_id)
    direct = dict(norm=FAMILY_CODE["rms_norm"].kernel_call(kn, "KN"), attn=FAMILY_CODE["attention"].kernel_call(ka, "KA"),
                  scope={"KN": kn.impl, "KA": ka.impl})
    # "frames": each call through a Python function that only passes its arguments on (no guard): the
    # least any function-call API adds
    frames = dict(direct["scope"])
    exec(f"def PN(x, weight, eps):\n    return {direct['norm']}\n"  # noqa: S102
         "def PA(q, k, v, attn_mask, is_causal, dropout_p=0.0, scale=None, window_size=None, softcap=0.0, "
         f"alibi_slopes=None):\n    return {direct['attn']}\n", frames)
    return {"kernels": _step_fn(**direct), "kernels again": _step_fn(**direct),
            "frames": _step_fn("PN(x, weight, eps)", "PA(q, k, v, None, True)", frames),
            "solved": _step_fn("S.rms_norm(x, weight, eps)", "S.attention(q, k, v, None, True)", {"S": solved}),
            "dynamic": _step_fn("lz.rms_norm(x, weight, eps)", "lz.attention(q, k, v, None, True)", {"lz": lz})}


def _graphed(step, args: tuple):
    """step(1, *args) captured in a CUDA graph; returns a function replaying it n times."""
    warmup_for_capture(step, 1, *args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(1, *args)

    def replay(n: int) -> None:
        for _ in range(n):
            graph.replay()
    return replay


def _model_rows(args, device: torch.device, dtype: torch.dtype, randn, tmp: Path) -> list[str]:
    cfg = _MODEL_CUDA if device.type == "cuda" else _MODEL_CPU
    solved = _import(lz.solve({
        "attention": dict(batch=(1, 64), seq_q=(1, 8192), seq_k=(1, 8192), heads=[cfg["heads"]],
                          kv_heads=[cfg["kv_heads"]], head_dim=[cfg["head_dim"]], causal=[1]),
        "rms_norm": dict(rows=(1, 1 << 16), hidden=[cfg["hidden"]])}, tmp / "solved_model.py", dtypes=[dtype],
        device=device).path)
    out = []
    for batch in args.model_batches:
        h0, layers, fixed = _model(device, dtype, randn, batch, cfg)
        w1, wqkv, k, v = layers[0][:4]
        a = lz.rms_norm(h0, w1, 1e-6)
        q = (a @ wqkv)[..., :fixed[1]].view(batch, 1, cfg["heads"], cfg["head_dim"])
        norm_id, attn_id = lz.which("rms_norm", a, w1, 1e-6), lz.which("attention", q, k, v, None, True)
        paths = _step_paths(solved, norm_id, attn_id)
        step_args = (h0, layers, *fixed)
        called = _record_calls(solved)  # the solved module calls the kernels dynamic selection picks
        paths["solved"](1, *step_args)
        assert called == {norm_id, attn_id}, (called, norm_id, attn_id)
        one_layer = (h0, layers[:1], *fixed)  # the paths agree (on one layer: 22 amplify rounding apart)
        ref = paths["kernels"](1, *one_layer)
        for step in paths.values():
            torch.testing.assert_close(step(1, *one_layer), ref, rtol=2e-2, atol=2e-2)
        variants = {name: (lambda n, f=step, a=step_args: f(n, *a)) for name, step in paths.items()}
        one = _per_call_ns(variants["kernels"], device, 3) / 1e9
        steps = max(1, min(args.model_steps, int(args.round_s / one)))
        med = _interleaved(variants, device, args.model_rounds, steps)
        row = dict(med)
        if device.type == "cuda":
            graphs = {f"graph {name}": _graphed(paths[name], step_args) for name in ("kernels", "kernels again", "solved")}
            row.update(_interleaved(graphs, device, args.model_rounds, steps))
        out.append((batch, norm_id, attn_id, f"{args.model_rounds}x{steps}", row))
        print(f"model batch {batch}: " + ", ".join(f"{k} {v / 1e3:.1f} us" for k, v in row.items()), flush=True)
    lines = ["", f"A decode step of a Llama-style stack ({cfg['layers']} layers, hidden {cfg['hidden']}, "
             f"{cfg['heads']}/{cfg['kv_heads']} heads of {cfg['head_dim']}, MLP {cfg['inter']}, KV cache "
             f"{cfg['seq_k']} tokens): 2 rms_norm and 1 attention call per layer made directly, through the "
             "solved module, or through `lz.*`; everything else identical. Median us per step over interleaved "
             "rounds; `kernels again` is a second copy of the direct step (the noise floor); `frames` makes each "
             "call through a Python function that only passes its arguments on (the least any function API adds).",
             "", "| batch | rms_norm kernel | attention kernel | rounds x steps | kernels | kernels again | frames "
             "| solved | dynamic | noise (again - kernels) | frames - kernels | solved - kernels | dynamic - kernels |"
             + (" graph: kernels | graph: again | graph: solved | graph: solved - kernels |" if device.type == "cuda" else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if device.type == "cuda" else "")]
    for batch, norm_id, attn_id, count, row in out:
        base = row["kernels"]
        cells = [f"{row[k] / 1e3:.1f}" for k in ("kernels", "kernels again", "frames", "solved", "dynamic")]
        cells += [f"{(row[k] - base) / 1e3:+.1f} ({(row[k] - base) / base:+.1%})"
                  for k in ("kernels again", "frames", "solved", "dynamic")]
        if "graph kernels" in row:
            g = row["graph kernels"]
            cells += [f"{row[k] / 1e3:.1f}" for k in ("graph kernels", "graph kernels again", "graph solved")]
            cells.append(f"{(row['graph solved'] - g) / 1e3:+.2f} ({(row['graph solved'] - g) / g:+.2%})")
        lines.append(f"| {batch} | {norm_id} | {attn_id} | {count} | " + " | ".join(cells) + " |")
    return lines


def _record_calls(module) -> set[str]:
    """Wrap each kernel of the solved module to record its id on its first call, then unwrap."""
    called: set[str] = set()
    for var, kernel_id in module.KERNEL_IDS.items():
        impl = getattr(module, var)

        def once(*a, _var=var, _impl=impl, _id=kernel_id):
            called.add(_id)
            setattr(module, _var, _impl)
            return _impl(*a)
        setattr(module, var, once)
    return called


# Llama-1.1B-like on CUDA (the e2e_generate model's shape); small on a CPU
_MODEL_CUDA = dict(layers=22, hidden=2048, heads=32, kv_heads=4, head_dim=64, inter=5632, seq_k=512)
_MODEL_CPU = dict(layers=4, hidden=256, heads=4, kv_heads=2, head_dim=64, inter=512, seq_k=128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=2000, help="calls per round at most")
    parser.add_argument("--round-s", type=float, default=0.5, help="fewer calls per round beyond this time")
    parser.add_argument("--case-s", type=float, default=60.0, help="fewer rounds (>= 3) beyond this time per case")
    parser.add_argument("--host-rounds", type=int, default=31)
    parser.add_argument("--host-calls", type=int, default=20000)
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--model-batches", type=int, nargs="*", default=[1, 8], help="decode-step batches; none: skip")
    parser.add_argument("--model-rounds", type=int, default=21)
    parser.add_argument("--model-steps", type=int, default=20, help="steps per round at most")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

    rows_4096 = dict(rows=(1, 1 << 16), hidden=[4096])
    cases = {  # name: (regime, op, args, solve dims)
        "rms_norm 1x4096": ("launch", "rms_norm", (randn(1, 4096), randn(4096)), rows_4096),
        "rms_norm 64x4096": ("launch", "rms_norm", (randn(64, 4096), randn(4096)), rows_4096),
        "attention decode 8x1x512 h8/2 d64": (
            "launch", "attention", (randn(8, 1, 8, 64), randn(8, 512, 2, 64), randn(8, 512, 2, 64), None, True),
            dict(batch=(1, 64), seq_q=(1, 1024), seq_k=(1, 4096), heads=[8], kv_heads=[2], head_dim=[64], causal=[1])),
        "rms_norm 16384x4096": ("GPU", "rms_norm", (randn(16384, 4096), randn(4096)), rows_4096),
        "attention prefill 8x2048 h32/8 d128 causal": (
            "GPU", "attention",
            (randn(8, 2048, 32, 128), randn(8, 2048, 8, 128), randn(8, 2048, 8, 128), None, True),
            dict(batch=(1, 64), seq_q=(1, 8192), seq_k=(1, 8192), heads=[32], kv_heads=[8], head_dim=[128],
                 causal=[1])),
    }
    tmp = Path(tempfile.mkdtemp())
    rows, host_rows = [], []
    for i, (name, (regime, op, call_args, dims)) in enumerate(cases.items()):
        if args.only not in name:
            continue
        solved = _import(lz.solve(op, tmp / f"solved_{i}_{op}.py", dtypes=[dtype], device=device, **dims).path)
        plan = lz.select(op, *call_args)
        impl = runtime.registry.kernel(plan.kernel_id).impl
        variants = _paths(op, solved, plan, call_args, impl)
        ref = plan.run(*workloads.run_args(op, call_args))  # the paths agree before timing (and are warm)
        torch.testing.assert_close(getattr(solved, op)(*call_args), ref)
        torch.testing.assert_close(getattr(lz, op)(*call_args), ref)
        del ref
        one = _per_call_ns(variants["plan.run"], device, 1) / 1e9
        calls = max(1, min(args.calls, int(args.round_s / one)))
        rounds = max(3, min(args.rounds, int(args.case_s / (len(variants) * calls * one))))
        for run in variants.values():
            _per_call_ns(run, device, max(1, min(50, calls)))
        med = _interleaved(variants, device, rounds, calls)
        rows.append((name, regime, plan.kernel_id, f"{rounds}x{calls}", med))
        print(f"{name}: {plan.kernel_id}, {rounds} rounds x {calls} calls, "
              + ", ".join(f"{k} {v:.0f}" for k, v in med.items()) + " ns", flush=True)
        host_rows.append((name, plan.kernel_id,
                          _host_only(op, solved, plan, call_args, device, args.host_rounds, args.host_calls)))
    head = ["| case | regime | kernel id | rounds x calls | kernel | kernel again | plan.run | solved | dynamic (lz.*) "
            "| noise (again - kernel) | solved - kernel | dynamic - kernel |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = [f"# solve overhead on {device.type} "
             f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {dtype}, "
             f"torch {torch.__version__}, {datetime.date.today()}",
             "", "Median over interleaved rounds (rounds x calls per round); ns per call. Regime: launch-bound",
             "(host time shows) or GPU-bound (a shape whose device time hides the host; on a CPU just a big call).",
             "", *head]
    for name, regime, kid, count, med in rows:
        lines.append(f"| {name} | {regime} | {kid} | {count} | {_cells(med)} |")
    lines += ["", "Host side only: the kernel replaced by a no-op (`solved - kernel` is the solved function's own cost: "
                  f"its frame and guard); median over {args.host_rounds} interleaved rounds of {args.host_calls} "
                  "calls, ns per call.", "", head[0].replace(" regime |", "").replace(" rounds x calls |", ""),
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, kid, med in host_rows:
        lines.append(f"| {name} | {kid} | {_cells(med)} |")
    if args.model_batches:
        lines += _model_rows(args, device, dtype, randn, tmp)
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _cells(med: dict[str, float]) -> str:
    base = med["kernel"]
    return (f"{base:.0f} | {med['kernel again']:.0f} | {med['plan.run']:.0f} | {med['solved']:.0f} | "
            f"{med['dynamic']:.0f} | {med['kernel again'] - base:+.0f} | {med['solved'] - base:+.0f} | "
            f"{med['dynamic'] - base:+.0f}")


if __name__ == "__main__":
    sys.exit(main())
