"""Paged-KV decode attention on the GPU: our Triton kernel (triton_paged.decode) vs gather + torch SDPA
vs FlashInfer's BatchDecodeWithPagedKVCacheWrapper (when importable), over batch x context up to KV >= 1 GB.

    PYTHONPATH=src python3 benchmarks/paged_decode.py          # OUT=dir also writes paged_decode.{md,json}

Achieved bandwidth = bytes of K and V read (2 * sum(seq_lens) * Hkv * D * element size) / median time;
"% copy" compares it with the H100's measured device copy bandwidth, 3.0 TB/s (../shared/gpu/README.md),
which counts read + write bytes. Times: triton.testing.do_bench medians; every KV set here but the
smallest is larger than L2 (50 MB), so the K/V reads come from HBM. Pages are a random permutation.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

COPY_GBPS = 3000.0
HQ, HKV, D, PAGE = 32, 8, 128, 16
SHAPES = [  # (batch, context tokens per sequence)
    (1, 8192), (1, 131072), (8, 4096), (8, 32768), (16, 32768), (32, 16384), (64, 8192), (128, 4096), (128, 8192),
    (256, 2048),
]
TUNE_SHAPES = [(8, 32768), (16, 32768), (128, 8192)]  # launch-config sweep for our kernel (helps tune the heuristics)


def kv_bytes(seq_lens: torch.Tensor, dtype: torch.dtype) -> int:
    return 2 * int(seq_lens.sum()) * HKV * D * torch.tensor([], dtype=dtype).element_size()


def make_inputs(batch: int, ctx: int, dtype: torch.dtype, layout: str = "NHD", ragged: bool = False):
    pages_per_seq = -(-ctx // PAGE)
    num_pages = batch * pages_per_seq
    shape = (num_pages, PAGE, HKV, D) if layout == "NHD" else (num_pages, HKV, PAGE, D)
    k_cache = torch.randn(shape, dtype=dtype, device="cuda")
    v_cache = torch.randn(shape, dtype=dtype, device="cuda")
    page_table = torch.randperm(num_pages, device="cuda").reshape(batch, pages_per_seq).to(torch.int32)
    if ragged:
        seq_lens = torch.randint(1, ctx + 1, (batch,), device="cuda", dtype=torch.int32)
    else:
        seq_lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, 1, HQ, D, dtype=dtype, device="cuda")
    return q, k_cache, v_cache, page_table, seq_lens


def gather_sdpa(q, k_cache, v_cache, page_table, seq_lens):
    """The no-paged-kernel baseline: gather every sequence's pages into a dense (B, Hkv, S, D) + SDPA."""
    import torch.nn.functional as F

    B, n = page_table.shape
    k = k_cache[page_table.long()].reshape(B, n * PAGE, HKV, D).transpose(1, 2)
    v = v_cache[page_table.long()].reshape(B, n * PAGE, HKV, D).transpose(1, 2)
    pos = torch.arange(n * PAGE, device=q.device)
    mask = (pos[None, :] < seq_lens[:, None])[:, None, None, :]
    return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


def flashinfer_runner(q, k_cache, v_cache, page_table, seq_lens):
    """A callable running FlashInfer's paged decode (planned once, outside the timing), or None."""
    try:
        import flashinfer
    except Exception:
        return None
    B, n = page_table.shape
    pages = -(-seq_lens // PAGE)
    indptr = torch.zeros(B + 1, dtype=torch.int32, device=q.device)
    indptr[1:] = torch.cumsum(pages, 0)
    indices = torch.cat([page_table[b, : int(pages[b])] for b in range(B)]).to(torch.int32)
    last = (seq_lens - (pages - 1) * PAGE).to(torch.int32)
    workspace = torch.empty(128 << 20, dtype=torch.uint8, device=q.device)
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD")
    try:
        wrapper.plan(indptr, indices, last, HQ, HKV, D, PAGE, q_data_type=q.dtype, kv_data_type=k_cache.dtype)
    except TypeError:
        wrapper.plan(indptr, indices, last, HQ, HKV, D, PAGE, data_type=q.dtype)
    q3 = q[:, 0].contiguous()
    return lambda: wrapper.run(q3, (k_cache, v_cache)).unsqueeze(1)


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 1
    from layerzero.backends import triton_paged as tp

    dtype = torch.bfloat16
    device = torch.cuda.get_device_name()
    rows, tune_rows = [], []
    print(f"# paged decode, {device}, torch {torch.__version__}, Hq={HQ} Hkv={HKV} D={D} page={PAGE} {dtype}, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    shapes = [(b, c, False) for b, c in SHAPES] + [(64, 16384, True)]
    for batch, ctx, ragged in shapes:
        q, kc, vc, pt, sl = make_inputs(batch, ctx, dtype, ragged=ragged)
        nbytes = kv_bytes(sl, dtype)
        ours = lambda: tp.paged_decode(q, kc, vc, pt, sl, True, None, None, 0.0, "NHD")  # noqa: E731
        ref = gather_sdpa(q, kc, vc, pt, sl) if nbytes < (12 << 30) else None
        candidates = {"triton_paged.decode": ours}
        if ref is not None:
            candidates["gather+sdpa"] = lambda: gather_sdpa(q, kc, vc, pt, sl)
        fi = None
        try:
            fi = flashinfer_runner(q, kc, vc, pt, sl)
        except Exception as e:  # a broken optional library must not stop the benchmark
            print(f"  flashinfer unavailable: {type(e).__name__}: {e}", flush=True)
        if fi is not None:
            candidates["flashinfer.decode"] = fi
        out_ours = ours()
        for name, fn in candidates.items():
            try:
                out = fn()
                err = rel_err(out, ref if ref is not None else out_ours)
                ms = bench(fn)
            except Exception as e:
                print(f"  {name} failed: {type(e).__name__}: {e}", flush=True)
                continue
            gbps = nbytes / ms / 1e6
            row = dict(batch=batch, ctx=ctx, ragged=ragged, kv_mb=round(nbytes / 2**20), kernel=name, ms=round(ms, 4),
                       gbps=round(gbps), pct_copy=round(100 * gbps / COPY_GBPS, 1), rel_err=float(f"{err:.2e}"),
                       splits=tp.plan_launch(batch, HKV, HQ // HKV, D, pt.shape[1] * PAGE)["num_splits"])
            rows.append(row)
            print(f"  B={batch:<4} ctx={ctx:<7}{' ragged' if ragged else ''} KV={row['kv_mb']:>6} MB {name:<20} "
                  f"{ms:8.4f} ms {gbps:7.0f} GB/s {row['pct_copy']:5.1f}% rel_err={err:.1e}", flush=True)
        del q, kc, vc, pt, sl, ref
        torch.cuda.empty_cache()

    for batch, ctx in TUNE_SHAPES:
        q, kc, vc, pt, sl = make_inputs(batch, ctx, dtype)
        nbytes = kv_bytes(sl, dtype)
        base = tp.plan_launch(batch, HKV, HQ // HKV, D, pt.shape[1] * PAGE)["num_splits"]
        split_choices = sorted({min(tp.MAX_SPLITS, x) for x in (base, base + base // 2, base * 2, base * 3, 16, 33)})
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    for splits in split_choices:
                        fn = lambda: tp.paged_decode(q, kc, vc, pt, sl, True, None, None, 0.0, "NHD",  # noqa: E731
                                                     block_n=block_n, num_splits=splits, num_warps=warps,
                                                     num_stages=stages)
                        try:
                            ms = bench(fn)
                        except Exception as e:
                            print(f"  config bn={block_n} w={warps} st={stages} sp={splits} failed: {e}", flush=True)
                            continue
                        tune_rows.append(dict(batch=batch, ctx=ctx, block_n=block_n, warps=warps, stages=stages,
                                              splits=splits, ms=round(ms, 4), gbps=round(nbytes / ms / 1e6)))
        del q, kc, vc, pt, sl
        torch.cuda.empty_cache()

    lines = [f"# paged decode ({device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')})", "",
             f"Hq={HQ}, Hkv={HKV}, D={D}, page={PAGE}, bf16, NHD. GB/s = K+V bytes read / median time; "
             f"% = of {COPY_GBPS:.0f} GB/s measured copy bandwidth.", "",
             "| batch | ctx | KV MB | kernel | ms | GB/s | % copy | rel err | splits |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        ctx = f"{r['ctx']}{' (ragged)' if r['ragged'] else ''}"
        lines.append(f"| {r['batch']} | {ctx} | {r['kv_mb']} | {r['kernel']} | {r['ms']} | {r['gbps']} | "
                     f"{r['pct_copy']} | {r['rel_err']:.1e} | {r['splits']} |")
    big = [r for r in rows if r["kernel"] == "triton_paged.decode" and r["kv_mb"] >= 1024]
    if big:
        worst = min(big, key=lambda r: r["pct_copy"])
        lines += ["", f"triton_paged.decode on KV >= 1 GB: min {worst['pct_copy']}% of copy bandwidth "
                      f"(B={worst['batch']}, ctx={worst['ctx']}); target 80%: "
                      f"{'met' if worst['pct_copy'] >= 80 else 'NOT met'}."]
    if tune_rows:
        lines += ["", "## launch-config sweep (triton_paged.decode), best 8 per shape", "",
                  "| batch | ctx | block_n | warps | stages | splits | ms | GB/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for shape in TUNE_SHAPES:
            best = sorted((r for r in tune_rows if (r["batch"], r["ctx"]) == shape), key=lambda r: r["ms"])[:8]
            lines += [f"| {r['batch']} | {r['ctx']} | {r['block_n']} | {r['warps']} | {r['stages']} | {r['splits']} | "
                      f"{r['ms']} | {r['gbps']} |" for r in best]
    table = "\n".join(lines)
    print("\n" + table)
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "paged_decode.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(out_dir, "paged_decode.json"), "w") as f:
            json.dump({"device": device, "torch": torch.__version__, "rows": rows, "tune": tune_rows}, f, indent=1)
    return 0 if all(math.isfinite(r["ms"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
