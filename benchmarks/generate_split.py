"""Where `generate()` spends its time beyond the decode step, on one GPU.

The 1.5B-shaped RWKV-7 of `gpu.py` (bf16, random weights), greedy, a 16-token prompt, for each batch
size: generate() of 1, 2 and 200 new tokens (`min_new_tokens` as many), the prompt's forward pass
alone, and the bare captured step (`RwkvGraphDecoder(triton=True).step`). Each time is a median of 5
calls after one (CUDA events); "per token" is (generate(200) - generate(1)) / 199. `--prompt-graphs`
runs the whole set once for each value given, in one process (`rwkv_decode.PROMPT_GRAPHS`: the prompt
through the captured step, or uncaptured), so that the rows compare:

    python benchmarks/generate_split.py --prompt-graphs 0 1 0 --batch 1 32

Prints one line per (setting, batch) and writes generate_split.json to --out (default $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import cuda_time, decode_rate, ours_model, state_dict  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt-graphs", type=int, nargs="+", default=[1], help="PROMPT_GRAPHS values, one pass each")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    from rwkv_hf.modeling import rwkv_decode
    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder

    m = ours_model(state_dict()).eval()
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.no_grad():
        for graphs in args.prompt_graphs:
            rwkv_decode.PROMPT_GRAPHS = bool(graphs)
            for B in args.batch:
                prompt = torch.randint(0, 65536, (B, 16), generator=g).cuda()

                def gen(n):
                    return m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

                t = time.time()
                gen(200)
                torch.cuda.synchronize()
                first = time.time() - t
                ms = {n: cuda_time(lambda: gen(n), warmup=1, reps=5) * 1e3 for n in (1, 2, 200)}
                fwd = cuda_time(lambda: m(input_ids=prompt, use_cache=True, logits_to_keep=1), warmup=1, reps=5) * 1e3
                rate = decode_rate(RwkvGraphDecoder(m, batch_size=B, triton=True).step, B, 200)
                row = {"prompt_graphs": graphs, "batch": B, "first_call_s": first, "generate_1_ms": ms[1],
                       "generate_2_ms": ms[2], "generate_200_ms": ms[200], "generate_tok_s": B * 200e3 / ms[200],
                       "prompt_forward_ms": fwd, "per_token_ms": (ms[200] - ms[1]) / 199, "step_ms": B * 1e3 / rate}
                rows.append(row)
                print(f"PROMPT_GRAPHS={graphs} b{B}: generate(1) {ms[1]:.2f} ms, generate(2) {ms[2]:.2f}, generate(200) "
                      f"{ms[200]:.2f} ({row['generate_tok_s']:,.0f} tok/s); prompt forward {fwd:.2f} ms; per token "
                      f"{row['per_token_ms']:.3f} ms; bare step {row['step_ms']:.3f} ms; first call {first:.1f} s", flush=True)
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "generate_split.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
