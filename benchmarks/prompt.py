"""A short prompt's forward pass (a cache, the last logits: what generate() runs first) through the
modules against through the Triton step at once (`rwkv_paths.TRITON_PROMPT_MAX`), then generate()'s
200 new tokens after a 16-token prompt either way. Needs CUDA; 1.5B-shaped RWKV-7, bf16, random weights.

    python benchmarks/prompt.py [--batch 1 32] [--tokens 4 16 64]

Each time is the median of 5 calls after 2 (generate(): of 3 after 1); the first call of each path
is timed on its own (kernels built, tiles timed, fla's kernels tuning themselves on a fresh card).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4, 16, 64])
    args = ap.parse_args()
    import torch
    from gpu import cuda_time, ours_model, state_dict
    from rwkv_hf.modeling import rwkv_paths

    rwkv_paths.TRITON_PROMPT_ROWS = 1 << 20  # (every row count here: the limit is what is measured)
    m = ours_model(state_dict()).eval()
    paths = (("modules", 0), ("Triton at once", 1 << 20))

    def forward(ids):
        with torch.no_grad():
            return m(ids, use_cache=True, logits_to_keep=1)

    ids = torch.randint(1, 65536, (args.batch[0], 16), device="cuda")
    for name, limit in paths:
        rwkv_paths.TRITON_PROMPT_MAX = limit
        t = time.time()
        forward(ids)
        torch.cuda.synchronize()
        print(f"first call, b{args.batch[0]} x 16 through the {name}: {time.time() - t:.1f} s", flush=True)
    for B in args.batch:
        for T in args.tokens:
            ids = torch.randint(1, 65536, (B, T), device="cuda")
            ms = {}
            for name, limit in paths:
                rwkv_paths.TRITON_PROMPT_MAX = limit
                ms[name] = 1e3 * cuda_time(lambda: forward(ids))
            print(f"b{B} x {T}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in ms.items()), flush=True)
    for B in args.batch:
        prompt = torch.randint(1, 65536, (B, 16), device="cuda")
        for name, limit in (("modules", 0), ("Triton at once", 64)):
            rwkv_paths.TRITON_PROMPT_MAX = limit

            def gen():
                with torch.no_grad():
                    m.generate(prompt, max_new_tokens=200, min_new_tokens=200, do_sample=False, pad_token_id=0)

            ms = 1e3 * cuda_time(gen, warmup=1, reps=3)
            print(f"b{B} generate(200), prompt through the {name}: {ms:.1f} ms = {B * 200 / ms * 1e3:,.0f} tok/s",
                  flush=True)


if __name__ == "__main__":
    main()
