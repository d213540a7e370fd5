"""GPU training benchmark: ours vs flash-linear-attention's RWKV7ForCausalLM, one card.

The shape of `benchmarks/gpu.py` (1.5B-shaped RWKV-7: 24 layers, width 2048, V 65536, random weights),
bf16 weights, batch 4 x 2048 tokens. One training step is a forward with `labels` and a backward; the
gradients are dropped (no optimizer: what is timed is the model). Rows:

- ours: the default (LM head fused with the loss in chunks, `fuse_cross_entropy`), with full logits,
  under torch.compile (--torch-compile) and with gradient checkpointing;
- fla: its fused linear cross-entropy (its best mode for training), under torch.compile, and with
  gradient checkpointing.

Only the timed model is on the card (the other waits in host memory). --profile adds one step's GPU
kernel time by kind (matmul / WKV forward+backward / other, and the kernel count) to every row.

Every row: median seconds per step over --steps steps after --warmup steps, as tokens/s, and the peak
memory of those steps (torch.cuda.max_memory_allocated, weights included). The first step of each row
is timed on its own: on a fresh machine it includes Triton's autotuning of the WKV kernels (both
libraries use fla's). fla asks Triton to keep the autotuning results in its cache directory
(FLA_CACHE_RESULTS, on by default; ~/.triton/cache), so by its code a later process on the same
machine does not pay it again (not measured across processes here: each run was on a fresh machine).

    python benchmarks/train_gpu.py [--steps 5] [--out DIR] [--skip-fla] [--skip-ours] [--fla-first] [--profile] [--skip-extra]
                                   [--torch-compile [--inductor triton.mix_order_reduction=false]]

Writes train_gpu.json to --out (default $OUT) after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu import V, failure, fla_model, kernel_profile, ours_model, set_inductor, state_dict, versions  # noqa: E402  (the inference benchmark's shape and models)

B, T = 4, 2048


def train_rate(model, ids, args, name, res):
    """Time forward(labels) + backward on `ids`; record tok/s, peak memory and the first step."""
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None
        return loss

    torch.cuda.synchronize()
    t = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t
    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ts = []
    for _ in range(args.steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    row = {"tok_s": B * T / ts[len(ts) // 2], "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
           "first_step_s": first, "loss": float(loss.detach())}
    if args.profile:
        row["kernels"] = kernel_profile(step, grad=True)
    res[name] = row
    print(f"{name}: {row['tok_s']:,.0f} tok/s, peak {row['peak_gib']:.1f} GiB, first step {first:.1f} s, "
          f"loss {row['loss']:.3f}" + (f", one step {row['kernels']}" if args.profile else ""), flush=True)
    with open(os.path.join(args.out, "train_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)


def compiled_rate(model, ids, args, name, res):
    """`train_rate` of the model under torch.compile (what Trainer(torch_compile=True) runs); its first
    step compiles. An error is reported as the row's result."""
    try:
        train_rate(torch.compile(model), ids, args, name, res)
    except Exception as e:
        res[name] = {"error": failure(e)}
        print(f"{name} failed: {res[name]['error']}", flush=True)


def run_rows(args, res, ids):
    """Each model's default row first (the first pays Triton's autotuning), then ours with full logits,
    then each under torch.compile (--torch-compile), then each with gradient checkpointing; --skip-extra
    leaves out the full-logits and checkpointing rows."""
    made = {"ours": lambda: ours_model(state_dict()), "fla": lambda: fla_model(fuse_cross_entropy=True)}
    names = {"ours": "ours (fused LM-head loss, the default)", "fla": "fla (fused linear cross-entropy)"}
    who = [w for w in ("ours", "fla") if not getattr(args, f"skip_{w}")]
    models = {}

    def use(w):  # only the timed model on the card, so that each row's peak memory is its own
        for k, m in models.items():
            if k != w:
                m.to("cpu")
        torch.cuda.empty_cache()
        models[w] = models[w].to("cuda") if w in models else made[w]()
        return models[w]

    for w in reversed(who) if args.fla_first else who:
        train_rate(use(w), ids, args, names[w], res)
    if "ours" in who and not args.skip_extra:
        m = use("ours")
        m.config.fuse_cross_entropy = False
        train_rate(m, ids, args, "ours, full logits", res)
        m.config.fuse_cross_entropy = True
    for w in who if args.torch_compile else ():
        compiled_rate(use(w), ids, args, f"{w} under torch.compile(model)", res)
    for w in () if args.skip_extra else who:
        m = use(w)
        m.gradient_checkpointing_enable()
        train_rate(m, ids, args, f"{w}, gradient checkpointing", res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument("--skip-ours", action="store_true")
    ap.add_argument("--torch-compile", action="store_true", help="also train each model under torch.compile")
    ap.add_argument("--inductor", action="append", default=[], metavar="NAME=VALUE",
                    help="set a torch._inductor.config option for the --torch-compile rows (e.g. triton.mix_order_reduction=false)")
    ap.add_argument("--skip-extra", action="store_true", help="leave out the full-logits and gradient-checkpointing rows")
    ap.add_argument("--profile", action="store_true", help="also split one step's GPU kernel time into matmul / WKV / other")
    ap.add_argument("--fla-first", action="store_true", help="run fla's rows first (it then pays the cold autotuning)")
    args = ap.parse_args()
    set_inductor(args.inductor)
    res = {"card": torch.cuda.get_device_name(), "shape": {"model": "benchmarks/gpu.py's", "batch": B, "tokens": T}, "inductor": args.inductor,
           "versions": versions("torch", "transformers", "flash-linear-attention")}
    print(res["card"], res["versions"], flush=True)
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(0)).cuda()
    run_rows(args, res, ids)
    rows = [k for k, v in res.items() if isinstance(v, dict) and "tok_s" in v]
    ref = res.get("fla (fused linear cross-entropy)")
    print("\n| path | train fwd+bwd 4x2048 (tok/s) | peak memory (GiB) | first step (s) |\n| --- | --- | --- | --- |")
    for k in rows:
        r = res[k]
        ratio = f" ({r['tok_s'] / ref['tok_s']:.2f}x)" if ref and not k.startswith("fla") else ""
        mem = f" ({r['peak_gib'] / ref['peak_gib']:.2f}x)" if ref and not k.startswith("fla") else ""
        print(f"| {k} | {r['tok_s']:,.0f}{ratio} | {r['peak_gib']:.1f}{mem} | {r['first_step_s']:.0f} |")


if __name__ == "__main__":
    main()
