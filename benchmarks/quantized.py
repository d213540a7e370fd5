"""Quantized loading: memory and speed of bitsandbytes' 8-bit and 4-bit layers against the model as
converted (issue 13).

A synthetic checkpoint (default: RWKV-7 at the 0.1B shape, 12 layers, width 768, vocabulary 65536)
converted to a folder, then loaded with `from_pretrained` three ways: as it is (in `--dtype`, fp32 by
default), with `BitsAndBytesConfig(load_in_8bit=True)` and with `load_in_4bit=True` (computing in
`--dtype`). For each: the model's memory footprint (`get_memory_footprint()`), prefill tokens/s
(a 512-token prompt, last logits only) and decode tokens/s (64 greedy one-token steps from the
prompt's state; quantized models decode through the modules, the others through the step
functions), each the median of `--repeats` runs after a warm-up. Runs on the device given (CPU by default; bitsandbytes runs there too).

    python benchmarks/quantized.py [--version 7] [--device cpu] [--repeats 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--version", default="7")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the unquantized model's dtype and the quantized layers' compute dtype (on CUDA, bfloat16 "
                         "is what a user runs, and keeps fla's kernels off fp32, which they tune slowly)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)

    import rwkv_hf  # noqa: F401
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from rwkv_hf.convert import convert_checkpoint
    from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD
    from rwkv_hf.testing import make_state_dict

    with tempfile.TemporaryDirectory() as d:  # (a 12-layer checkpoint and its folder: 1.5 GB)
        tmp = Path(d)
        torch.save(make_state_dict(args.version, n_layer=12, n_embd=768, seed=0), tmp / "m.pth")
        convert_checkpoint(tmp / "m.pth", tmp / "hf")
        ids = torch.randint(0, 65536, (1, args.prefill), generator=torch.Generator().manual_seed(0)).to(args.device)
        kinds = {
            args.dtype: {"dtype": dtype},
            "bitsandbytes 8-bit": {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": args.device,
                                   "dtype": dtype},
            "bitsandbytes 4-bit": {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype),
                                   "device_map": args.device, "dtype": dtype},
        }
        print(f"RWKV-{args.version}, 12 layers, width 768, vocabulary 65536, {args.device}, torch {torch.__version__}")
        print("| weights | memory MiB | prefill tok/s | decode tok/s |\n| --- | ---: | ---: | ---: |")
        for name, kw in kinds.items():
            model = AutoModelForCausalLM.from_pretrained(tmp / "hf", **kw)
            if "quantization_config" not in kw:
                model = model.to(args.device)
            with torch.no_grad():
                prefill = timed(lambda: model(ids, logits_to_keep=1), args.repeats)
                cache = getattr(model(ids, use_cache=True, logits_to_keep=1), CACHE_FIELD)

                def decode():
                    c = cache.clone()
                    nxt = ids[:, -1:]
                    for _ in range(args.decode):
                        nxt = model(nxt, cache=c, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)

                dec = timed(decode, args.repeats)
            print(f"| {name} | {model.get_memory_footprint() / 2**20:,.1f} | {args.prefill / prefill:,.0f} | "
                  f"{args.decode / dec:,.1f} |", flush=True)
            del model


if __name__ == "__main__":
    main()
