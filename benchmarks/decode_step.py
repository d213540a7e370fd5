"""The captured decode step alone, for comparing two checkouts (or inductor settings) side by side.

`RwkvGraphDecoder` (the eager, compiled or Triton step: --step) of the 1.5B-shaped RWKV-7 of `benchmarks/gpu.py` (bf16) at batch 1 and
32: capture time (the first call compiles), tokens/s over --steps greedy steps, and a kernel profile of
one step (matmul / WKV / other, kernel count). `--src DIR` imports rwkv_hf from another checkout's
`src` (e.g. a worktree of an older commit; its decoder must take `fused=`), so that two trees run on
the same card in one session, one process each:

    python benchmarks/decode_step.py --src ../before/src; python benchmarks/decode_step.py
    python benchmarks/decode_step.py --inductor combo_kernels=1
    python benchmarks/decode_step.py --shape 7b --step triton   # issue 14's larger model, RWKV-7's Triton step
    python benchmarks/decode_step.py --step triton --variant split_k=0 --variant split_k=1
    python benchmarks/decode_step.py --step triton --variant lora_apart_from=1000 --variant lora_apart_from=1

Each --variant sets `rwkv_triton` settings (integers) and tunes the product tiles afresh; the
candidates' times (us a launch) are printed.

Prints one line per batch size and writes decode_step.json to --out (default $OUT, else .).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def seven_b():
    """A 7B-shaped RWKV-7 (32 layers, width 4096, V 65536) with its own random initialisation, made on
    the card (a BlinkDL state dict of this size would take minutes to build on the host), bf16."""
    import torch

    import rwkv_hf.modeling as M
    from rwkv_hf.convert.blinkdl import config_from_state_dict
    from rwkv_hf.testing import make_state_dict

    spec, cfg = config_from_state_dict(make_state_dict("7", n_layer=1, n_embd=4096, vocab_size=65536, head_size=64, seed=0))
    cfg.num_hidden_layers = 32
    with torch.device("cuda"):
        return M.FAMILIES[spec.family][2](cfg).to(torch.bfloat16)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", help="import rwkv_hf from this directory (another checkout's src)")
    ap.add_argument("--shape", choices=["1.5b", "7b"], default="1.5b",
                    help="1.5b: gpu.py's model (24 layers, width 2048); 7b: 32 layers, width 4096, initialised on the card")
    ap.add_argument("--version", default="7", help="the 1.5b shape's RWKV version (4, 5.2, 6, 7)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--step", choices=["eager", "compiled", "triton"], default="compiled",
                    help="the captured step: eager ops, compiled by inductor (compile_decode), or RWKV-7's Triton kernels")
    ap.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                    help="set a torch._inductor.config option (dotted for sections: triton.NAME; ints and true/false), repeatable")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=INT[,NAME=INT]",
                    help="the Triton step under these rwkv_triton settings (repeatable: each a row per batch, in one "
                         "process, so the rows compare)")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, os.path.abspath(args.src))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import rwkv_hf
    from gpu import decode_rate, kernel_profile, ours_model, set_inductor, state_dict
    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder

    set_inductor(args.inductor)

    where = os.path.dirname(rwkv_hf.__file__)
    m = (ours_model(state_dict(version=args.version)) if args.shape == "1.5b" else seven_b()).eval()
    # what a step must read: every weight but the embedding, of which it reads one row per token
    step_bytes = sum(p.numel() * p.element_size() for n, p in m.named_parameters() if not n.endswith("emb.weight"))
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rwkv_hf": where, "version": args.version,
           "inductor": args.inductor, "step": args.step}
    variants = [dict((k.strip().upper(), int(v)) for k, v in (kv.split("=") for kv in spec.split(",")))
                for spec in args.variant] or [{}]
    from rwkv_hf.modeling import rwkv_triton

    shown = set()  # tuning keys whose tile timings were printed
    for B in args.batch:
        for var in variants:
            for name, on in var.items():
                if not hasattr(rwkv_triton, name):
                    raise SystemExit(f"decode_step.py: rwkv_triton has no setting {name}")
                setattr(rwkv_triton, name, on)
            label = ",".join(f"{k}={int(v)}" for k, v in var.items()) or "default"
            if var:  # each variant tunes its own tiles (`tune_step` keeps a kind's pick for the process)
                getattr(rwkv_triton, "_CHOSEN", {}).clear()
                getattr(rwkv_triton, "_TIMINGS", {}).clear()
                shown.clear()
            t = time.time()
            kind = {"triton": True} if args.step == "triton" else {}  # (older decoders have no Triton step)
            dec = RwkvGraphDecoder(m, batch_size=B, fused=args.step == "compiled", **kind)
            dec.step(torch.zeros(B, dtype=torch.long, device="cuda"))
            torch.cuda.synchronize()
            capture_s = time.time() - t
            rate = decode_rate(dec.step, B, args.steps)
            # one step unrolled (not replayed), to count its kernels; older decoders named it _step_fn
            prof = kernel_profile(getattr(dec, "_step", None) or dec._step_fn, top=8)
            tb_s = step_bytes * rate / B / 1e12
            ran = "triton" if getattr(dec.path, "triton", False) else "compiled" if dec.fused else "eager"
            row = res[f"b{B}" + ("" if label == "default" else f" {label}")] = {
                "tok_s": rate, "capture_s": capture_s, "kernels": prof, "step": ran, "weights_read_tb_s": tb_s}
            chosen = getattr(rwkv_triton, "_CHOSEN", {})
            res.setdefault("tuned", {}).update({str(k): (dict(c.kwargs), c.num_warps, c.num_stages) for k, c in chosen.items()})
            timings = {str(k): v for k, v in getattr(rwkv_triton, "_TIMINGS", {}).items() if str(k) not in shown}
            shown.update(timings)
            row["tile_timings"] = timings
            for k, v in timings.items():  # each candidate tile: us a launch alone [, us a whole step]
                print(f"  b{B} [{label}] {k}: {v}", flush=True)
            print(f"{where} {args.shape} v{args.version} b{B} [{label}]: {rate:,.1f} tok/s ({tb_s:.2f} TB/s of weights "
                  f"read, {step_bytes / 1e9:.2f} GB a step), capture {capture_s:.0f} s, step {ran}, one step {prof}", flush=True)
            del dec
    for k, c in res.get("tuned", {}).items():
        print("tuned", k, c)
    with open(os.path.join(args.out, "decode_step.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
