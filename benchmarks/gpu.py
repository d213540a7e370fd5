"""GPU benchmark: ours vs flash-linear-attention's RWKV7ForCausalLM vs the `rwkv` package, one card.

1.5B-shaped RWKV-7 (24 layers, width 2048, V 65536, random weights), bf16 (the `rwkv` package: fp16,
its own CUDA kernel). Prefill 1x4096 and 8x2048 (last logits only), decode batch 1 and batch 32
(greedy, one token per row per step). Every row is a median of runs after warm-up: prefill and
generate() calls timed with CUDA events (`cuda_time`), decode steps over runs of --steps steps
(`decode_rate`). Prints a table with ratios to fla and the card's name, and writes JSON to $OUT (or --out).

    python benchmarks/gpu.py [--out DIR] [--skip-rwkv] [--skip-fla] [--long 0] [--profile] [--skip-prefill]
                             [--torch-compile] [--fla-compile] [--trace-generate] [--decode-only]

The `rwkv` package runs in a subprocess (it compiles its CUDA kernel with nvcc on first use and
changes global torch settings on import).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

L, C, V, N = 24, 2048, 65536, 64
PREFILL = [(1, 4096), (8, 2048)]
DECODE = [1, 32]


def set_inductor(items):
    """Set torch._inductor.config options from NAME=VALUE strings (dotted names reach nested
    sections, e.g. triton.mix_order_reduction=false; values: true/false, whole numbers, else text)."""
    import torch._inductor.config as inductor_config

    for item in items:
        name, value = item.split("=", 1)
        *path, last = name.split(".")
        section = inductor_config
        for part in path:
            section = getattr(section, part)
        getattr(section, last)  # an unknown name fails here, before anything runs
        setattr(section, last, {"true": True, "false": False}.get(value.lower(), int(value) if value.isdigit() else value))


def cuda_time(fn, warmup=2, reps=5):
    """Median seconds of fn() over reps, timed with CUDA events after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def decode_rate(step, B, steps, reps=3):
    """tokens/s of a step function that feeds [B] ids and returns logits [B, V] (greedy): the median
    of `reps` runs of `steps` steps, after 3 warm-up steps (the statistic of every row: a median of
    runs after warm-up)."""
    nxt = torch.zeros(B, dtype=torch.long, device="cuda")
    for _ in range(3):
        nxt = step(nxt).argmax(-1)
    rates = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            nxt = step(nxt).argmax(-1)
        torch.cuda.synchronize()
        rates.append(B * steps / (time.perf_counter() - t))
    return sorted(rates)[len(rates) // 2]


def trace_call(fn, path):
    """One fn() call under torch.profiler (CPU and CUDA): a Chrome trace to `path` (chrome://tracing,
    perfetto) and the host-side operations taking the most time, printed."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=False) as p:
        fn()
        torch.cuda.synchronize()
    p.export_chrome_trace(path)
    print(f"trace of one call: {path}", flush=True)
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=25), flush=True)


def kernel_profile(fn, grad=False, top=0):
    """Milliseconds of GPU kernel time of one fn() call by kind: matrix products (cuBLAS, our `_gemv`), WKV
    (flash-linear-attention's recurrence kernels, forward and backward), everything else; and the kernel
    count. Under no_grad unless `grad` (a training step). `top`: also the `top` kernels by time, as
    {name: [ms, calls]} under "by_name"."""
    from torch.profiler import ProfilerActivity, profile

    with contextlib.nullcontext() if grad else torch.no_grad():
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
    out = {"matmul_ms": 0.0, "wkv_ms": 0.0, "other_ms": 0.0, "kernels": 0}
    for e in p.key_averages():
        if e.device_time_total <= 0:
            continue
        name = e.key.lower()
        kind = ("matmul_ms" if any(w in name for w in ("gemm", "nvjet", "gemv", "cutlass", "xmma"))
                else "wkv_ms" if any(w in name for w in ("rwkv", "dplr", "delta_rule", "chunk_", "fused_recurrent"))
                else "other_ms")
        out[kind] += e.device_time_total / 1e3
        out["kernels"] += e.count
    res = {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}
    if top:
        rows = sorted((e for e in p.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
        res["by_name"] = {e.key[:60]: [round(e.device_time_total / 1e3, 3), e.count] for e in rows[:top]}
    return res


def state_dict(dtype=torch.bfloat16, version="7"):
    """A random BlinkDL state dict of the benchmark's shape (24 layers, width 2048): RWKV-7 unless asked."""
    from rwkv_hf.testing import make_state_dict

    sd = make_state_dict(version, n_layer=L, n_embd=C, vocab_size=V, head_size=N, seed=0)
    return {k: v.to(dtype) for k, v in sd.items()}


def ours_model(sd):
    """Our causal LM for a BlinkDL state dict, on the card in bf16 (built on the meta device: no copy)."""
    import rwkv_hf.modeling as M
    from rwkv_hf.convert.blinkdl import config_from_state_dict, to_hf_key

    spec, cfg = config_from_state_dict(sd)
    with torch.device("meta"):
        m = M.FAMILIES[spec.family][2](cfg)
    m.load_state_dict({to_hf_key(k): v for k, v in sd.items()}, assign=True)
    return m.to("cuda", torch.bfloat16)


def fla_model(fuse_cross_entropy: bool):
    """fla's RWKV7ForCausalLM of the same shape (its own random weights), on the card in bf16."""
    from fla.models import RWKV7Config, RWKV7ForCausalLM

    from rwkv_hf.testing import _lora_widths

    w = _lora_widths("7", C)
    cfg = RWKV7Config(
        hidden_size=C, num_hidden_layers=L, head_dim=N, vocab_size=V, intermediate_size=4 * C,
        decay_low_rank_dim=w["w"], a_low_rank_dim=w["a"], v_low_rank_dim=w["v"], gate_low_rank_dim=w["g"],
        fuse_cross_entropy=fuse_cross_entropy,
    )
    with torch.device("cuda"):
        return RWKV7ForCausalLM(cfg).to(torch.bfloat16)


def versions(*packages):
    """Installed versions of `packages` (None where missing)."""
    import importlib.metadata as md

    def ver(p):
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return None

    return {p: ver(p) for p in packages}


def failure(e: Exception) -> str:
    """An error as a row's result: its kind and the start of its message."""
    return f"{type(e).__name__}: {str(e)[:300]}"


def prefill_rows(label, m, out, args, g, suffix=""):
    """Prefill rows (last logits only) of model `m` into out[f"prefill_{B}x{T}{suffix}"]; the first
    call's seconds (a compiled model compiles in it) into out[f"prefill_{B}x{T}{suffix}_first_s"]."""
    for B, T in PREFILL:
        ids = torch.randint(0, V, (B, T), generator=g).cuda()
        call = lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1)  # noqa: E731
        t = time.time()
        call()
        torch.cuda.synchronize()
        out[f"prefill_{B}x{T}{suffix}_first_s"] = time.time() - t
        s = cuda_time(call, reps=args.reps)
        out[f"prefill_{B}x{T}{suffix}"] = B * T / s
        print(f"{label} prefill {B}x{T}: {B * T / s:,.0f} tok/s (first call {out[f'prefill_{B}x{T}{suffix}_first_s']:.1f} s)", flush=True)
        if args.profile:
            out[f"prefill_{B}x{T}{suffix}_kernels"] = kernel_profile(call)
            print(f"{label} prefill {B}x{T} kernels: {out[f'prefill_{B}x{T}{suffix}_kernels']}", flush=True)


def compiled_prefill_rows(label, m, out, args, g):
    """The same rows with the model under torch.compile (transformers' Trainer(torch_compile=True) does
    the same); an error is reported as the rows' result."""
    try:
        prefill_rows(f"{label} under torch.compile", torch.compile(m), out, args, g, suffix="_compiled")
    except Exception as e:
        out["prefill_compiled_error"] = failure(e)
        print(f"{label} prefill under torch.compile failed: {out['prefill_compiled_error']}", flush=True)


# ------------------------------------------------------------------------------------------- ours
def fast_step_rows(B, gen, n_new, args, out, name, label, decoder):
    """The rows of one faster captured step (`name`: "fused" the compiled one, "triton" RWKV-7's):
    `gen()` (generate() with the model configured for it; its first call, which builds the step,
    timed alone), the same through transformers' loop, and the bare step of `decoder()`."""
    from rwkv_hf.testing import transformers_generate_loop

    t = time.time()
    gen()
    out[f"decode_{B}_{name}_first_s"] = time.time() - t
    out[f"decode_{B}_generate_{name}"] = B * n_new / cuda_time(gen, warmup=0, reps=3)
    with transformers_generate_loop():
        out[f"decode_{B}_generate_{name}_hf_loop"] = B * n_new / cuda_time(gen, warmup=1, reps=3)
    print(f"ours generate() b{B} ({label}): {out[f'decode_{B}_generate_{name}']:,.1f} tok/s (first call: "
          f"{out[f'decode_{B}_{name}_first_s']:.0f}s; through transformers' loop: {out[f'decode_{B}_generate_{name}_hf_loop']:,.1f})",
          flush=True)
    dec = decoder()
    out[f"decode_{B}_graph_{name}"] = decode_rate(dec.step, B, args.steps * 4)
    print(f"ours decode b{B} {name} graph: {out[f'decode_{B}_graph_{name}']:,.1f} tok/s (ran: {dec.path})", flush=True)
    if args.profile:
        out[f"decode_{B}_{name}_kernels"] = kernel_profile(dec._step)
        print(f"ours {name} step b{B} kernels: {out[f'decode_{B}_{name}_kernels']}", flush=True)


def bench_ours(sd, args, res):
    from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD
    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder
    from rwkv_hf.testing import transformers_generate_loop

    m = ours_model(sd).eval()
    out = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if not (args.decode_only or args.skip_prefill):
            prefill_rows("ours", m, out, args, g)
            if args.torch_compile:
                compiled_prefill_rows("ours", m, out, args, g)
        for B in DECODE:
            prompt = torch.randint(0, V, (B, 16), generator=g).cuda()
            cache = getattr(m(input_ids=prompt, use_cache=True, logits_to_keep=1), CACHE_FIELD)

            def eager(nxt):
                o = m(input_ids=nxt[:, None], cache=cache, use_cache=True, logits_to_keep=1)
                return o.logits[:, -1]

            m.config.cuda_graph_decode = False
            out[f"decode_{B}_eager"] = decode_rate(eager, B, args.steps)
            m.config.cuda_graph_decode = True
            print(f"ours decode b{B} eager: {out[f'decode_{B}_eager']:,.1f} tok/s", flush=True)
            # generate() itself (greedy; its one-token steps replay the captured graph, here the eager
            # step: compile_decode=False), through our loop (rwkv_generate, the default) and through
            # transformers' `_sample` loop
            m.config.compile_decode, m.config.triton_decode = False, False
            n_new = args.steps * 4
            gen = lambda: m.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=0)  # noqa: E731
            gen()
            s = cuda_time(gen, warmup=0, reps=3)
            out[f"decode_{B}_generate"] = B * n_new / s
            print(f"ours generate() b{B}, {n_new} new tokens: {out[f'decode_{B}_generate']:,.1f} tok/s", flush=True)
            if args.trace_generate:
                trace_call(gen, os.path.join(args.out, f"generate_b{B}_trace.json"))
            with transformers_generate_loop():
                s = cuda_time(gen, warmup=1, reps=3)
            out[f"decode_{B}_generate_hf_loop"] = B * n_new / s
            print(f"ours generate() b{B} through transformers' loop: {out[f'decode_{B}_generate_hf_loop']:,.1f} tok/s", flush=True)
            dec = RwkvGraphDecoder(m, batch_size=B)
            out[f"decode_{B}_graph"] = decode_rate(dec.step, B, args.steps * 4)
            print(f"ours decode b{B} graph: {out[f'decode_{B}_graph']:,.1f} tok/s", flush=True)
            del dec, cache
            if not args.skip_compiled:
                # the compiled step (config compile_decode; None, the default, compiles it on CUDA where
                # RWKV-7's Triton step is not used)
                m.config.compile_decode = None
                fast_step_rows(B, gen, n_new, args, out, "fused", "compiled step", lambda: RwkvGraphDecoder(m, batch_size=B, fused=True))
            # RWKV-7's Triton step (config triton_decode; None, the default: on where Triton runs)
            m.config.triton_decode = None
            fast_step_rows(B, gen, n_new, args, out, "triton", "Triton step, the default", lambda: RwkvGraphDecoder(m, batch_size=B, triton=True))
        out["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if args.long:
            ids = torch.randint(0, V, (1, args.long), generator=g).cuda()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            s = cuda_time(lambda: m(input_ids=ids, use_cache=True, logits_to_keep=1), warmup=1, reps=1)
            weights = sum(p.numel() * p.element_size() for p in m.parameters())
            out["long_prefill"] = {"tokens": args.long, "tok_s": args.long / s, "weights_gib": weights / 2**30,
                                   "peak_above_weights_gib": (torch.cuda.max_memory_allocated() - base) / 2**30}
            print(f"ours prefill 1x{args.long}: {out['long_prefill']}", flush=True)
    res["ours"] = out
    del m
    torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------- fla
def fla_step(model, copy_logits=False):
    """A decode step of fla's model, ids [B] -> logits [B, V], carrying its cache from call to call.
    `copy_logits`: hand out a copy (a replayed CUDA graph overwrites its outputs)."""
    box = {"pkv": None}

    def step(nxt):
        o = model(input_ids=nxt[:, None], past_key_values=box["pkv"], use_cache=True, logits_to_keep=1)
        box["pkv"] = o.past_key_values
        return o.logits[:, -1].clone() if copy_logits else o.logits[:, -1]

    return step


def bench_fla(args, res):
    m = fla_model(fuse_cross_entropy=False).eval()
    out = {"params": sum(p.numel() for p in m.parameters())}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if not args.skip_prefill:
            prefill_rows("fla", m, out, args, g)
            if args.torch_compile:
                compiled_prefill_rows("fla", m, out, args, g)
        for B in DECODE:
            out[f"decode_{B}"] = decode_rate(fla_step(m), B, args.steps)
            print(f"fla decode b{B}: {out[f'decode_{B}']:,.1f} tok/s", flush=True)
        if args.fla_compile:  # its model under torch.compile with CUDA graphs, where that runs
            compiled = torch.compile(m, mode="reduce-overhead")
            for B in DECODE:
                t = time.time()
                try:
                    out[f"decode_{B}_compiled"] = decode_rate(fla_step(compiled, copy_logits=True), B, args.steps)
                    print(f"fla decode b{B} under torch.compile(mode='reduce-overhead'): "
                          f"{out[f'decode_{B}_compiled']:,.1f} tok/s ({time.time() - t:.0f} s with compiling)", flush=True)
                except Exception as e:  # (reported, not fatal: the other rows stand)
                    out[f"decode_{B}_compiled_error"] = failure(e)
                    print(f"fla decode b{B} under torch.compile failed: {out[f'decode_{B}_compiled_error']}", flush=True)
    res["fla"] = out
    del m
    torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- rwkv
RWKV_SCRIPT = r"""
import json, os, sys, time
os.environ["RWKV_V7_ON"] = "1"; os.environ["RWKV_JIT_ON"] = "1"; os.environ["RWKV_CUDA_ON"] = "1"
import torch
t0 = time.time()
from rwkv.model import RWKV
compile_s = time.time() - t0
path, steps, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = RWKV(model=path[:-4], strategy="cuda fp16")
out = {"import_and_compile_s": compile_s}
toks = torch.randint(0, 65536, (4096,)).tolist()
with torch.no_grad():
    for _ in range(2):
        m.forward(toks, None)
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); m.forward(toks, None); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    ts.sort(); out["prefill_1x4096"] = 4096 / ts[len(ts) // 2]
    x, state = m.forward([0], None)
    for _ in range(3):
        x, state = m.forward([int(x.argmax())], state)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(steps):
        x, state = m.forward([int(x.argmax())], state)
    torch.cuda.synchronize(); out["decode_1"] = steps / (time.perf_counter() - t)
print("RESULT " + json.dumps(out))
"""


def bench_rwkv(sd, args, res):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rwkv7-bench.pth")
        torch.save({k: v.to(torch.float16) for k, v in sd.items()}, path)
        script = os.path.join(d, "run.py")
        open(script, "w").write(RWKV_SCRIPT)
        t = time.time()
        try:
            p = subprocess.run(
                [sys.executable, script, path, str(args.steps), str(args.reps)],
                capture_output=True, text=True, timeout=args.rwkv_timeout,
            )
        except subprocess.TimeoutExpired:
            res["rwkv"] = {"error": f"timed out after {args.rwkv_timeout}s (nvcc compile + run)"}
            print("rwkv: timed out", flush=True)
            return
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode or not lines:
            res["rwkv"] = {"error": (p.stderr or p.stdout)[-2000:]}
            print("rwkv failed:\n" + (p.stderr or p.stdout)[-2000:], flush=True)
            return
        res["rwkv"] = json.loads(lines[-1][7:])
        res["rwkv"]["wall_s"] = time.time() - t
        print(f"rwkv: {res['rwkv']}", flush=True)


def table(res):
    cols = [("prefill 1x4096", "prefill_1x4096"), ("prefill 8x2048", "prefill_8x2048"),
            ("decode b1", "decode_1"), ("decode b32", "decode_32")]
    fla = res.get("fla", {})
    rows = []
    ours = res.get("ours", {})
    def decode(key):  # a row's two decode cells, from ours' decode_<B>_<key>
        return {"decode_1": ours.get(f"decode_1_{key}"), "decode_32": ours.get(f"decode_32_{key}")}

    rows.append(("ours, eager (auto mode, cuda_graph_decode off)", {**ours, **decode("eager")}))
    for label, key in (
        ("generate() through transformers' loop (CUDA graphs, compile_decode=False)", "generate_hf_loop"),
        ("generate() (own loop, CUDA graphs, compile_decode=False)", "generate"),
        ("RwkvGraphDecoder.step", "graph"),
        ("generate() through transformers' loop (compiled step, triton_decode=False)", "generate_fused_hf_loop"),
        ("generate() (own loop, compiled step in the CUDA graph, triton_decode=False)", "generate_fused"),
        ("RwkvGraphDecoder(fused=True).step", "graph_fused"),
        ("generate() through transformers' loop (Triton step)", "generate_triton_hf_loop"),
        ("generate() (own loop, RWKV-7's Triton step in the CUDA graph: the default)", "generate_triton"),
        ("RwkvGraphDecoder(triton=True).step", "graph_triton"),
    ):
        rows.append((f"ours, {label}", decode(key)))
    if any(k.endswith("_compiled") for k in ours):
        rows.append(("ours under torch.compile(model)", {k: ours.get(k + "_compiled") for _, k in cols[:2]}))
    rows.append(("fla RWKV7ForCausalLM", fla))
    if any(k.startswith("prefill") and k.endswith("_compiled") for k in fla):
        rows.append(("fla RWKV7ForCausalLM under torch.compile(model)", {k: fla.get(k + "_compiled") for _, k in cols[:2]}))
    if any(k.endswith("_compiled") for k in fla):
        rows.append(("fla RWKV7ForCausalLM under torch.compile(mode='reduce-overhead')",
                     {"decode_1": fla.get("decode_1_compiled"), "decode_32": fla.get("decode_32_compiled")}))
    rows.append(("rwkv 0.8.32 cuda fp16", res.get("rwkv", {})))
    lines = ["| path | " + " | ".join(c for c, _ in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, r in rows:
        cells = []
        for _, key in cols:
            x = r.get(key) if isinstance(r, dict) else None
            if not isinstance(x, (int, float)):
                cells.append("-")
                continue
            ratio = f" ({x / fla[key]:.2f}x)" if isinstance(fla.get(key), (int, float)) and name[:3] != "fla" else ""
            cells.append(f"{x:,.0f}{ratio}" if x >= 100 else f"{x:.1f}{ratio}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-rwkv", action="store_true")
    ap.add_argument("--skip-fla", action="store_true")
    ap.add_argument("--skip-compiled", action="store_true",
                    help="skip our compiled step's rows (compile_decode; its first compile can take minutes on a cold card)")
    ap.add_argument("--fla-compile", action="store_true", help="also decode with fla's model under torch.compile (CUDA graphs)")
    ap.add_argument("--torch-compile", action="store_true", help="also prefill with each model under torch.compile")
    ap.add_argument("--trace-generate", action="store_true", help="save a profiler trace of one generate() call per batch size")
    ap.add_argument("--profile", action="store_true", help="also split GPU kernel time into matmul / WKV / other")
    ap.add_argument("--decode-only", action="store_true", help="ours only, decode only (skips fla and rwkv)")
    ap.add_argument("--skip-prefill", action="store_true",
                    help="skip the prefill rows of ours and fla (their first long prompt tunes fla's kernels: minutes on a cold card)")
    ap.add_argument("--rwkv-timeout", type=int, default=300)
    ap.add_argument("--long", type=int, default=131072, help="also prefill one prompt this long (0: skip)")
    args = ap.parse_args()
    res = {
        "card": torch.cuda.get_device_name(),
        "versions": versions("torch", "triton", "transformers", "flash-linear-attention", "fla-core", "rwkv"),
        "shape": {"layers": L, "width": C, "vocab": V, "head_size": N, "dtype": "bf16"},
    }
    print(res["card"], res["versions"], flush=True)
    t = time.time()
    sd = state_dict()
    print(f"weights built in {time.time() - t:.0f}s", flush=True)
    try:
        bench_ours(sd, args, res)
    except Exception as e:  # keep going: the other columns are still worth having
        res["ours_error"] = repr(e)
        print("ours failed:", repr(e), flush=True)
    if args.decode_only:
        args.skip_fla = args.skip_rwkv = True
    if not args.skip_fla:
        try:
            bench_fla(args, res)
        except Exception as e:
            res["fla_error"] = repr(e)
            print("fla failed:", repr(e), flush=True)
    if not args.skip_rwkv:
        bench_rwkv(sd, args, res)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(f"\n{res['card']}; torch {res['versions']['torch']}, fla {res['versions']['flash-linear-attention']}")
    print(table(res))


if __name__ == "__main__":
    main()
