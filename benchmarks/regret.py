"""Selection regret before and after tuning, in both timing regimes, vs single-backend policies and plain torch.

    PYTHONPATH=src python3 benchmarks/regret.py [--quick] [--only GLOB] [--kernels GLOB] [--out PATH.md]
    PYTHONPATH=src python3 benchmarks/regret.py --render a.json [b.json ...] [--out PATH.md]

Two regimes, as a call runs (perf/bench.py): "eager" = N back-to-back calls between two CUDA events,
per call = elapsed / N (about max(host, device): what a model's eager forward sees); "graph" = the
same N calls captured in one CUDA graph and replayed (device time: what a CUDA-graphed decode step
sees). The graph regime needs CUDA; on CPU only the eager one is reported.

For every shape (attention prefill, chunked prefill with Sq < Sk, decode at 1-256 rows, sliding
window, softcap, paged-KV decode and chunked prefill, rms_norm / layer_norm from 1 to 32k rows,
RoPE, SwiGLU; lengths and head counts beyond powers of two) and every kernel registered for it
that can run here (FlashInfer, Liger, Triton, ... join automatically):
1. "before": the kernel LayerZero picks from priorities alone (an empty PerfDB), per regime (under
   capture only graph-safe kernels compete);
2. tune: every candidate is checked against the reference, then timed in both regimes; results go
   to a fresh PerfDB;
3. "after": the kernel LayerZero picks with those measurements, per regime (the graph regime reads
   graph figures, see Runtime.regime);
4. ground truth: every candidate is checked and timed again in a second, independent pass; the
   best correct candidate per shape and regime is the baseline, and each pick's ratio is its
   time / best in that regime;
5. what users compare: the public call (`lz.attention(...)`, ...) against "plain torch", what a
   user writes without LayerZero on the same tensors (F.scaled_dot_product_attention with
   enable_gqa on BHSD-transposed views of the BSHD tensors, transposed back, with an explicit mask
   where torch's top-left `is_causal` would be wrong and HF's eager softcapped attention for
   softcap; F.rms_norm; F.layer_norm; HF's rotate_half RoPE; F.silu(gate) * up), both checked
   against the reference and timed in both regimes side by side. "plain / lz" > 1: LayerZero is
   faster. Paged KV has no plain-torch equivalent.
Single-backend policies ("always torch", "always flashinfer", ...) pick their backend's highest
priority kernel that can run the shape (in the graph regime: among those with a graph figure); a
backend with none there runs torch's (what a user without LayerZero has), and where torch has none
either (paged KV), LayerZero's default pick. Regret is the geometric mean of ratios.
Targets (issue 17): after tune, eager <= 1.02 geomean and 1.05 worst, graph <= 1.03 geomean and
1.10 worst; before tune <= 1.05 geomean in both; against plain torch, no shape slower by more than
2 % and a geomean of plain / lz >= 1.05 over the prefill, decode and norm shapes.

Results: markdown and JSON (rows written after each shape, so a killed run keeps what it measured)
under benchmarks/results/, named by device (regret-h200.md, regret-cpu-quick.md, ...), titled with
device, dtype, torch version and date. A run too long for one sitting splits with --only and joins
with --render a.json b.json.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import layerzero as lz
from layerzero.kernel import priority_for
from layerzero.perf import workloads
from layerzero.perf.bench import calls_per_sample, compare, measure, rotation_count, time_calls, time_graph
from layerzero.perf.tune import tunable_kernels
from layerzero.state import runtime

RESULTS = Path(__file__).resolve().parent / "results"
REGIMES = ("eager", "graph")

# (workload, shape) in the workload dims (layerzero/perf/workloads.py):
# attention: batch, seq_q, seq_k, heads, kv_heads, head_dim, causal
# attention_ext: the same, then window (left; 0 = none), softcap (0 = none)
SHAPES = [
    ("attention", (1, 4096, 4096, 32, 8, 128, 1)),     # prefill, GQA 4
    ("attention", (1, 3000, 3000, 32, 8, 128, 1)),     # a length that is no power of two
    ("attention", (2, 1000, 1000, 28, 4, 128, 1)),     # Qwen2-7B heads (28/4)
    ("attention", (1, 2048, 2048, 64, 8, 128, 1)),     # Llama-70B heads (64/8)
    ("attention", (4, 1536, 1536, 32, 32, 80, 1)),     # head_dim 80 (Phi-2), MHA
    ("attention", (1, 2048, 2048, 16, 8, 256, 1)),     # head_dim 256 (Gemma)
    ("attention", (8, 512, 512, 32, 32, 128, 1)),      # short prefill, MHA
    ("attention", (1, 8192, 8192, 32, 8, 128, 1)),     # long prefill
    ("attention", (2, 1024, 1024, 16, 16, 64, 0)),     # non-causal (encoder)
    ("attention", (1, 512, 4096, 32, 8, 128, 1)),      # chunked prefill: 512 new tokens on 3584 cached
    ("attention", (4, 256, 3000, 28, 4, 128, 1)),      # chunked prefill, odd lengths
    ("attention", (16, 4, 2048, 32, 8, 128, 1)),       # speculative decode (4 draft tokens)
    ("attention", (1, 1, 32768, 32, 8, 128, 1)),       # decode, batch 1, long context
    ("attention", (1, 1, 4096, 32, 8, 128, 1)),        # decode, batch 1
    ("attention", (8, 1, 2048, 64, 8, 128, 1)),        # decode, 64/8 heads
    ("attention", (32, 1, 4096, 32, 8, 128, 1)),
    ("attention", (64, 1, 3000, 28, 4, 128, 1)),
    ("attention", (256, 1, 1024, 32, 8, 128, 1)),      # decode, 256 rows
    ("attention", (8, 1, 16384, 32, 8, 128, 1)),       # long-context decode
    ("attention_ext", (1, 8192, 8192, 32, 8, 128, 1, 4096, 0)),   # sliding window (Mistral)
    ("attention_ext", (2, 3000, 3000, 32, 8, 128, 1, 1024, 0)),
    ("attention_ext", (2, 2048, 2048, 16, 8, 256, 1, 0, 50)),     # softcap (Gemma-2)
    ("attention_ext", (1, 4096, 4096, 16, 8, 256, 1, 2048, 50)),  # window + softcap (Gemma-2 local layers)
    ("attention_ext", (16, 1, 4096, 16, 8, 256, 1, 0, 50)),       # softcap decode
    # rows, hidden
    ("rms_norm", (1, 4096)),                            # decode step, batch 1
    ("rms_norm", (7, 4096)),
    ("rms_norm", (64, 8192)),
    ("rms_norm", (1000, 3584)),                          # Qwen2-7B hidden
    ("rms_norm", (4096, 4096)),                          # prefill
    ("rms_norm", (32768, 4096)),
    ("rms_norm", (16384, 8192)),
    ("layer_norm", (1, 1024)),
    ("layer_norm", (256, 1024)),
    ("layer_norm", (3000, 2560)),
    ("layer_norm", (32768, 1024)),
    # paged KV (shuffled pages): batch, seq_q, seq_k, heads, kv_heads, head_dim, page_size
    ("paged_attention", (32, 1, 8192, 32, 8, 128, 16)),     # decode, 1 GiB of KV
    ("paged_attention", (8, 1, 32768, 32, 8, 128, 16)),     # long-context decode
    ("paged_attention", (128, 1, 1024, 32, 8, 128, 16)),    # many short sequences
    ("paged_attention", (4, 128, 4096, 32, 8, 128, 16)),    # chunked prefill on the cache
    # rope, q and k together: batch, seq, heads, kv_heads, head_dim
    ("rope_qk", (64, 1, 32, 8, 128)),                       # decode step
    ("rope_qk", (1, 3000, 28, 4, 128)),
    ("rope_qk", (4, 8192, 32, 8, 128)),
    # swiglu: rows, d_ff
    ("swiglu", (1, 14336)),
    ("swiglu", (64, 14336)),
    ("swiglu", (3000, 18944)),
]
QUICK = [SHAPES[i] for i in (0, 9, 13, 17, 19, 21, 24, 28, 35, 39, 43)]
CPU_SHAPES = [("attention", (1, 256, 256, 8, 2, 64, 1)), ("attention", (1, 100, 300, 8, 2, 64, 1)),
              ("attention", (4, 1, 1024, 8, 2, 64, 1)), ("attention_ext", (1, 256, 256, 8, 2, 64, 1, 64, 0)),
              ("rms_norm", (1, 1024)), ("rms_norm", (64, 1024)), ("layer_norm", (64, 1024)),
              ("rope_qk", (2, 64, 8, 2, 64)), ("swiglu", (64, 2816)), ("paged_attention", (4, 1, 256, 8, 2, 64, 16))]
CPU_QUICK = [("attention", (1, 48, 48, 4, 2, 32, 1)), ("attention", (1, 16, 80, 4, 2, 32, 1)),
             ("attention", (2, 1, 96, 4, 2, 32, 1)), ("attention_ext", (1, 48, 48, 4, 2, 32, 1, 16, 0)),
             ("rms_norm", (1, 256)), ("rms_norm", (64, 256)), ("layer_norm", (8, 256)), ("rope_qk", (1, 16, 4, 2, 32)),
             ("swiglu", (8, 256)), ("paged_attention", (2, 1, 64, 4, 2, 32, 16))]


# --- plain torch: what a user writes without LayerZero ------------------------------------------

def _visible(sq: int, sk: int, causal: bool, window: tuple[int, int] | None, device: torch.device) -> torch.Tensor:
    """(sq, sk) bool, True = attend: bottom-right causal alignment and flash-attn windows, as lz.attention."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    keep = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        left, right = window
        if left >= 0:
            keep &= j >= i - left
        if right >= 0:
            keep &= j <= i + right
    return keep


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' repeat_kv: (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def _plain_attention(args: tuple[Any, ...]) -> Callable[..., Any]:
    q, k, v, _, causal, *rest = args
    window = rest[3] if len(rest) > 3 else None
    softcap = float(rest[4]) if len(rest) > 4 else 0.0
    sq, sk, hq, hkv, d = q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]
    # torch's is_causal is top-left aligned: right for Sq == Sk; a decode step (Sq == 1) sees every
    # key, so users pass no mask; chunked prefill and windows need an explicit one (built once, as
    # transformers builds it once per forward)
    mask = None
    if window is not None or softcap or (causal and sq not in (1, sk)):
        mask = _visible(sq, sk, bool(causal), window, q.device)
    is_causal = bool(causal) and mask is None and sq == sk
    if softcap:  # SDPA has no softcap: transformers' eager attention (Gemma-2)
        visible = _visible(sq, sk, bool(causal), window, q.device)

        def eager_softcap(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any) -> torch.Tensor:
            query, key, value = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            key, value = repeat_kv(key, hq // hkv), repeat_kv(value, hq // hkv)
            attn_weights = torch.matmul(query, key.transpose(2, 3)) * d ** -0.5
            attn_weights = torch.tanh(attn_weights / softcap) * softcap
            attn_weights = attn_weights.masked_fill(~visible, torch.finfo(attn_weights.dtype).min)
            attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
            return torch.matmul(attn_weights, value).transpose(1, 2)

        return eager_softcap

    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *_: Any) -> torch.Tensor:
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                              is_causal=is_causal, enable_gqa=hq != hkv).transpose(1, 2)

    return sdpa


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """transformers' rotate_half."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb (unsqueeze_dim=2 for BSHD q/k)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


PLAIN: dict[str, Callable[[tuple[Any, ...]], Callable[..., Any]]] = {
    "attention": _plain_attention,
    "attention_ext": _plain_attention,
    "rms_norm": lambda args: lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
    "layer_norm": lambda args: lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
    "rope_qk": lambda args: lambda q, k, cos, sin: apply_rotary_pos_emb(q, k, cos[None], sin[None], unsqueeze_dim=2),
    "swiglu": lambda args: lambda gate, up: F.silu(gate) * up,
}


# --- measuring ------------------------------------------------------------------------------------

def geomean(xs: list[float]) -> float:
    """Geometric mean; an infinite ratio (a pick that was wrong or could not be timed) makes it infinite."""
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def pick(ctx: lz.SelectionContext, name: str) -> str:
    return runtime.engine.evaluate(ctx, workloads.family(name).transforms).selected_kernel


def kind_of(ctx: lz.SelectionContext) -> str:
    if ctx.op.startswith("norm."):
        return "norm"
    if ctx.op.startswith("attention."):
        return "decode" if ctx.seq_len_q == 1 else "prefill"
    return "other"


def user_calls(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, repeats: int,
               min_sample_s: float, regimes: tuple[str, ...]) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """{regime: {"plain": us, "lz": us}} of the public call and of plain torch on the same tensors
    (each checked against the reference first), and notes on what could not be timed."""
    wl = workloads.workload(name)
    gen = torch.Generator(device=device).manual_seed(3)
    first = wl.make(shape, dtype, device, gen)
    sets = [first] + [wl.make(shape, dtype, device, gen) for _ in range(rotation_count(
        sum(a.numel() * a.element_size() for a in first if isinstance(a, torch.Tensor)), device) - 1)]
    reference, cut = workloads.reference_output(name, first)
    calls: dict[str, Callable[..., Any]] = {"lz": workloads.public_op(name)}
    if name in PLAIN:
        calls["plain"] = PLAIN[name](first)
    out: dict[str, dict[str, float | None]] = {g: {"plain": None, "lz": None} for g in regimes}
    notes = []
    for who, fn in calls.items():
        try:
            ok, err = compare(cut(fn(*first)), reference, dtype)
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            notes.append(f"{who}: {type(e).__name__}: {e}"[:200])
            continue
        if not ok:
            notes.append(f"{who} differs from the reference (max error {err:.3g}): not timed")
            continue
        n = calls_per_sample(fn, sets, device, min_sample_s)
        out["eager"][who] = time_calls(fn, sets, device, repeats=repeats, calls=n).median_us
        if "graph" in regimes:
            try:
                out["graph"][who] = time_graph(fn, sets, device, n, dtype=dtype, repeats=repeats).median_us
            except Exception as e:  # noqa: BLE001
                notes.append(f"{who}, graph: {e}"[:200])
    return out, notes


def measure_shape(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, kernels: str,
                  repeats: int, min_sample_s: float) -> dict[str, Any] | None:
    regimes = REGIMES if device.type == "cuda" else ("eager",)
    ctx = workloads.context_for(name, shape, dtype, device)
    contexts = {"eager": ctx, "graph": ctx.replace(graph_capture=True)}  # graph: the context of a captured call
    specs = tunable_kernels(ctx, kernels)
    label = f"{ctx.op} {'x'.join(map(str, shape))}"
    print(f"{label}: {', '.join(s.id for s in specs)}", file=sys.stderr, flush=True)
    if not specs:
        return None
    before = {g: pick(contexts[g], name) for g in regimes}
    _, tuned = measure(name, shape, dtype, device, specs, repeats=repeats, min_sample_s=min_sample_s, seed=1)
    lz.perfdb().record(tuned)
    runtime.measurements.reload()
    runtime.bump()
    after = {g: pick(contexts[g], name) for g in regimes}
    _, truth = measure(name, shape, dtype, device, specs, repeats=repeats, min_sample_s=min_sample_s, seed=2)
    users, notes = user_calls(name, shape, dtype, device, repeats, min_sample_s, regimes)
    row: dict[str, Any] = {"workload": name, "op": ctx.op, "shape": list(shape), "label": label, "kind": kind_of(ctx),
                           "wrong": sorted(r.kernel for r in truth if not r.correct),
                           "graph_notes": {r.kernel: r.graph_note for r in truth if r.correct and r.graph_note},
                           "notes": notes, "regimes": {}}
    for g in regimes:
        times = {r.kernel: f.median_us for r in truth if r.correct for f in (r.figure(g),) if f is not None}
        if not times:
            continue
        best = min(times, key=times.__getitem__)
        policies = {}  # only backends with a correct kernel timed here (render() fills the others in)
        for backend in sorted({s.backend for s in specs}):
            own = sorted((s for s in specs if s.backend == backend and s.id in times),
                         key=lambda s: (-priority_for(s, ctx), s.id))
            if own:
                policies[backend] = own[0].id

        def ratio(kernel: str, times: dict[str, float] = times, best: str = best) -> float:
            return times.get(kernel, math.inf) / times[best]  # a wrong, failed or uncaptured pick is infinite

        tuned_figures = [r.figure(g) for r in tuned if r.correct]
        row["regimes"][g] = {
            "best": best, "best_us": times[best], "before": before[g], "before_ratio": ratio(before[g]),
            "after": after[g], "after_ratio": ratio(after[g]),
            "tuned_confident": all(f is not None and f.confident for f in tuned_figures),
            "policies": {b: [k, ratio(k)] for b, k in policies.items()}, "times_us": times,
            "p95_over_median": {r.kernel: f.p95_us / f.median_us for r in truth if r.correct
                                for f in (r.figure(g),) if f is not None},
            "plain_us": users[g]["plain"], "lz_us": users[g]["lz"],
        }
    return row


# --- reporting ------------------------------------------------------------------------------------

def _fmt(x: float | None, spec: str = ".4g") -> str:
    return "-" if x is None or not math.isfinite(x) else format(x, spec)


def render(rows: list[dict[str, Any]], title: str) -> str:
    """The markdown report of `rows` (also of saved JSON: --render); its last lines are the summary table."""
    lines = [title, "",
             "ratio = time of the pick / time of the best correct candidate in that regime (second, independent "
             "timing pass); plain / lz = time of plain torch / time of the `lz.*` call on the same tensors (> 1: "
             "LayerZero faster); policy columns: always that backend (its highest-priority kernel that runs the "
             "shape; where it has none, torch's; where torch has none either, LayerZero's default pick)"]
    summary = []
    for g in REGIMES:
        part = [r for r in rows if g in r["regimes"]]
        if not part:
            continue
        backends = sorted({b for r in part for b in r["regimes"][g]["policies"]} - {"reference"})
        for r in part:
            m = r["regimes"][g]
            own = {b: k for b, k in m["policies"].items() if k[0].split(".", 1)[0] == b}
            fallback = own.get("torch", [m["before"], m["before_ratio"]])
            m["policies"] = {b: own.get(b, fallback) for b in backends}
        what = ("N back-to-back calls between two events; per call about max(host, device)" if g == "eager"
                else "the same N calls replayed from one CUDA graph: device time")
        lines += ["", f"## {g} ({what})", "",
                  "| shape | best (us) | before | after | plain torch (us) | lz call (us) | plain / lz | "
                  + " | ".join(f"always {b}" for b in backends) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(backends)]
        for r in part:
            m = r["regimes"][g]
            speed = m["plain_us"] / m["lz_us"] if m["plain_us"] and m["lz_us"] else None
            flag = "" if m["tuned_confident"] else " (noisy)"
            pol = " | ".join(_fmt(m["policies"][b][1], ".3f") for b in backends)
            lines.append(f"| {r['label']} | {m['best']} ({_fmt(m['best_us'])}) | {m['before']} {_fmt(m['before_ratio'], '.3f')}"
                         f" | {m['after']} {_fmt(m['after_ratio'], '.3f')}{flag} | {_fmt(m['plain_us'])} | "
                         f"{_fmt(m['lz_us'])} | {_fmt(speed, '.3f')} | {pol} |")
        after = [r["regimes"][g]["after_ratio"] for r in part]
        before = geomean([r["regimes"][g]["before_ratio"] for r in part])
        vs_plain = {r["label"]: r["regimes"][g]["plain_us"] / r["regimes"][g]["lz_us"] for r in part
                    if r["kind"] in ("prefill", "decode", "norm") and r["regimes"][g]["plain_us"]
                    and r["regimes"][g]["lz_us"]}
        worst_label = min(vs_plain, key=vs_plain.__getitem__) if vs_plain else None
        g_after, worst = geomean(after), max(after)
        limits = {"eager": (1.02, 1.05), "graph": (1.03, 1.10)}[g]
        policies = ", ".join(f"{b} {geomean([r['regimes'][g]['policies'][b][1] for r in part]):.3f}" for b in backends)
        checks = [("after geomean", g_after <= limits[0]), ("after worst", worst <= limits[1]),
                  ("before geomean", before <= 1.05)]
        if vs_plain:
            checks += [("vs plain geomean >= 1.05", geomean(list(vs_plain.values())) >= 1.05),
                       ("no shape < 0.98 of plain", min(vs_plain.values()) >= 1 / 1.02)]
        summary.append(f"| {g} | {len(part)} | {before:.3f} | {g_after:.3f} | {worst:.3f} | "
                       f"{_fmt(geomean(list(vs_plain.values())), '.3f')} | "
                       f"{_fmt(vs_plain.get(worst_label), '.3f')} {worst_label or ''} | {policies} | "
                       + ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in checks) + " |")
    wrong = sorted({k for r in rows for k in r["wrong"]})
    if wrong:
        lines += ["", "kernels that failed the reference check on some shape (never selected there): " + ", ".join(wrong)]
    uncaptured = sorted({f"{k}: {note}" for r in rows for k, note in r.get("graph_notes", {}).items()
                         if not note.startswith("no CUDA graphs")})
    if uncaptured:
        lines += ["", "no graph figure: " + "; ".join(uncaptured)]
    notes = [f"{r['label']}: {n}" for r in rows for n in r.get("notes", [])]
    if notes:
        lines += ["", "plain torch / lz call notes: " + "; ".join(notes)]
    lines += ["", "## summary (targets: after eager <= 1.02 geomean / 1.05 worst, graph <= 1.03 / 1.10; before <= "
              "1.05; plain / lz >= 1.05 geomean over prefill, decode and norm shapes, none below 0.98)", "",
              "| regime | shapes | before geomean | after geomean | after worst | plain / lz geomean | slowest vs plain "
              "| single-backend policies (geomean) | targets |", "|---|---|---|---|---|---|---|---|---|", *summary]
    return "\n".join(lines)


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    words = re.findall(r"[A-Za-z]*\d+[A-Za-z]*", torch.cuda.get_device_name(device))
    return (words[0] if words else "cuda").lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few shapes (on CPU: tiny ones)")
    parser.add_argument("--only", default="*", help="glob on workload names or row labels ('attention*', '*rms*')")
    parser.add_argument("--kernels", default="*", help="glob on kernel ids or backends (e.g. 'torch.*')")
    parser.add_argument("--repeats", type=int, default=None, help="samples per figure (default 20, --quick 5)")
    parser.add_argument("--out", default=None, help="markdown file (a .json beside it gets the rows); default "
                        "benchmarks/results/regret-<device>[-quick].md")
    parser.add_argument("--render", nargs="+", default=None, help="re-render saved .json files as one report "
                        "(no measuring; with --out, their rows joined go to the .json beside it); the title is the "
                        "first one's")
    args = parser.parse_args(argv)
    if args.render:
        saved = [json.loads(Path(p).read_text()) for p in args.render]
        joined = {**saved[0], "rows": [r for s in saved for r in s["rows"]]}
        if args.out:  # the joined rows first: render() rewrites their policy columns
            Path(args.out).with_suffix(".json").write_text(json.dumps(joined, indent=1, default=str))
        text = render(joined["rows"], joined["title"])
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
        return 0
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = (QUICK if args.quick else SHAPES) if cuda else (CPU_QUICK if args.quick else CPU_SHAPES)
    shapes = [(n, s) for n, s in shapes if n in workloads.WORKLOADS]
    repeats = args.repeats or (5 if args.quick else 20)
    min_sample_s = (2e-3 if cuda else 5e-3) if not args.quick else (1e-3 if cuda else 5e-4)
    out = Path(args.out) if args.out else RESULTS / f"regret-{device_slug(device)}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    title = (f"# selection regret on {name}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}, "
             f"{datetime.date.today()}{' (--quick)' if args.quick else ''}")
    lz.perfdb(Path(tempfile.mkdtemp()) / "regret_perfdb.sqlite")  # fresh: "before" is priorities only
    runtime.ensure_loaded()
    rows: list[dict[str, Any]] = []
    for i, (workload, shape) in enumerate(shapes, 1):
        label = f"{workload} {'x'.join(map(str, shape))}"
        if not (fnmatch.fnmatchcase(workload, args.only) or fnmatch.fnmatchcase(label, args.only)):
            continue
        print(f"[{i}/{len(shapes)}] ", end="", file=sys.stderr)
        row = measure_shape(workload, shape, dtype, device, args.kernels, repeats, min_sample_s)
        if row is not None and row["regimes"]:
            rows.append(row)
            out.with_suffix(".json").write_text(json.dumps(
                {"title": title, "device": name, "dtype": str(dtype), "torch": torch.__version__,
                 "date": str(datetime.date.today()), "quick": args.quick, "rows": rows}, indent=1, default=str))
        if cuda:
            torch.cuda.empty_cache()
    text = render(rows, title)
    out.write_text(text + "\n")
    print(f"{len(rows)} shapes in {time.perf_counter() - started:.1f} s; wrote {out} and {out.with_suffix('.json')}",
          file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
