"""CPU fp32 speed of our models against BlinkDL's reference package, at the 0.1B shape.

For each version (4, 5.2, 6, 7): a synthetic checkpoint of 12 layers, width 768, head size 64,
vocabulary 65536 (FFN 3072; v6 int(768 * 3.5) // 32 * 32 = 2688), then

- prefill: tokens/s over a 512-token prompt from an empty state, last position's logits only
  (ours: `logits_to_keep=1`; the reference: `forward(tokens, None)`, which returns the last logits);
- decode: tokens/s over 64 single-token steps from the state left by the prompt;

for ours in "auto" mode (chunked prefill, recurrent decode) and "recurrent" mode (per-token loop
everywhere, for reference), and for the `rwkv` package (`RWKV_JIT_ON=1`, strategy `cpu fp32`) in a
subprocess per version (RWKV-7 needs `RWKV_V7_ON=1` before the import), all in the same run. Warm-up
runs are excluded; each figure is the median of `--repeats` runs. Torch keeps its default thread
count in both processes unless `--threads` says otherwise.

Decode reads every weight once per token (all but the embedding, of which it reads one row), so its
speed is also printed as GB/s of weights read, next to this machine's memory bandwidth measured here
(a large fp32 tensor summed, and copied).

    python benchmarks/model.py [--versions 4 5.2 6 7] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

N_LAYER, N_EMBD, HEAD_SIZE, VOCAB = 12, 768, 64, 65536


def ffn_dim(version: str) -> int:
    return int(N_EMBD * 3.5) // 32 * 32 if version == "6" else 4 * N_EMBD


# ------------------------------------------------------------------------------------------ machine
def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def memory_bandwidth(mib: int = 1024, repeats: int = 5) -> dict:
    """GB/s reading (sum) and copying (read + write counted) a large fp32 tensor, median of runs."""
    x = torch.rand(mib * 2**18)  # mib MiB of fp32
    y = torch.empty_like(x)
    nbytes = x.numel() * 4
    x.sum()
    y.copy_(x)
    reads, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        reads.append(nbytes / (time.perf_counter() - t0) / 1e9)
        t0 = time.perf_counter()
        y.copy_(x)
        copies.append(2 * nbytes / (time.perf_counter() - t0) / 1e9)
    return {"read_GBps": statistics.median(reads), "copy_GBps": statistics.median(copies)}


# ------------------------------------------------------------------------------------------ ours
def bytes_read_per_token(model) -> int:
    """Weight bytes one decode step reads: every parameter except the embedding table (one row)."""
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()


def time_ours(model, prompt: list, n_decode: int, repeats: int, mode: str) -> dict:
    """mode: a WKV mode, or "auto+compile" (auto with config.compile_decode: RWKV-7 decode steps run the
    torch.compile'd `rwkv_step` function; compiled during the warm-up)."""
    model.config.compile_decode = mode == "auto+compile"
    mode = "auto" if mode == "auto+compile" else mode
    ids = torch.tensor([prompt])
    decode_ids = torch.tensor(prompt[:n_decode]).view(-1, 1, 1)

    def prefill():
        return model(ids, logits_to_keep=1, use_cache=True, wkv_mode=mode)

    def decode(cache):
        for t in range(n_decode):
            model(decode_ids[t], cache=cache, logits_to_keep=1, wkv_mode=mode)

    def cache_of(out):
        return out.cache if hasattr(out, "cache") else out.past_key_values

    pre, dec = [], []
    with torch.inference_mode():
        out = prefill()  # warm-up
        decode(cache_of(out).clone())
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = prefill()
            pre.append(len(prompt) / (time.perf_counter() - t0))
            cache = cache_of(out)
            t0 = time.perf_counter()
            decode(cache)
            dec.append(n_decode / (time.perf_counter() - t0))
    model.config.compile_decode = False
    return {"prefill_tps": statistics.median(pre), "decode_tps": statistics.median(dec)}


# ------------------------------------------------------------------------------------- reference
_REFERENCE = r"""
import json, statistics, sys, time
import torch
args = json.loads(sys.argv[1])
if args["threads"]:
    torch.set_num_threads(args["threads"])
from rwkv.model import RWKV
model = RWKV(model=args["ckpt"][:-4], strategy="cpu fp32")
prompt, n_decode, repeats = args["prompt"], args["n_decode"], args["repeats"]

def decode(state):
    for t in range(n_decode):
        _, state = model.forward([prompt[t]], state)

with torch.inference_mode():
    _, state = model.forward(prompt, None)  # warm-up (and the JIT's profiling runs)
    decode([s.clone() for s in state])
    _, state = model.forward(prompt, None)
    decode([s.clone() for s in state])
    pre, dec = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, state = model.forward(prompt, None)
        pre.append(len(prompt) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        decode(state)
        dec.append(n_decode / (time.perf_counter() - t0))
print("RESULT " + json.dumps({"prefill_tps": statistics.median(pre), "decode_tps": statistics.median(dec)}))
"""


def time_reference(ckpt: Path, version: str, prompt: list, n_decode: int, repeats: int, threads: int = 0) -> dict:
    env = dict(os.environ, RWKV_JIT_ON="1", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if version == "7" else "0")
    args = json.dumps({"ckpt": str(ckpt), "prompt": prompt, "n_decode": n_decode, "repeats": repeats, "threads": threads})
    proc = subprocess.run([sys.executable, "-c", _REFERENCE, args], env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"the reference package failed for v{version}:\n{proc.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------ main
def build(version: str, ckpt_dir: Path):
    import rwkv_hf.modeling
    from rwkv_hf.convert.blinkdl import config_from_state_dict, to_hf_key
    from rwkv_hf.testing import make_state_dict

    sd = make_state_dict(version, n_layer=N_LAYER, n_embd=N_EMBD, vocab_size=VOCAB, head_size=HEAD_SIZE,
                         ffn_dim=ffn_dim(version), seed=0)
    ckpt = ckpt_dir / f"rwkv{version}-0.1b-synthetic.pth"
    if not ckpt.exists():
        torch.save(sd, ckpt)
    spec, cfg = config_from_state_dict(sd)
    model = rwkv_hf.modeling.FAMILIES[spec.family][2](cfg)
    model.load_state_dict({to_hf_key(k): v for k, v in sd.items()})
    return model.eval(), ckpt


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", nargs="+", default=["4", "5.2", "6", "7"])
    ap.add_argument("--prefill", type=int, default=512, help="prompt length")
    ap.add_argument("--decode", type=int, default=64, help="decode steps")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["auto", "recurrent"],
                    help="our WKV modes to time; 'auto+compile' also sets compile_decode (RWKV-7)")
    ap.add_argument("--no-reference", action="store_true", help="skip the rwkv package")
    ap.add_argument("--ckpt-dir", default=None, help="keep the synthetic .pth files here (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in both processes (default 0: torch's own default). On a machine shared "
                         "with other jobs, 1 thread avoids timing the OS scheduler instead of the code")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    info = {"machine": machine(), "memory": memory_bandwidth()}
    print(f"# {info['machine']['cpu']}, nproc {info['machine']['nproc']}, torch {info['machine']['torch']} "
          f"({info['machine']['torch_threads']} threads), transformers {info['machine']['transformers']}")
    print(f"# memory bandwidth: read {info['memory']['read_GBps']:.1f} GB/s, copy {info['memory']['copy_GBps']:.1f} GB/s")
    prompt = torch.randint(0, VOCAB, (args.prefill,), generator=torch.Generator().manual_seed(0)).tolist()
    results = []
    tmp = None if args.ckpt_dir else tempfile.TemporaryDirectory()
    ckpt_dir = Path(args.ckpt_dir or tmp.name)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    header = f"{'version':>7} {'impl':>20} {'prefill tok/s':>14} {'x ref':>6} {'decode tok/s':>13} {'x ref':>6} {'GB/s read':>10}"
    print(header)
    try:
        for version in args.versions:
            model, ckpt = build(version, ckpt_dir)
            per_token = bytes_read_per_token(model)
            rows = []
            if not args.no_reference:
                rows.append({"impl": "reference (rwkv)", **time_reference(ckpt, version, prompt, args.decode, args.repeats, args.threads)})
            for mode in args.modes:
                rows.append({"impl": f"rwkv_hf {mode}", **time_ours(model, prompt, args.decode, args.repeats, mode)})
            ref = rows[0] if not args.no_reference else None
            for row in rows:
                row.update(version=version, weight_bytes_per_token=per_token,
                           decode_GBps=row["decode_tps"] * per_token / 1e9)
                if ref is not None:
                    row["prefill_x_ref"] = row["prefill_tps"] / ref["prefill_tps"]
                    row["decode_x_ref"] = row["decode_tps"] / ref["decode_tps"]
                xp = f"{row['prefill_x_ref']:6.2f}" if ref is not None else f"{'':6}"
                xd = f"{row['decode_x_ref']:6.2f}" if ref is not None else f"{'':6}"
                print(f"{version:>7} {row['impl']:>20} {row['prefill_tps']:14.0f} {xp} {row['decode_tps']:13.1f} {xd} "
                      f"{row['decode_GBps']:10.1f}", flush=True)
                results.append(row)
            del model
    finally:
        if tmp is not None:
            tmp.cleanup()
    info["prompt_tokens"], info["decode_steps"], info["repeats"] = args.prefill, args.decode, args.repeats
    info["results"] = results
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=2))
    return info


if __name__ == "__main__":
    main()
