"""Packed documents of mixed lengths (transformers' DataCollatorWithFlattening): one 1,024-token document
and 32 of 16 tokens in one row, through a 2-layer width-256 RWKV-7 on the CPU, forward and forward +
backward, with the documents in one padded batch (each padded to the longest: what `_packed` did
before length groups) and in length groups (`rwkv_common.length_groups`), beside the same row run
unpacked (no state resets: the work of its tokens alone). Median of 5 (3 with backward) after a warm-up.

    python benchmarks/packed.py [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from quantized import timed  # (median of n calls after one; benchmarks/ is the script's folder)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import DataCollatorWithFlattening

    from rwkv_hf.modeling import rwkv_common
    from rwkv_hf.testing import build_model, make_state_dict

    model = build_model(make_state_dict("7", n_layer=2, n_embd=256, vocab_size=1024, seed=0))
    g = torch.Generator().manual_seed(0)
    lengths = [1024] + [16] * 32
    batch = DataCollatorWithFlattening(return_position_ids=True)(
        [{"input_ids": torch.randint(1, 1024, (n,), generator=g).tolist()} for n in lengths])
    print(f"RWKV-7, 2 layers, width 256; one row of {sum(lengths)} tokens: documents of {lengths[0]} and "
          f"{len(lengths) - 1} x {lengths[1]}; torch {torch.__version__}, {args.threads} threads")
    print("| documents run as | forward ms | forward + backward ms |\n| --- | ---: | ---: |")
    short = rwkv_common.PACK_SHORT
    try:
        for name, value in (("one padded batch", 10**9), ("length groups (the default)", short)):
            rwkv_common.PACK_SHORT = value
            with torch.no_grad():
                fwd = timed(lambda: model(**batch, wkv_mode="chunk"), 5)
            bwd = timed(lambda: model(**batch, wkv_mode="chunk").loss.backward(), 3)
            print(f"| {name} | {fwd * 1e3:,.0f} | {bwd * 1e3:,.0f} |", flush=True)
    finally:
        rwkv_common.PACK_SHORT = short
    with torch.no_grad():
        fwd = timed(lambda: model(batch["input_ids"], wkv_mode="chunk"), 5)
    bwd = timed(lambda: model(batch["input_ids"], labels=batch["input_ids"], wkv_mode="chunk").loss.backward(), 3)
    print(f"| (the row unpacked, no resets) | {fwd * 1e3:,.0f} | {bwd * 1e3:,.0f} |")


if __name__ == "__main__":
    main()
