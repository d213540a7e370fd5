"""What a decode step of one kernel for all its stages could buy (issue 14): the same chain of dependent
matrix-vector products run as one launch per stage in a CUDA graph, and as one persistent kernel whose
programs wait for each other between stages (a grid-wide barrier: flags in global memory, one per
program).

A stage is y = W_s x with x the stage before's output: S distinct [C, C] bf16 matrices (so that L2
holds none of them), fp32 vectors. The 1.5B RWKV-7 step has about 170 dependent launches (seven a
layer), its products mostly [2048, 2048]-sized; the defaults are that chain. Rows of the table:

- `launches`: one `_rows` launch per stage, captured in one CUDA graph;
- `persistent`: one launch, every program looping over the stages, waiting at the barrier;
- `persistent, no barrier`: the same without waiting (wrong sums: how fast the reads alone go);
- with `--block-k` equal to the width, also `persistent, next weights ahead` (with and without the
  barrier): each program holds its rows of a whole matrix and loads the next stage's before it waits;
- `--gemv`: also the chain through `rwkv_triton._gemv_call`, the Triton decode step's product kernel
  (tensor-core tiles, K in a loop, maybe split), with each of the tiles its step tuning chooses from:
  what the step's products give on the same chain.

The persistent rows need every program resident at once (width / rows <= the card's SMs).

Times: median of 5 replays after 2, CUDA events; microseconds a stage and TB/s of weights read. The
persistent rows with the barrier must end on the launches' last vector (printed: the largest
difference; the rows without it do not).

    python benchmarks/grid_barrier.py [--stages 168] [--width 2048] [--rows 16] [--block-k 256] [--warps 4]
                                      [--gemv] [--out DIR]

Needs CUDA: under Triton's interpreter the programs run one after another and the barrier would wait
for ever.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import cuda_time  # noqa: E402


@triton.jit
def _product_rows(w_ptr, x_ptr, y_ptr, C, row0, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[row0 : row0 + BLOCK_R] = W[rows] x, fp32 sums; x read from L2 (another program wrote it)."""
    rows = row0 + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None] * C + cols[None, :]).to(tl.float32)
        x = tl.load(x_ptr + cols, cache_modifier=".cg")
        acc += tl.sum(w * x[None, :], axis=1)
    tl.store(y_ptr + rows, acc)


@triton.jit
def _rows(w_ptr, x_ptr, y_ptr, C, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    _product_rows(w_ptr, x_ptr, y_ptr, C, tl.program_id(0) * BLOCK_R, BLOCK_R, BLOCK_K)


@triton.jit
def _all_reach(flags_ptr, pid, stage, PROGRAMS: tl.constexpr):
    """The grid-wide barrier: raise this program's flag to `stage`, wait until every program's is there."""
    every = tl.arange(0, PROGRAMS)
    tl.debug_barrier()  # the program's stores are issued before its flag goes up
    tl.atomic_xchg(flags_ptr + pid, stage, sem="release", scope="gpu")
    seen = tl.min(tl.atomic_add(flags_ptr + every, 0, sem="acquire", scope="gpu"), axis=0)
    while seen < stage:
        seen = tl.min(tl.atomic_add(flags_ptr + every, 0, sem="acquire", scope="gpu"), axis=0)
    tl.debug_barrier()


@triton.jit
def _persistent(w_ptr, xs_ptr, flags_ptr, S, C, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PROGRAMS: tl.constexpr,
                WAIT: tl.constexpr, AHEAD: tl.constexpr):
    """Stage s reads xs[s % 2] and writes its rows of xs[(s + 1) % 2], then waits at the barrier (WAIT).
    AHEAD (BLOCK_K = C): the program's rows of the next stage's matrix are loaded before it waits, so
    that their reading overlaps the wait."""
    pid = tl.program_id(0)
    if AHEAD:
        rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_K)
        tile = rows[:, None] * C + cols[None, :]
        w = tl.load(w_ptr + tile)
        for s in range(S):
            x = tl.load(xs_ptr + (s % 2) * C + cols, cache_modifier=".cg")
            tl.store(xs_ptr + ((s + 1) % 2) * C + rows, tl.sum(w.to(tl.float32) * x[None, :], axis=1))
            w = tl.load(w_ptr + tl.minimum(s + 1, S - 1).to(tl.int64) * C * C + tile)
            if WAIT:
                _all_reach(flags_ptr, pid, s + 1, PROGRAMS)
    else:
        for s in range(S):
            _product_rows(w_ptr + s.to(tl.int64) * C * C, xs_ptr + (s % 2) * C, xs_ptr + ((s + 1) % 2) * C, C,
                          pid * BLOCK_R, BLOCK_R, BLOCK_K)
            if WAIT:
                _all_reach(flags_ptr, pid, s + 1, PROGRAMS)


def gemv_rows(w, x0, xs, S, C):
    """The chain through `_gemv_call` (one row of x, fp32, as the step's), one entry per tile: each tile
    the step's tuning would time for this kind of launch, set as the one it chose (`_CHOSEN`). The kind
    (its tuning key) and its tiles are those `_gemv_call` records for `tune_step`."""
    from rwkv_hf.modeling import rwkv_triton as rt

    meta = rt.segment_table([(C, 0, 0, rt.ACT_NONE, 0)], C, xs.device)
    rt._RECORD = {}
    try:
        rt._gemv_call(xs[0:1], xs[1:2], meta, [w[0]], C)
        ((key, recorded),) = rt._RECORD.items()
    finally:
        rt._RECORD = None
    out = []
    for cfg in recorded["configs"]:
        def run(cfg=cfg):
            rt._CHOSEN[key] = cfg
            xs[0].copy_(x0)
            for s in range(S):
                rt._gemv_call(xs[s:s + 1], xs[s + 1:s + 2], meta, [w[s]], C)
        out.append((f"_gemv {rt._describe(cfg)}", run, lambda: xs[S]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, default=168)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=16, help="output rows a program (width / rows programs)")
    ap.add_argument("--block-k", type=int, default=256)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--gemv", action="store_true", help="also the chain through rwkv_triton's _gemv, each of its tiles")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    S, C, R = args.stages, args.width, args.rows
    programs = C // R
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if programs & (programs - 1) or programs * R != C:
        raise SystemExit("width / rows must be a power of two")
    resident = programs <= sms  # the persistent kernel's programs must all run at once, or the barrier waits for ever
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(S, C, C, device="cuda", generator=g) / C ** 0.5).to(torch.bfloat16)
    x0 = torch.randn(C, device="cuda", generator=g)
    gb = w.numel() * 2 / 1e9
    kw = dict(BLOCK_R=R, BLOCK_K=args.block_k, num_warps=args.warps)
    res = {"card": torch.cuda.get_device_name(), "stages": S, "width": C, "programs": programs, "GB": gb, "rows": {}}
    print(f"{res['card']}: {S} stages of [{C}, {C}] bf16 ({gb:.2f} GB), {programs} programs of {R} rows", flush=True)

    xs = torch.zeros(S + 1, C, device="cuda")

    def launches():
        xs[0].copy_(x0)
        for s in range(S):
            _rows[(programs,)](w[s], xs[s], xs[s + 1], C, **kw)

    ping = torch.zeros(2, C, device="cuda")
    flags = torch.zeros(programs, dtype=torch.int32, device="cuda")

    def persistent(wait, ahead=False):
        def run():
            ping[0].copy_(x0)
            flags.zero_()
            _persistent[(programs,)](w, ping, flags, S, C, PROGRAMS=programs, WAIT=wait, AHEAD=ahead, **kw)
        return run

    outs = {}
    rows = [("launches", launches, lambda: xs[S])]
    if resident:
        rows += [("persistent", persistent(True), lambda: ping[S % 2]),
                 ("persistent, no barrier", persistent(False), lambda: ping[S % 2])]
    if resident and args.block_k == C:
        rows += [("persistent, next weights ahead", persistent(True, True), lambda: ping[S % 2]),
                 ("persistent, next weights ahead, no barrier", persistent(False, True), lambda: ping[S % 2])]
    if args.gemv:
        rows += gemv_rows(w, x0, xs, S, C)
    for name, fn, out in rows:
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        seconds = cuda_time(graph.replay)
        outs[name] = out().clone()
        us = seconds * 1e6 / S
        res["rows"][name] = {"us_a_stage": round(us, 2), "TB_s": round(gb / seconds / 1e3, 2)}
        print(f"{name}: {us:.2f} us a stage, {gb / seconds / 1e3:.2f} TB/s", flush=True)
    scale = float(outs["launches"].abs().max())
    # (the _gemv rows round x to bf16 before each product: their chains part from the fp32 ones)
    res["difference"] = {name: float((out - outs["launches"]).abs().max()) / scale for name, out in outs.items()
                         if not name.startswith("_gemv")}
    print("largest difference from the launches' last vector, of its largest: "
          + ", ".join(f"{name} {d:.2e}" for name, d in res["difference"].items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "grid_barrier.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
