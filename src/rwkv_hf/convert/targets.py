"""Output layouts other tools read: the folder `rwkv-hf convert --layout NAME` writes besides ours.

Each target is a layout from `layouts.py` (the tensor names and shapes) plus the config.json that
the consuming code reads. Which tool reads what (each checked by a test that runs the tool):

- `fla` (RWKV-7): flash-linear-attention's `RWKV7ForCausalLM` (`model_type: rwkv7`, `head_dim`,
  `norm_eps` and the `*_low_rank_dim` LoRA widths); llama.cpp's `convert_hf_to_gguf.py` reads the
  same folder (its `RWKV7ForCausalLM` class, the fla-hub/rwkv7-* layout).
- `rwkv-world-hf` (RWKV-5.2 / RWKV-6): the layout of the RWKV/rwkv-5-world-* and RWKV/v6-Finch-*-HF
  repos (`rwkv.blocks.N.attention.*`, `model_type: rwkv5/rwkv6`); llama.cpp reads it for RWKV-6.
  Those repos run their own remote code, which we do not ship: the folder holds weights, config,
  tokenizer and card; rwkv-hf converts it back (`rwkv-hf convert folder out`).
- `transformers` (RWKV-4): transformers' built-in `RwkvForCausalLM` (written by `hf_folder`).

The RWKV/ v5/v6 code ignores the config's channel-mix width and computes int(3.5 C) // 32 * 32; its
v6 code and llama.cpp fix the v6 LoRA widths by the model width (token-shift 32, decay 64; 64/128
at width 4096). A checkpoint with other sizes cannot be written in that layout and is refused.
fla's ln_x epsilon is head size x norm_eps where BlinkDL's is 64e-5: `--layout fla` needs head size 64.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Tuple

import torch

from .blinkdl import CheckpointError
from .layouts import FLA_RWKV7, FLA_SKIP, HF_LEGACY, Layout


def _fla_config(spec, config) -> dict:
    """fla's `RWKV7Config` keys (fla/models/rwkv7/configuration_rwkv7.py)."""
    if abs(config.head_size * config.layer_norm_epsilon - 64e-5) > 1e-12:  # fla: head_dim * norm_eps; BlinkDL: 64e-5
        raise CheckpointError(
            f"--layout fla cannot hold this RWKV-7 checkpoint: fla's ln_x epsilon is head size x {config.layer_norm_epsilon:g}, "
            f"BlinkDL's is 64e-5, and the head size is {config.head_size} (fla matches BlinkDL for head size 64 only)"
        )
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "attn_mode": "chunk",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "head_dim": config.head_size,
        "num_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "decay_low_rank_dim": config.decay_lora,
        "a_low_rank_dim": config.a_lora,
        "v_low_rank_dim": config.v_lora,
        "gate_low_rank_dim": config.gate_lora,
        "hidden_act": "sqrelu",
        "norm_first": True,
        "norm_bias": True,
        "norm_eps": config.layer_norm_epsilon,
        "vocab_size": config.vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
    }


def _world_hf_fixed_sizes(spec, config) -> Dict[str, int]:
    """Sizes the RWKV/ HF repos' code derives from the width instead of reading them."""
    C = config.hidden_size
    sizes = {"intermediate_size": int(C * 3.5) // 32 * 32}
    if spec.family == 6:
        sizes.update(mix_lora=64 if C == 4096 else 32, decay_lora=128 if C == 4096 else 64)
    return sizes


def _world_hf_config(spec, config) -> dict:
    """The config.json of the RWKV/rwkv-5-world-* and RWKV/v6-Finch-*-HF repos (their Rwkv5Config/Rwkv6Config)."""
    if spec.version not in ("5.2", "6"):
        raise CheckpointError(f"--layout rwkv-world-hf is for RWKV-5.2/RWKV-6 only (what the RWKV/ repos' code runs); this is RWKV-{spec.version}")
    fixed = _world_hf_fixed_sizes(spec, config)
    differ = [f"{k} {getattr(config, k)} (the layout implies {v})" for k, v in fixed.items() if getattr(config, k) != v]
    if differ:
        raise CheckpointError(
            f"--layout rwkv-world-hf cannot hold this RWKV-{spec.version} checkpoint: its readers derive these sizes from the width: "
            + ", ".join(differ)
        )
    return {
        "architectures": [f"Rwkv{spec.family}ForCausalLM"],
        "model_type": f"rwkv{spec.family}",
        "attention_hidden_size": config.hidden_size,
        "head_size": config.head_size,
        "head_size_divisor": 8,
        "num_attention_heads": config.num_attention_heads,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "rescale_every": 6,
        "context_length": 4096,
        "vocab_size": config.vocab_size,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "tie_word_embeddings": False,
        "use_cache": True,
    }


@dataclass(frozen=True)
class Target:
    name: str
    families: Tuple[int, ...]
    layout: Layout
    config: Callable[[object, object], dict]
    readers: str
    skip: Tuple[str, ...] = ()


TARGETS: Dict[str, Target] = {
    t.name: t
    for t in (
        Target("fla", (7,), FLA_RWKV7, _fla_config, "flash-linear-attention's RWKV7ForCausalLM; llama.cpp's convert_hf_to_gguf.py", FLA_SKIP),
        Target("rwkv-world-hf", (5, 6), HF_LEGACY, _world_hf_config, "the RWKV/ HF repos' code; llama.cpp's convert_hf_to_gguf.py (RWKV-6)"),
    )
}


def check_target(name: str, spec) -> Target:
    target = TARGETS[name]
    if spec.family not in target.families:
        versions = "/".join(f"RWKV-{f}" for f in target.families)
        raise CheckpointError(f"--layout {name} is for {versions} only; this is RWKV-{spec.version}")
    return target


def target_state_dict(target: Target, spec, config, blinkdl_sd: Mapping[str, torch.Tensor]) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(config.json dict, state dict) of `blinkdl_sd` in the target layout; raises if it cannot hold it."""
    cfg = target.config(spec, config)
    dtypes = {v.dtype for v in blinkdl_sd.values()}
    if len(dtypes) == 1:
        cfg["torch_dtype"] = str(next(iter(dtypes))).replace("torch.", "")
    return cfg, target.layout.from_blinkdl(blinkdl_sd, skip=target.skip)


def write_target_folder(
    out_dir: Path, target: Target, spec, config, blinkdl_sd: Mapping[str, torch.Tensor], save_weights, save_tokenizer, generation_config, card: str = ""
) -> List[str]:
    """Write config.json, generation config, weights (`save_weights(sd, out_dir)`), tokenizer and card."""
    cfg, sd = target_state_dict(target, spec, config, blinkdl_sd)
    (Path(out_dir) / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    generation_config.save_pretrained(out_dir)
    files = save_weights(sd, out_dir)
    save_tokenizer(out_dir)
    if card:
        (Path(out_dir) / "README.md").write_text(card, encoding="utf-8")
    return files


__all__ = ["TARGETS", "Target", "check_target", "target_state_dict", "write_target_folder"]
