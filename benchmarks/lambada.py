"""A full LAMBADA run of a synthetic model, through our model and BlinkDL's package side by side.

Builds a seeded random checkpoint in BlinkDL's layout, converts it, and runs `rwkv-hf lambada` with
`--reference` on two data sets, printing both logs and the wall time of each side:

- `real`: the shipped LAMBADA test set (5,153 docs). A random model scores it at ppl ~1e11, so the
  printed two-decimal ppl cannot agree (that would take 1e-13 relative agreement); the argmax at every
  target position and the acc must.
- `model-written`: the same 5,153 contexts with the last word sampled from the model itself
  (`rwkv_hf.testing.model_written_lambada`): perplexities in a real model's range, where every
  printed line must be identical on both sides.

    python benchmarks/lambada.py [--version 7] [--limit N] [--batch-size 8] [--sets real model-written] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rwkv_hf.convert import convert_checkpoint
from rwkv_hf.evaluation import run_lambada
from rwkv_hf.testing import save_checkpoint, write_model_written_lambada


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default="7")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sets", nargs="+", default=["model-written", "real"], choices=["model-written", "real"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    print(f"# {platform.processor() or platform.machine()}, nproc {os.cpu_count()}, torch {torch.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = save_checkpoint(tmp / "model.pth", args.version, n_layer=args.n_layer, n_embd=args.n_embd, seed=args.seed)
        folder = tmp / "hf"
        convert_checkpoint(ckpt, folder, log=lambda s: None, progress=False)
        for name in args.sets:
            data = None
            if name == "model-written":
                t0 = time.perf_counter()
                data = str(write_model_written_lambada(folder, tmp / "docs.jsonl", limit=args.limit, seed=args.seed))
                print(f"# model-written docs: {time.perf_counter() - t0:.1f} s")
            print(f"## {name}: RWKV-{args.version}, {args.n_layer} layers, width {args.n_embd}, seed {args.seed}, "
                  f"batch size {args.batch_size}, fp32 CPU")
            t0 = time.perf_counter()
            r = run_lambada(folder, data=data, limit=args.limit, reference=str(ckpt), batch_size=args.batch_size)
            wall = time.perf_counter() - t0
            identical = all(
                f"{e['hf']['ppl']:.2f} {e['hf']['acc']:.2f}" == f"{e['reference']['ppl']:.2f} {e['reference']['acc']:.2f}"
                for e in r["lines"]
            )
            same_argmax = sum(a[2] == b[2] for a, b in zip(r["docs"]["hf"], r["docs"]["reference"]))
            print(f"# wall: hf {r['hf']['wall_s']:.1f} s, reference {r['reference']['wall_s']:.1f} s, "
                  f"whole run {wall:.1f} s; every printed line identical: {identical}; "
                  f"docs with identical argmax at every target position: {same_argmax}/{r['n']}")
            r.pop("docs")
            r["identical_lines"] = identical
            r["same_argmax_docs"] = same_argmax
            results[name] = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
