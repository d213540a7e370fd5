"""Kernels of the compiled decode step, counted without a GPU.

inductor can write Triton code for CPU tensors (`cpu_backend="triton"`); its scheduler then makes the
same fusion decisions it makes for a GPU (not exactly: a GPU's reduction heuristics see its SM count).
This script compiles one block's in-place decode step (`rwkv_decode._block_forward_in_place`, what the
captured `compile_decode` step runs) for a RWKV-7 of width --width at batch --batch, writes the
generated code, and prints the kernels each block launches. The Triton kernels are generated, never
compiled or run (Triton's compiler needs a GPU): a development aid for comparing two checkouts or
settings when no GPU is at hand, built on inductor internals (checked with torch 2.11 and 2.13).

    python benchmarks/kernel_count.py [--src DIR] [--batch 1] [--width 2048] [--inductor split_reductions=false]

Found this way (session 6), width 2048, batch 1: under torch 2.11, commit 859bd8e's block ran its
one-token WKV through an export loop (`exporting()`; 26 kernels in its code, which cannot run here
without built kernels); fixed, a block launches 20 kernels, 17 with split_reductions off, and 15 if
moreover the new token-shift vectors go to other buffers than the ones read (two captured graphs
taking turns: not built yet).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", help="import rwkv_hf from this directory (another checkout's src)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--out", default=tempfile.gettempdir(), help="where the generated code goes")
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    import torch
    import torch._inductor.config as inductor_config
    import torch.utils._triton as triton_utils
    from torch._inductor import async_compile
    from torch._inductor.graph import GraphLowering

    inductor_config.cpu_backend = "triton"
    inductor_config.compile_threads = 1
    for item in args.inductor:
        name, value = item.split("=", 1)
        setattr(inductor_config, name, {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value))
    # no GPU: Triton has no backend to hash or compile for, so the kernels are written and not built
    triton_utils.triton_hash_with_backend = lambda: "0" * 64

    class _Unbuilt:
        def __getattr__(self, name):
            return lambda *a, **k: None

    async_compile.AsyncCompile.triton = lambda self, *a, **k: _Unbuilt()

    import rwkv_hf
    from rwkv_hf.testing import build_model, make_state_dict
    from rwkv_hf.modeling import rwkv_decode
    from rwkv_hf.modeling.rwkv_helpers import DirectCalls, ReduceCalls

    B = args.batch
    model = build_model(make_state_dict("7", n_layer=2, n_embd=args.width, vocab_size=1000, head_size=64, seed=0))
    model = model.to(torch.bfloat16)
    step = rwkv_decode._compiled(rwkv_decode._block_forward_in_place)  # as the captured decoder compiles it
    block = model.model.blocks[1]  # (block 0 also normalises the embedding and makes v_first)
    x = torch.randn(B, 1, args.width, dtype=torch.bfloat16)
    state = block.zero_state(B, "cpu", torch.bfloat16)
    calls = ReduceCalls if B <= 4 else DirectCalls  # as the compiled CUDA step (rwkv_paths.REDUCTION_MAX_BATCH)
    codes = []
    GraphLowering.save_output_code = lambda code: codes.append(code)  # (what run_and_get_code does)
    with torch.no_grad():
        try:
            step(block, x, state, None, x.clone(), "recurrent", None, calls)
        except RuntimeError as e:  # code with a loop in it reads the unbuilt kernels' outputs to go on
            print(f"(the generated code could not run without its kernels: {e})")
    for i, code in enumerate(codes):
        path = os.path.join(args.out, f"rwkv7_block_step_b{B}_{i}.py")
        with open(path, "w") as f:
            f.write(code)
        launches = [a or b for a, b in re.findall(r"^\s+(\w+)\.run\(|^\s+(extern_kernels\.\w+)\(", code, re.M)]
        print(f"{os.path.dirname(rwkv_hf.__file__)}: torch {torch.__version__}, batch {B}, width {args.width}, "
              f"{args.inductor or 'default inductor settings'}: {len(launches)} kernels a block (code: {path})")
        for name in launches:
            print("   ", name)


if __name__ == "__main__":
    main()
