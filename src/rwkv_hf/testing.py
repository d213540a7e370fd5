"""Synthetic RWKV checkpoints in BlinkDL's `.pth` layout, and a runner for the reference package.

No real weights can be downloaded where our tests run, so every test (and `rwkv-hf demo`) builds a
seeded random checkpoint with exactly the keys, shapes and conventions of a real BlinkDL checkpoint of
the requested version, scaled so that the logits vary a lot (a model whose logits are all ~0 would let
many bugs through). `run_reference` runs BlinkDL's own `rwkv` package on such a file in a subprocess
(RWKV-7 needs `RWKV_V7_ON=1` before the package is imported, so it must be a fresh interpreter).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

VERSIONS = ("4", "5.0", "5.1", "5.2", "6", "7")


def _lora_widths(version: str, n_embd: int) -> Dict[str, int]:
    """The LoRA widths BlinkDL's training code picks for a model of this width."""
    if version == "6":
        return {"maa": 32 if n_embd < 4096 else 64, "decay": 64 if n_embd < 4096 else 128}
    if version == "7":
        # RWKV-LM x070: max(32, round(f * C**e / 32) * 32)
        def width(f: float, e: float) -> int:
            return max(32, int(round(f * (n_embd**e) / 32) * 32))

        return {"w": width(1.8, 0.5), "a": width(1.8, 0.5), "v": width(1.3, 0.5), "g": width(0.6, 0.8)}
    return {}


def make_state_dict(
    version: str,
    n_layer: int = 2,
    n_embd: int = 128,
    vocab_size: int = 65536,
    head_size: int = 64,
    ffn_dim: Optional[int] = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    logit_scale: float = 4.0,
    deep_embed: int = 0,
) -> Dict[str, torch.Tensor]:
    """A seeded random state dict with the keys and shapes of a BlinkDL RWKV checkpoint.

    `logit_scale` sets the spread of the logits (their std is about this many nats). `deep_embed`
    D > 0 (RWKV-7 only): a DeepEmbed checkpoint of rank D (the reference hard-codes D = 32).
    """
    version = str(version)
    if version not in VERSIONS:
        raise ValueError(f"unknown RWKV version {version!r}; expected one of {VERSIONS}")
    if n_embd % head_size:
        raise ValueError(f"n_embd {n_embd} is not a multiple of head_size {head_size}")
    g = torch.Generator().manual_seed(seed)
    C, H, N = n_embd, n_embd // head_size, head_size
    if ffn_dim is None:
        ffn_dim = 4 * C if version == "7" else (int(C * 3.5) // 32 * 32 if version == "6" else 4 * C)

    def uniform(*shape, lo=0.0, hi=1.0):
        return torch.rand(*shape, generator=g) * (hi - lo) + lo

    def linear(out_f, in_f, gain=1.0):  # torch layout [out, in], variance-preserving
        return torch.randn(out_f, in_f, generator=g) * (gain / in_f**0.5)

    def mix():  # token-shift mixing coefficients, [1, 1, C] in (0, 1)
        return uniform(1, 1, C)

    sd: Dict[str, torch.Tensor] = {"emb.weight": uniform(vocab_size, C, lo=-1.0, hi=1.0)}
    lora = _lora_widths(version, C)
    for i in range(n_layer):
        p = f"blocks.{i}."
        if i == 0:
            sd[p + "ln0.weight"] = uniform(C, lo=0.8, hi=1.2)
            sd[p + "ln0.bias"] = uniform(C, lo=-0.1, hi=0.1)
        for ln in ("ln1", "ln2"):
            sd[p + ln + ".weight"] = uniform(C, lo=0.8, hi=1.2)
            sd[p + ln + ".bias"] = uniform(C, lo=-0.1, hi=0.1)
        a, f = p + "att.", p + "ffn."
        if version == "7":
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g"):
                sd[a + name] = mix()
            sd[a + "w0"] = uniform(1, 1, C, lo=-2.0, hi=2.0)
            sd[a + "w1"] = torch.randn(C, lora["w"], generator=g) * 0.1
            sd[a + "w2"] = torch.randn(lora["w"], C, generator=g) * 0.1
            sd[a + "a0"] = uniform(1, 1, C, lo=-1.0, hi=1.0)
            sd[a + "a1"] = torch.randn(C, lora["a"], generator=g) * 0.1
            sd[a + "a2"] = torch.randn(lora["a"], C, generator=g) * 0.1
            sd[a + "v0"] = uniform(1, 1, C, lo=-1.0, hi=1.0)
            sd[a + "v1"] = torch.randn(C, lora["v"], generator=g) * 0.1
            sd[a + "v2"] = torch.randn(lora["v"], C, generator=g) * 0.1
            sd[a + "g1"] = torch.randn(C, lora["g"], generator=g) * 0.1
            sd[a + "g2"] = torch.randn(lora["g"], C, generator=g) * 0.1
            sd[a + "k_k"] = uniform(1, 1, C, lo=0.5, hi=1.5)
            sd[a + "k_a"] = uniform(1, 1, C, lo=0.0, hi=1.0)
            sd[a + "r_k"] = uniform(H, N, lo=-0.5, hi=0.5)
        elif version == "6":
            for name in ("x", "w", "k", "v", "r", "g"):
                sd[a + "time_maa_" + name] = mix()
            sd[a + "time_maa_w1"] = torch.randn(C, 5 * lora["maa"], generator=g) * 0.1
            sd[a + "time_maa_w2"] = torch.randn(5, lora["maa"], C, generator=g) * 0.1
            sd[a + "time_decay"] = uniform(1, 1, C, lo=-4.0, hi=1.0)
            sd[a + "time_decay_w1"] = torch.randn(C, lora["decay"], generator=g) * 0.1
            sd[a + "time_decay_w2"] = torch.randn(lora["decay"], C, generator=g) * 0.1
            sd[a + "time_faaaa"] = uniform(H, N, lo=-1.0, hi=1.0)
        else:
            for name in ("k", "v", "r") + (("g",) if version in ("5.1", "5.2") else ()):
                sd[a + "time_mix_" + name] = mix()
            if version == "4":
                sd[a + "time_decay"] = uniform(C, lo=-4.0, hi=1.0)
                sd[a + "time_first"] = uniform(C, lo=-1.0, hi=1.0)
            elif version == "5.2":
                sd[a + "time_decay"] = uniform(H, N, lo=-4.0, hi=1.0)
                sd[a + "time_faaaa"] = uniform(H, N, lo=-1.0, hi=1.0)
            else:  # 5.0, 5.1: one decay and one bonus per head
                sd[a + "time_decay"] = uniform(H, lo=-4.0, hi=1.0)
                sd[a + "time_first"] = uniform(H, lo=-1.0, hi=1.0)
        for name in ("receptance", "key", "value"):
            sd[a + name + ".weight"] = linear(C, C)
        if version in ("5.1", "5.2", "6"):
            sd[a + "gate.weight"] = linear(C, C)
        sd[a + "output.weight"] = linear(C, C)
        if version != "4":
            sd[a + "ln_x.weight"] = uniform(C, lo=0.8, hi=1.2)
            sd[a + "ln_x.bias"] = uniform(C, lo=-0.1, hi=0.1)
        if version == "7":
            sd[f + "x_k"] = mix()
        elif version == "6":
            sd[f + "time_maa_k"] = mix()
            sd[f + "time_maa_r"] = mix()
        else:
            sd[f + "time_mix_k"] = mix()
            sd[f + "time_mix_r"] = mix()
        if deep_embed:
            if version != "7":
                raise ValueError("DeepEmbed checkpoints are RWKV-7")
            D = deep_embed
            # scaled so that the gate is s0 in (0.5, 1.5) plus a per-token part of std ~0.5
            sd[f + "s_emb.weight"] = torch.randn(vocab_size, D * D, generator=g) * 0.5
            sd[f + "s_emb_x.weight"] = linear(D * D, C, gain=0.5)
            sd[f + "s0"] = uniform(1, 1, ffn_dim, lo=0.5, hi=1.5)
            sd[f + "s1"] = torch.randn(C, D, generator=g) / C**0.5
            sd[f + "s2"] = torch.randn(D, ffn_dim, generator=g) * (0.7 / D)
        sd[f + "key.weight"] = linear(ffn_dim, C)
        if version != "7":
            sd[f + "receptance.weight"] = linear(C, C)
        sd[f + "value.weight"] = linear(C, ffn_dim, gain=0.5)
    sd["ln_out.weight"] = uniform(C, lo=0.8, hi=1.2)
    sd["ln_out.bias"] = uniform(C, lo=-0.1, hi=0.1)
    sd["head.weight"] = linear(vocab_size, C, gain=logit_scale)
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def build_model(sd: Dict[str, torch.Tensor]):
    """Our model (eval mode) for a BlinkDL state dict, built straight from it (no folder)."""
    from .convert.blinkdl import config_from_state_dict, to_hf_key
    from .modeling import FAMILIES

    spec, cfg = config_from_state_dict(sd)
    model = FAMILIES[spec.family][2](cfg).eval()
    model.load_state_dict({to_hf_key(k): v for k, v in sd.items()})
    return model


def logits_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max over positions of max|diff| / max|logit| at that position (the bound the parity tests use)."""
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()


def save_checkpoint(path, version: str, **kwargs) -> Path:
    """Write `make_state_dict(version, **kwargs)` to `path` (a `.pth`), as BlinkDL's trainer does."""
    path = Path(path)
    torch.save(make_state_dict(version, **kwargs), path)
    return path


def make_state_file_dict(n_layer: int = 2, n_embd: int = 128, head_size: int = 64, seed: int = 0, scale: float = 1.0):
    """A seeded random state file in RWKV-PEFT's layout: `blocks.{i}.att.time_state` [H, N, N] fp32."""
    g = torch.Generator().manual_seed(seed)
    H = n_embd // head_size
    return {f"blocks.{i}.att.time_state": torch.randn(H, head_size, head_size, generator=g) * scale for i in range(n_layer)}


# ------------------------------------------------------------------------------ the reference runner
_REFERENCE_SCRIPT = r"""
import json, os, sys
import torch
args = json.load(open(sys.argv[1]))
torch.set_num_threads(args["threads"])
from rwkv.model import RWKV
kw = {} if os.environ.get("RWKV_V7_ON") == "1" else {"verbose": False}
model = RWKV(model=args["ckpt"][:-4], strategy=args["strategy"], **kw)
state = None
if args.get("state_file"):  # a state file loaded as RWKV-Runner's load_rwkv_state does
    raw = torch.load(args["state_file"], map_location="cpu", weights_only=True)
    state = []
    for i in range(len(raw)):
        s = raw[f"blocks.{i}.att.time_state"].float()
        s = s if os.environ.get("RWKV_V7_ON") == "1" else s.transpose(1, 2)  # v5/v6: transposed
        zeros = torch.zeros(s.shape[0] * s.shape[1])  # token shifts start at zero
        state += [zeros, s.contiguous(), zeros.clone()]
outs = []
for chunk in args["chunks"]:
    out, state = model.forward(chunk, state, full_output=True)
    if out.dim() == 1:
        out = out.unsqueeze(0)
    outs.append(out.float())
torch.save({"logits": torch.cat(outs), "state": [s.float().clone() for s in state]}, args["out"])
"""


def reference_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("rwkv") is not None
    except (ImportError, ValueError):
        return False


def run_reference(
    ckpt: os.PathLike,
    tokens: Sequence[int],
    version: str,
    strategy: str = "cpu fp32",
    split_at: Sequence[int] = (),
    threads: int = 2,
    timeout: float = 900,
    state_file: Optional[os.PathLike] = None,
) -> dict:
    """Run BlinkDL's `rwkv` package on `ckpt` over `tokens` in a fresh interpreter.

    The tokens are fed as consecutive chunks cut at `split_at`, carrying the reference's state.
    `state_file`: start from a state file (`blocks.{i}.att.time_state`), put into the package's state
    list the way RWKV-Runner does (v5/v6 transposed, v7 as is, token shifts zero).
    Returns {"logits": [T, V] fp32, "state": list of the reference's state tensors}.
    """
    from .evaluation.reference import is_deep_embed

    ckpt = str(ckpt)
    if not ckpt.endswith(".pth"):
        raise ValueError(f"the reference package only loads .pth files, got {ckpt}")
    cuts = [0, *sorted(split_at), len(tokens)]
    chunks: List[List[int]] = [list(map(int, tokens[a:b])) for a, b in zip(cuts, cuts[1:]) if b > a]
    env = dict(os.environ)
    env.update(RWKV_JIT_ON="1", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if str(version) == "7" else "0",
               RWKV_DE_VERSION="1" if is_deep_embed(ckpt) else "0")
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "args.json"
        out = Path(tmp) / "out.pt"
        spec.write_text(json.dumps({"ckpt": ckpt, "strategy": strategy, "chunks": chunks, "out": str(out), "threads": threads,
                                    "state_file": str(state_file) if state_file else None}))
        proc = subprocess.run(
            [sys.executable, "-c", _REFERENCE_SCRIPT, str(spec)], env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the reference package failed on {ckpt}:\n{proc.stderr[-3000:]}")
        return torch.load(out, weights_only=True)


# ------------------------------------------------------------- LAMBADA that a synthetic model can do
def _word_token_sets(vocab_size: int):
    """Boolean masks over the vocabulary: tokens that can start a LAMBADA target (" " + a word without
    whitespace, valid UTF-8 on its own) and tokens that can continue one (valid UTF-8, no whitespace)."""
    from .tokenization.tokenization_rwkv_world import default_vocab_file, load_vocab

    first = torch.zeros(vocab_size, dtype=torch.bool)
    rest = torch.zeros(vocab_size, dtype=torch.bool)
    for index, token in enumerate(load_vocab(default_vocab_file())[:vocab_size]):
        if index == 0 or token is None:
            continue
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if len(text) > 1 and text[0] == " " and not any(c.isspace() for c in text[1:]):
            first[index] = True
        if text and not any(c.isspace() for c in text):
            rest[index] = True
    return first, rest


@torch.no_grad()
def model_written_lambada(
    model, tokenizer, docs: Sequence[Sequence[str]], seed: int = 0, temperature: float = 1.0, batch_size: int = 16
) -> List[str]:
    """LAMBADA documents whose last word the model wrote itself: for each (context, target) pair, the
    context is kept and the target replaced by " " + a word sampled from the model after
    ``[0] + encode(context)`` (every third document a two-token word, else one token).

    A random model scores real LAMBADA targets at a perplexity of ~1e9-1e11, where two printed
    decimals would need 1e-13 relative agreement; on its own words it scores like a real model on
    real text (tens to hundreds), which makes the two-decimal side-by-side lines a real test. The word
    is sampled among tokens that keep the document well formed (no whitespace inside the word, valid
    UTF-8), and a two-token word is kept only if ``encode(" " + word)`` gives back the same two
    tokens (else its first token alone is used), so the scorer sees exactly the sampled tokens.
    """
    from .evaluation.lambada import encode_docs, left_pad, tokenizer_encode

    first, rest = _word_token_sets(model.config.vocab_size)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    encode = tokenizer_encode(tokenizer)

    def sample(seqs: List[List[int]], allowed: torch.Tensor) -> List[int]:
        ids, mask = left_pad(seqs)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, logits_to_keep=1).logits
        logits = logits[:, -1].float().cpu() / temperature
        probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return torch.multinomial(probs, 1, generator=g)[:, 0].tolist()

    out: List[str] = []
    for b in range(0, len(docs), batch_size):
        batch = docs[b : b + batch_size]
        srcs = [src for src, _ in encode_docs(batch, encode)]  # [0] + encode(context), as the scorer has it
        t1 = sample(srcs, first)
        two = [i for i in range(len(batch)) if (b + i) % 3 == 0]
        t2 = dict(zip(two, sample([srcs[i] + [t1[i]] for i in two], rest))) if two else {}
        for i, (context, _) in enumerate(batch):
            word = [t1[i], t2[i]] if i in t2 else [t1[i]]
            text = tokenizer.decode(word)
            if encode(text) != word:
                word = [t1[i]]
                text = tokenizer.decode(word)
            out.append(context + text)
    return out


def write_model_written_lambada(model_dir, out_path, data=None, limit=None, seed: int = 0, temperature: float = 1.0) -> Path:
    """`model_written_lambada` for a converted folder, written as a jsonl that `rwkv-hf lambada --data` reads."""
    from .evaluation.lambada import load_docs, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(model_dir)
    texts = model_written_lambada(model, tokenizer, load_docs(data, limit), seed=seed, temperature=temperature)
    out_path = Path(out_path)
    with open(out_path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return out_path


# ---------------------------------------------------------------------- a Python without rwkv_hf
# Runs before the user's code in `run_without_rwkv_hf`: drops every way the (editable or regular)
# install exposes `rwkv_hf` - sys.path entries holding an `rwkv_hf` folder and setuptools' editable
# meta-path finders - then proves the package cannot be found.
_NO_RWKV_HF_PRELUDE = r"""
import importlib.util, os, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") + getattr(f, "__name__", "") + type(f).__module__).lower()]
sys.path[:] = [p for p in sys.path if not os.path.isdir(os.path.join(p or os.getcwd(), "rwkv_hf"))]
sys.path_importer_cache.clear()
if importlib.util.find_spec("rwkv_hf") is not None:
    raise SystemExit("rwkv_hf is still importable")
"""


def run_without_rwkv_hf(code: str, args: Sequence[str] = (), cwd=None, env=None, timeout: float = 600):
    """Run `code` in a fresh isolated interpreter (`python -I`) where `import rwkv_hf` fails.

    Returns the `subprocess.CompletedProcess` (text mode, output captured)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-I", "-c", _NO_RWKV_HF_PRELUDE + code, *map(str, args)],
        cwd=cwd or tempfile.gettempdir(),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def transformers_generate_loop():
    """Within it, generate() runs transformers' own `_sample` loop, not ours (`rwkv_generate`): what
    the tests and benchmarks compare our loop with."""
    from .modeling import rwkv_common

    real = rwkv_common.own_generate_loop
    rwkv_common.own_generate_loop = lambda *a, **k: None
    try:
        yield
    finally:
        rwkv_common.own_generate_loop = real
