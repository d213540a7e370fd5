"""How fast one kernel a product reads a decode step's weights on this card: the ceiling of a step made
of one kernel per matrix product (issue 14: 1,000 tok/s for the 1.5B RWKV-7 at batch 1 is a whole step
in 1.0 ms, its ~2.8 GB of weights read at ~2.8 TB/s).

For each weight shape of the RWKV-7 step (bf16, [out, in]), as many distinct copies as one step reads
(so that the 50 MB L2 cache holds none of them from one read to the next), one CUDA graph of a kernel
per copy, at each batch size, three ways:

- `read`: `W.sum(dtype=float32)`, a kernel that only reads the bytes (no product);
- `cuBLAS`: `x @ W.T` (torch.matmul);
- `ours`: `rwkv_triton`'s tuned `_gemv`, the products of the Triton step (one segment a launch here;
  the step puts r, k and v in one launch). Its grid is one program per 16-64 output rows, whole rows
  of K each: 32-128 programs for a [2048, *] matrix on a card of 132 SMs;
- `splitk`: the same product with K split as well (a question, not a library kernel: this file's
  `_splitk`, tuned over tile and split, adding fp32 partial sums atomically into a zeroed buffer, the
  zeroing timed with it), to see what more programs in flight buy;
- `rows` (batch 1 only): whole rows of W read straight into registers and multiplied without tensor
  cores (`grid_barrier.py`'s `_rows`: 8-32 rows a program, K in chunks of 512 to 2,048, no masks),
  each tile timed on the graph of all the copies and the fastest kept (printed). A question, too: on
  a chain of [2048, 2048] products it took 4.41 us a product against 7.46 for `_gemv`'s best tile.

Then every product of a step in the order a step runs them (per layer r, k, v, the eight LoRA stages,
o, the channel mix's key and value; then the head) as one graph, cuBLAS and ours: the time a step
spends in products alone, and the tok/s that leaves as a ceiling. Times: median of 5 replays after 2.

    python benchmarks/bandwidth.py [--shape 1.5b|7b|tiny] [--batch 1 32] [--out DIR]

`--shape tiny` (2 layers, width 256) runs on the CPU too (plain calls, Triton's interpreter), to try
the script without a GPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import cuda_time  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # (the CPU-only check of this script needs Triton too: its interpreter)
    triton = None

SHAPES = {"1.5b": (24, 2048, 65536), "7b": (32, 4096, 65536), "tiny": (2, 256, 1024)}
LORA = (64, 64, 32, 128)  # RWKV-7's decay, in-context rate, value and gate LoRA widths at the 1.5B shape


def timed(fn, device) -> float:
    """Median seconds of fn() over 5 runs after 2: CUDA events on CUDA (gpu.py's `cuda_time`), else the
    wall clock."""
    if device.type == "cuda":
        return cuda_time(fn, warmup=2, reps=5)
    for _ in range(2):
        fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def as_graph(calls, device):
    """One callable running `calls` in order: captured in a CUDA graph on CUDA (after one eager run,
    which also lets Triton tune), else called one by one."""
    def run():
        for c in calls:
            c()

    if device.type != "cuda":
        return run
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return g.replay


if triton is not None:
    @triton.jit
    def _splitk_kernel(x_ptr, w_ptr, out_ptr, B, N, K, K_PER, UPCAST: tl.constexpr, BLOCK_B: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[b, n] += sum over k in this program's K slice of x[b, k] W[n, k] (fp32, atomically)."""
        ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        bs = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
        k_lo = tl.program_id(1) * K_PER
        acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
        for k0 in range(k_lo, k_lo + K_PER, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            wt = tl.load(w_ptr + ns[:, None] * K + ks[None, :], mask=(ns[:, None] < N) & (ks[None, :] < K), other=0.0)
            xt = tl.load(x_ptr + bs[:, None] * K + ks[None, :], mask=(bs[:, None] < B) & (ks[None, :] < K), other=0.0)
            if UPCAST:  # (Triton's interpreter multiplies bf16 tiles wrongly)
                xt, wt = xt.to(tl.float32), wt.to(tl.float32)
            acc += tl.dot(xt, tl.trans(wt))
        tl.atomic_add(out_ptr + bs[:, None] * N + ns[None, :], acc, mask=(bs[:, None] < B) & (ns[None, :] < N))

    _SPLITK_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp}, num_warps=4, num_stages=3)
                       for bn in (16, 32, 64) for bk in (64, 128) for sp in (1, 4, 8, 16)]

    def _splitk_call(x, w, acc, BLOCK_N, BLOCK_K, SPLIT):
        B, K = x.shape
        N = w.shape[0]
        k_per = triton.cdiv(triton.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
        block_b = 16 if B <= 16 else 32 if B <= 32 else 64
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, k_per), triton.cdiv(B, block_b))
        _splitk_kernel[grid](x, w, acc, B, N, K, k_per, UPCAST=x.device.type != "cuda", BLOCK_B=block_b,
                             BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)

    _SPLITK_BEST = {}

    def splitk(x, w, acc):
        """acc (fp32, [B, N]) = x @ w.T with K split: the config that ran fastest for this shape (tuned on
        the first call, each config checked against the fp32 product)."""
        key = (tuple(x.shape), tuple(w.shape))
        if key not in _SPLITK_BEST:
            configs = _SPLITK_CONFIGS if x.is_cuda else _SPLITK_CONFIGS[:1]
            want = x.float() @ w.float().T
            best = None
            for c in configs:
                run = lambda c=c: (acc.zero_(), _splitk_call(x, w, acc, **c.kwargs))  # noqa: E731
                run()
                if float((acc - want).abs().max()) > 2e-2 * float(want.abs().max()):
                    raise AssertionError(f"split-K {c.kwargs} computes another product")
                t = timed(run, x.device)
                if best is None or t < best[0]:
                    best = (t, c.kwargs)
            _SPLITK_BEST[key] = best[1]
        acc.zero_()
        _splitk_call(x, w, acc, **_SPLITK_BEST[key])


def rows_tiles(n: int, k: int) -> list:
    """(rows a program, K chunk, warps) for `rows` on an [n, k] matrix: every tile that divides it."""
    chunks = sorted({c for c in (512, 1024, 2048) if k % c == 0} | ({k} if k <= 2048 else set()))
    return [(r, c, nw) for r in (8, 16, 32) if n % r == 0 for c in chunks for nw in (4, 8)]


def rows_call(x, w, out, tile):
    """out[0] = W x[0] by `grid_barrier._rows` with `tile` (rows a program, K chunk, warps)."""
    from grid_barrier import _rows

    r, c, nw = tile
    return lambda: _rows[(w.shape[0] // r,)](w, x, out, w.shape[1], BLOCK_R=r, BLOCK_K=c, num_warps=nw)


def product(way: str, x, w, out):
    """A call computing x @ w.T (`cublas` and `ours` into out, `splitk` into an fp32 buffer of its own)
    or reading w (`read`): one kernel, `splitk` two (the zeroing)."""
    from rwkv_hf.modeling.rwkv_triton import ACT_NONE, _gemv_call, segment_table

    if way == "read":
        total = torch.empty((), device=w.device, dtype=torch.float32)
        return lambda: torch.sum(w, dim=(0, 1), dtype=torch.float32, out=total)
    if way == "cublas":
        return lambda: torch.matmul(x, w.T, out=out)
    if way == "splitk":
        acc = torch.empty(out.shape, device=out.device, dtype=torch.float32)
        return lambda: splitk(x, w, acc)
    # `ours`: one segment, (N, row 0, offset 0, no activation, layout [N, K])
    meta = segment_table([(w.shape[0], 0, 0, ACT_NONE, 0)], w.shape[1], w.device)
    return lambda: _gemv_call(x, out, meta, [w], w.shape[0])


def step_matrices(L: int, C: int, V: int, device, dtype):
    """The [out, in] weights of one step, in the order a step multiplies by them."""
    mk = lambda n, k: torch.randn(n, k, device=device, dtype=dtype) / k**0.5  # noqa: E731
    mats = []
    for _ in range(L):
        mats += [mk(C, C) for _ in range(3)]  # r, k, v
        for d in LORA:
            mats += [mk(d, C), mk(C, d)]  # a LoRA's two stages
        mats += [mk(C, C), mk(4 * C, C), mk(C, 4 * C)]  # o, the channel mix's key and value
    return mats + [mk(V, C)]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.shape != "tiny":
        raise SystemExit("bandwidth.py: no CUDA device here; --shape tiny tries the script on the CPU")
    L, C, V = SHAPES[args.shape]
    dtype = torch.bfloat16
    mats = step_matrices(L, C, V, device, dtype)
    groups = {}  # shape -> the step's copies of it
    for w in mats:
        groups.setdefault(tuple(w.shape), []).append(w)
    total_gb = sum(w.numel() * w.element_size() for w in mats) / 1e9
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}; {args.shape} RWKV-7 step: {L} layers, width {C}, "
          f"{len(mats)} products, {total_gb:.2f} GB of weights", flush=True)
    res = {"device": name, "torch": torch.__version__, "shape": args.shape, "step_gb": total_gb, "rows": [], "step": []}
    ways = ("read", "cublas", "ours", "splitk", "rows")
    best_rows = {}  # shape -> (seconds, tile) of `rows` at batch 1
    print("| [out, in] | MB | copies | batch | " + " | ".join(f"{w} TB/s (us a kernel)" for w in ways) + " |")
    print("| --- | ---: | ---: | ---: | " + " | ".join("---:" for _ in ways) + " |")
    for B in args.batch:
        for shape, ws in sorted(groups.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
            n, k = shape
            x = torch.randn(B, k, device=device, dtype=dtype)
            out = torch.empty(B, n, device=device, dtype=dtype)
            row = {"shape": shape, "batch": B, "copies": len(ws)}
            product("ours", x, ws[0], out)()  # the kernel computes the product it is timed as
            want = (x.float() @ ws[0].float().T)
            err = float((out.float() - want).abs().max() / want.abs().max())
            assert err < 2e-2, f"_gemv of {shape} at batch {B}: {err:.2e} of the largest product off"
            for way in ways:
                if way == "rows":
                    if B != 1:
                        continue
                    tiles = rows_tiles(n, k)
                    for tile in tiles if device.type == "cuda" else tiles[:1]:
                        rows_call(x, ws[0], out, tile)()
                        err = float((out.float() - want).abs().max() / want.abs().max())
                        assert err < 2e-2, f"rows {tile} of {shape}: {err:.2e} of the largest product off"
                        s = timed(as_graph([rows_call(x, w, out, tile) for w in ws], device), device)
                        if shape not in best_rows or s < best_rows[shape][0]:
                            best_rows[shape] = (s, tile)
                    s, row["rows_tile"] = best_rows[shape]
                else:
                    s = timed(as_graph([product(way, x, w, out) for w in ws], device), device)
                row[way] = {"tb_s": len(ws) * n * k * 2 / s / 1e12, "us": s / len(ws) * 1e6}
            res["rows"].append(row)
            cells = [f"{row[w]['tb_s']:.2f} ({row[w]['us']:.1f})" if w in row else "-" for w in ways]
            tile = f" (rows: {row['rows_tile']})" if "rows_tile" in row else ""
            print(f"| {n} x {k} | {n * k * 2 / 1e6:.1f} | {len(ws)} | {B} | " + " | ".join(cells) + f" |{tile}", flush=True)
        outs = {}
        calls = {way: [] for way in ("cublas", "ours", "splitk") + (("rows",) if B == 1 else ())}
        for w in mats:
            n, k = w.shape
            x = torch.randn(B, k, device=device, dtype=dtype)
            outs.setdefault(n, torch.empty(B, n, device=device, dtype=dtype))
            for way in calls:
                calls[way].append(rows_call(x, w, outs[n], best_rows[(n, k)][1]) if way == "rows"
                                  else product(way, x, w, outs[n]))
        for way, cs in calls.items():
            s = timed(as_graph(cs, device), device)
            res["step"].append({"batch": B, "way": way, "ms": s * 1e3, "tb_s": total_gb / s / 1e3, "tok_s": B / s})
            print(f"all {len(mats)} products of a step, batch {B}, {way}: {s * 1e3:.3f} ms ({total_gb / s / 1e3:.2f} TB/s), "
                  f"a ceiling of {B / s:,.0f} tok/s for a step of one kernel a product", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bandwidth.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
