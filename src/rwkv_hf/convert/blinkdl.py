"""BlinkDL's checkpoint layout: detect the version, read every size from tensor shapes, map the keys.

The rules are the reference package's (`rwkv/model.py`): `ln_x` -> at least 5, `gate.weight` -> at
least 5.1, a 2-D `time_decay` -> 5.2, `time_maa` -> 6, `r_k`/`x_r` -> 7. One small `VersionSpec` per
version says how to read its config from the shapes; the keys themselves map 1:1 (our parameter
names are BlinkDL's), so a converted model exports back bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Tuple

import torch

from ..modeling.configuration_rwkv4 import Rwkv4Config
from ..modeling.configuration_rwkv5 import Rwkv5Config
from ..modeling.configuration_rwkv6 import Rwkv6Config
from ..modeling.configuration_rwkv7 import Rwkv7Config


class CheckpointError(ValueError):
    """A checkpoint that is not a usable RWKV state dict; the message names the problem."""


_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> Tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"missing tensor {key!r}")
    return tuple(sd[key].shape)


def detect_version(sd: Mapping[str, torch.Tensor]) -> str:
    """'4', '5.0', '5.1', '5.2', '6' or '7', by the reference package's rules."""
    keys = list(sd)
    if not any(k == "emb.weight" for k in keys) or not any(_BLOCK.match(k) for k in keys):
        sample = ", ".join(keys[:5]) or "no tensors"
        raise CheckpointError(f"not an RWKV checkpoint in BlinkDL's layout (no emb.weight / blocks.N.*; keys: {sample})")
    if any(k.endswith("att.r_k") or k.endswith("att.x_r") for k in keys):
        return "7"
    if any("time_maa" in k for k in keys):
        return "6"
    if not any("ln_x" in k for k in keys):
        return "4"
    decay = _shape(sd, "blocks.0.att.time_decay")
    if len(decay) > 1 and decay[1] > 1:
        return "5.2"
    return "5.1" if any(k.endswith("att.gate.weight") for k in keys) else "5.0"


def check_block_numbers(sd: Mapping[str, torch.Tensor]) -> int:
    """The number of blocks, once their numbers are 0..n-1 without a gap: the layer count is read from
    the highest number, so one forged `blocks.20000.*` must not make a 20,001-layer model."""
    numbers = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    for i, n in enumerate(numbers):
        if n != i:
            example = next(k for k in sd if (m := _BLOCK.match(k)) and int(m.group(1)) == n)
            raise CheckpointError(f"block {i} is missing but {example} is there: blocks must be numbered 0..n-1")
    return len(numbers)


def _common(sd, version: str) -> dict:
    vocab, C = _shape(sd, "emb.weight")
    layers = check_block_numbers(sd)
    return dict(
        vocab_size=vocab,
        hidden_size=C,
        num_hidden_layers=layers,
        intermediate_size=_shape(sd, "blocks.0.ffn.key.weight")[0],
    )


def _v4(sd) -> dict:
    return dict(attention_hidden_size=_shape(sd, "blocks.0.att.key.weight")[0])


def _v5(version: str) -> Callable[[Mapping], dict]:
    def read(sd) -> dict:
        C = _shape(sd, "emb.weight")[1]
        heads = _shape(sd, "blocks.0.att.time_decay")[0]
        return dict(rwkv_version=version, head_size=C // heads)

    return read


def _v6(sd) -> dict:
    return dict(
        head_size=_shape(sd, "blocks.0.att.time_faaaa")[1],
        mix_lora=_shape(sd, "blocks.0.att.time_maa_w1")[1] // 5,
        decay_lora=_shape(sd, "blocks.0.att.time_decay_w1")[1],
    )


def _v7(sd) -> dict:
    # layer 0 never uses v0/v1/v2; read the value-residual width from a later layer if it lacks them
    v_layer = 0 if "blocks.0.att.v1" in sd else 1
    return dict(
        head_size=_shape(sd, "blocks.0.att.r_k")[1],
        decay_lora=_shape(sd, "blocks.0.att.w1")[1],
        a_lora=_shape(sd, "blocks.0.att.a1")[1],
        v_lora=_shape(sd, f"blocks.{v_layer}.att.v1")[1],
        gate_lora=_shape(sd, "blocks.0.att.g1")[1],
        # DeepEmbed checkpoints (ffn.s_emb/s_emb_x/s0/s1/s2): the rank is the width of ffn.s1
        deep_embed_size=_shape(sd, "blocks.0.ffn.s1")[1] if "blocks.0.ffn.s1" in sd else 0,
    )


@dataclass(frozen=True)
class VersionSpec:
    version: str
    family: int  # which modeling_rwkvN.py
    config_cls: type
    read_config: Callable[[Mapping], dict]


SPECS: Dict[str, VersionSpec] = {
    "4": VersionSpec("4", 4, Rwkv4Config, _v4),
    "5.0": VersionSpec("5.0", 5, Rwkv5Config, _v5("5.0")),
    "5.1": VersionSpec("5.1", 5, Rwkv5Config, _v5("5.1")),
    "5.2": VersionSpec("5.2", 5, Rwkv5Config, _v5("5.2")),
    "6": VersionSpec("6", 6, Rwkv6Config, _v6),
    "7": VersionSpec("7", 7, Rwkv7Config, _v7),
}


def config_from_state_dict(sd: Mapping[str, torch.Tensor]):
    """Detect the version and build its config from the tensor shapes alone."""
    version = detect_version(sd)
    spec = SPECS[version]
    kwargs = _common(sd, version)
    kwargs.update(spec.read_config(sd))
    if kwargs["hidden_size"] % kwargs.get("head_size", 1):
        raise CheckpointError(f"width {kwargs['hidden_size']} is not a multiple of the head size {kwargs['head_size']}")
    return spec, spec.config_cls(**kwargs)


def to_hf_key(key: str) -> str:
    """BlinkDL key -> our parameter name."""
    return "lm_head.weight" if key == "head.weight" else "model." + key


def to_blinkdl_key(key: str) -> str:
    """Our parameter name -> BlinkDL key."""
    if key == "lm_head.weight":
        return "head.weight"
    if not key.startswith("model."):
        raise CheckpointError(f"unexpected parameter {key!r}")
    return key[len("model.") :]
