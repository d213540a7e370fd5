"""Where the Triton step's time goes on one GPU: the captured step timed whole, then with one kind of
launch left out, in one process.

The 1.5B-shaped model of `gpu.py` (bf16, random weights; RWKV-7 unless --version). For each batch
size a decoder (`RwkvGraphDecoder(triton=True)`) tunes its tiles and captures its step as a user's
would; then `rwkv_triton.triton_step` on that decoder's state and plan is captured again for each
row below, the kernels of one kind replaced by nothing (the state becomes garbage; the times do
not depend on it), and timed as `tune_step` times tiles (`rwkv_triton._graph_us`: a median of
replays, behind an untimed one). "without X" - "whole" is what X costs inside the step, the launch
gaps it closes included. `--prompt T` also times the step with T tokens a row (as a captured prompt
of that width runs it). `--extra-tiles` adds product tiles to the tuning's candidates and tunes and
captures a second decoder with them, to see which a step would pick.

    python benchmarks/step_parts.py --batch 1 32 --prompt 16 --extra-tiles

Prints a table per batch and writes step_parts.json to --out (default $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import ours_model, state_dict  # noqa: E402

HEADS = ("_wkv7_head", "_wkv5_head", "_wkv4", "_v6_mixes")


class _Nothing:
    """Stands in for a Triton kernel: `kernel[grid](...)` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _without(rwkv_triton, names):
    """Replace these module attributes of rwkv_triton by no-ops; returns what to put back."""
    saved = {n: getattr(rwkv_triton, n) for n in names if hasattr(rwkv_triton, n)}
    for n in saved:
        setattr(rwkv_triton, n, (lambda *a, **k: None) if n == "_gemv_call" else _Nothing())
    return saved


def _extra_tiles(rwkv_triton):
    """More candidates for the products, beside `rwkv_triton`'s lists: tiles that no step there picks
    yet. (Session 17's run of this added (64, 256, K in 4, 8 warps), (64, 128, K in 8), (32, 128, K
    in 8), (64, 128, K in 4), (32, 128), (64, 64) and (128, 128), which it showed winning at batch 32:
    they are in the lists now.) At batch 1 also narrower whole-row tiles (`_gemv_rows`): 1 or 2 rows of
    W a program, and 4096-wide K chunks (session 19's run of this added 4-row tiles, now in the list)."""
    import triton

    split = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp}, num_warps=nw, num_stages=ns)
             for bn, bk, sp, nw, ns in ((128, 128, 4, 8, 3), (32, 256, 8, 4, 3), (128, 256, 2, 8, 3), (64, 64, 8, 4, 4))]
    whole = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": 1}, num_warps=nw, num_stages=ns)
             for bn, bk, nw, ns in ((32, 512, 8, 2), (128, 64, 4, 4), (16, 128, 4, 4), (128, 256, 8, 3))]
    rows = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": 1, "ROWS": True}, num_warps=nw, num_stages=1)
            for bn, bk, nw in ((2, 2048, 2), (2, 2048, 4), (2, 4096, 4), (1, 2048, 2), (4, 4096, 2))]
    rwkv_triton._GEMV_CONFIGS = rwkv_triton._GEMV_CONFIGS + whole
    rwkv_triton._SPLIT_CONFIGS = rwkv_triton._SPLIT_CONFIGS + whole + split
    rwkv_triton._ROWS_CONFIGS = rwkv_triton._ROWS_CONFIGS + rows


def parts(m, dec, rwkv_triton, T, reps):
    """{row: us} for the step of T tokens a row on `dec`'s state and plan."""
    ids = torch.zeros(dec.B, T, dtype=torch.long, device="cuda")
    states, plan = dec.cache.layers_state, dec._plan
    step = lambda: rwkv_triton.triton_step(m, ids, states, plan)  # noqa: E731
    rows = {"whole": (), "without the per-head kernels": HEADS, "without _norm_mix": ("_norm_mix",),
            "products only": HEADS + ("_norm_mix",), "without the products": ("_gemv_call",)}
    out = {}
    for name, drop in rows.items():
        saved = _without(rwkv_triton, drop)
        try:
            out[name] = rwkv_triton._graph_us(step, reps)
        finally:
            for n, v in saved.items():
                setattr(rwkv_triton, n, v)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--version", default="7")
    ap.add_argument("--prompt", type=int, default=0, help="also the step with this many tokens a row")
    ap.add_argument("--extra-tiles", action="store_true")
    ap.add_argument("--reps", type=int, default=21)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from rwkv_hf.modeling import rwkv_triton
    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder

    m = ours_model(state_dict(version=args.version)).eval()
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "version": args.version, "rows": {}}
    passes = [("default tiles", False)] + ([("extra tiles", True)] if args.extra_tiles else [])
    with torch.no_grad():
        for label, extra in passes:
            if extra:
                _extra_tiles(rwkv_triton)
                rwkv_triton._CHOSEN.clear()
                rwkv_triton._TIMINGS.clear()
            for B in args.batch:
                t = time.time()
                dec = RwkvGraphDecoder(m, batch_size=B, triton=True)
                dec.step(torch.zeros(B, dtype=torch.long, device="cuda"))
                torch.cuda.synchronize()
                print(f"[{label}] b{B}: tuned and captured in {time.time() - t:.0f} s", flush=True)
                for k, v in rwkv_triton._TIMINGS.items():
                    if k[2] == rwkv_triton.row_block(B):  # (the key's third field: this batch's row block)
                        print(f"  tiles K={k[1]} n_max={k[5]} segments={k[6]} acc={k[3]}: {v[:4]}", flush=True)
                widths = [1] + ([args.prompt] if args.prompt and not extra else [])
                for T in widths:
                    got = parts(m, dec, rwkv_triton, T, args.reps)
                    res["rows"][f"{label} b{B} T{T}"] = got
                    whole = got["whole"]
                    print(f"[{label}] b{B} T{T}: " + "; ".join(
                        f"{n} {us:,.1f} us" + ("" if n == "whole" else f" ({us - whole:+,.1f})") for n, us in got.items()),
                        flush=True)
                res.setdefault("tiles", {})[f"{label} b{B}"] = {str(k): v for k, v in rwkv_triton._TIMINGS.items()}
                del dec
                torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "step_parts.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
