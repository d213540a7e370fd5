"""The checkpoint layouts people publish RWKV weights in, each a small table mapped to BlinkDL's.

Every layout is a `Layout`: a test on the key names, and a table of rules. A rule is a regex over a
BlinkDL key and its spelling in the layout, plus optional tensor transforms each way (a transpose,
a reshape). Reading a checkpoint maps its keys onto BlinkDL's; writing (`--layout transformers`, `fla`,
`rwkv-world-hf`: see targets.py, and the tests, which build every layout from a synthetic BlinkDL
checkpoint) maps them back out. tests/test_layout_judges.py checks each against the code that defines it.

Layouts, and where their maps come from:
- `blinkdl`: BlinkDL's `.pth` (RWKV-LM, ChatRWKV); the reference `rwkv` package loads it.
- `rwkv-hf`: ours (`model.` + BlinkDL's names, `lm_head.weight`).
- `hf-legacy`: transformers' built-in RWKV-4 (`RwkvForCausalLM`, convert_rwkv_checkpoint_to_hf.py)
  and the remote-code repos RWKV/rwkv-4-world-*, rwkv-5-world-*, v6-Finch-*-HF. Pure renames:
  `rwkv.` prefix, `emb`->`embeddings`, `ln0`->`pre_ln`, `att`->`attention`, `ffn`->`feed_forward`,
  and v4/v5's `time_mix_{k,v,r,g}` -> `time_mix_{key,value,receptance,gate}` (v6 keeps `time_maa_*`).
  Every shape is BlinkDL's (v5.2's `time_decay`/`time_faaaa` stay [heads, head_size], v6's
  `time_decay` [1, 1, C]); their `rescale_every` halving happens in the model at run time, so the
  stored weights are unscaled. (A folder saved *after* running such a model in eval mode would hold
  rescaled weights; the published repos were written by the converter and are not.)
- `fla-rwkv7`: flash-linear-attention's RWKV-7 (`fla/models/rwkv7`, utils/convert_from_rwkv7.py):
  `model.layers.N.{pre_norm,attn_norm,ffn_norm}` for ln0/ln1/ln2, `attn.{r,k,v,o}_proj`, `attn.g_norm`
  for ln_x, LoRAs as `attn.{w,a,v,g}_lora.lora.{0,2}` holding `{w,a,v,g}1` and `2` transposed (torch
  Linear layout) with `{w,a,v}0` as the second Linear's bias (flattened to [C]); `k_k`, `k_a` and
  `ffn.x_k` flattened to [C]; layer 0 has no `v_lora` (v7 never uses it there), so reading fills
  BlinkDL's unused `blocks.0.att.v0/v1/v2` with zeros. The older fla `attn.x_x` [6, C] is split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch

from .blinkdl import CheckpointError

Tensor = torch.Tensor
Fn = Optional[Callable[[Tensor], Tensor]]


@dataclass(frozen=True)
class Rule:
    """`blinkdl` and `theirs` are full-key regexes with the same groups, written with `{N}` for the
    block number and `{X}` for one name from a small alternation; `read` maps their tensor to
    BlinkDL's, `write` the other way."""

    blinkdl: str
    theirs: str
    read: Fn = None
    write: Fn = None


def _t(x: Tensor) -> Tensor:
    return x.t().contiguous()


def _flat(x: Tensor) -> Tensor:
    return x.reshape(-1).contiguous()


def _row(x: Tensor) -> Tensor:
    return x.reshape(1, 1, -1).contiguous()


@dataclass
class Layout:
    name: str
    description: str
    # the layout is recognised when every one of these regexes matches some key
    signature: Tuple[str, ...]
    rules: Tuple[Rule, ...]
    # extra work after renaming, on the whole BlinkDL-layout dict (e.g. fill what the layout drops)
    after_read: Optional[Callable[[Dict[str, Tensor]], List[str]]] = None
    before_read: Optional[Callable[[Dict[str, Tensor]], None]] = None
    _compiled: list = field(default_factory=list, repr=False)

    def _table(self):
        if not self._compiled:
            for r in self.rules:
                self._compiled.append(
                    (re.compile(_expand(r.blinkdl) + "$"), _fmt(r.blinkdl), re.compile(_expand(r.theirs) + "$"), _fmt(r.theirs), r)
                )
        return self._compiled

    def matches(self, keys) -> bool:
        return all(any(re.match(s, k) for k in keys) for s in self.signature)

    def to_blinkdl(self, sd: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
        """Their state dict -> BlinkDL's. Returns (state dict, notes about what was filled in)."""
        sd = dict(sd)
        if self.before_read:
            self.before_read(sd)
        out: Dict[str, Tensor] = {}
        unknown = []
        for key, value in sd.items():
            for _, blink_fmt, theirs, _, rule in self._table():
                m = theirs.match(key)
                if m:
                    out[blink_fmt.format(*m.groups())] = rule.read(value) if rule.read else value
                    break
            else:
                unknown.append(key)
        if unknown:
            raise CheckpointError(
                f"{len(unknown)} tensor(s) this {self.name} checkpoint should not have: " + ", ".join(unknown[:5])
            )
        notes = self.after_read(out) if self.after_read else []
        return out, notes

    def from_blinkdl(self, sd: Mapping[str, Tensor], skip: Tuple[str, ...] = ()) -> Dict[str, Tensor]:
        """BlinkDL's state dict -> this layout (keys matching a regex in `skip` are left out)."""
        out = {}
        for key, value in sd.items():
            if any(re.match(s, key) for s in skip):
                continue
            for blink, _, _, theirs_fmt, rule in self._table():
                m = blink.match(key)
                if m:
                    out[theirs_fmt.format(*m.groups())] = rule.write(value) if rule.write else value
                    break
            else:
                raise CheckpointError(f"{key!r} has no place in the {self.name} layout")
        return out


_PLACEHOLDER = re.compile(r"\{(N|X:[^}]*)\}")


def _expand(pattern: str) -> str:
    """`{N}` -> a block-number group; `{X:regex}` -> a group; everything else is literal."""
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(re.escape(pattern[pos : m.start()]))
        out.append(r"(\d+)" if m.group(1) == "N" else "(" + m.group(1)[2:] + ")")
        pos = m.end()
    out.append(re.escape(pattern[pos:]))
    return "".join(out)


def _fmt(pattern: str) -> str:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pattern):
        out.append(pattern[pos : m.start()].replace("{", "{{").replace("}", "}}"))
        out.append("{}")
        pos = m.end()
    out.append(pattern[pos:].replace("{", "{{").replace("}", "}}"))
    return "".join(out)


# ----------------------------------------------------------------------------------------- blinkdl
BLINKDL = Layout(
    name="blinkdl",
    description="BlinkDL's layout (RWKV-LM / ChatRWKV .pth)",
    signature=(r"emb\.weight$", r"blocks\.0\."),
    rules=(
        Rule("emb.weight", "emb.weight"),
        Rule("head.weight", "head.weight"),
        Rule("ln_out.{X:weight|bias}", "ln_out.{X:weight|bias}"),
        Rule("blocks.{N}.{X:.+}", "blocks.{N}.{X:.+}"),
    ),
)

OURS = Layout(
    name="rwkv-hf",
    description="rwkv-hf's layout (model.* with BlinkDL's names, lm_head.weight)",
    signature=(r"model\.emb\.weight$", r"model\.blocks\.0\."),
    rules=(
        Rule("emb.weight", "model.emb.weight"),
        Rule("head.weight", "lm_head.weight"),
        Rule("ln_out.{X:weight|bias}", "model.ln_out.{X:weight|bias}"),
        Rule("blocks.{N}.{X:.+}", "model.blocks.{N}.{X:.+}"),
    ),
)

# ---------------------------------------------------- transformers RWKV-4 / RWKV World HF repos v4-v6
_MIX = {"k": "key", "v": "value", "r": "receptance", "g": "gate"}
_legacy_rules = [
    Rule("emb.weight", "rwkv.embeddings.weight"),
    Rule("head.weight", "head.weight"),
    Rule("ln_out.{X:weight|bias}", "rwkv.ln_out.{X:weight|bias}"),
    Rule("blocks.0.ln0.{X:weight|bias}", "rwkv.blocks.0.pre_ln.{X:weight|bias}"),
    Rule("blocks.{N}.{X:ln1|ln2}.{X:weight|bias}", "rwkv.blocks.{N}.{X:ln1|ln2}.{X:weight|bias}"),
]
for _short, _long in _MIX.items():
    for _part in ("att", "ffn"):
        _theirs = "attention" if _part == "att" else "feed_forward"
        _legacy_rules.append(Rule(f"blocks.{{N}}.{_part}.time_mix_{_short}", f"rwkv.blocks.{{N}}.{_theirs}.time_mix_{_long}"))
_legacy_rules += [
    Rule("blocks.{N}.att.{X:(?!time_mix_).+}", "rwkv.blocks.{N}.attention.{X:(?!time_mix_).+}"),
    Rule("blocks.{N}.ffn.{X:(?!time_mix_).+}", "rwkv.blocks.{N}.feed_forward.{X:(?!time_mix_).+}"),
]
HF_LEGACY = Layout(
    name="hf-legacy",
    description="transformers' RWKV-4 / RWKV World HF repos (rwkv.blocks.N.attention.*, feed_forward, pre_ln)",
    signature=(r"rwkv\.embeddings\.weight$", r"rwkv\.blocks\.0\.(attention|feed_forward)\."),
    rules=tuple(_legacy_rules),
)

# ------------------------------------------------------------------------------ fla RWKV-7 layout
_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj"}
_fla_rules = [
    Rule("emb.weight", "model.embeddings.weight"),
    Rule("head.weight", "lm_head.weight"),
    Rule("ln_out.{X:weight|bias}", "model.norm.{X:weight|bias}"),
    Rule("blocks.0.ln0.{X:weight|bias}", "model.layers.0.pre_norm.{X:weight|bias}"),
    Rule("blocks.{N}.ln1.{X:weight|bias}", "model.layers.{N}.attn_norm.{X:weight|bias}"),
    Rule("blocks.{N}.ln2.{X:weight|bias}", "model.layers.{N}.ffn_norm.{X:weight|bias}"),
    Rule("blocks.{N}.att.ln_x.{X:weight|bias}", "model.layers.{N}.attn.g_norm.{X:weight|bias}"),
    Rule("blocks.{N}.att.{X:x_r|x_w|x_k|x_v|x_a|x_g|r_k}", "model.layers.{N}.attn.{X:x_r|x_w|x_k|x_v|x_a|x_g|r_k}"),
    Rule("blocks.{N}.att.{X:k_k|k_a}", "model.layers.{N}.attn.{X:k_k|k_a}", read=_row, write=_flat),
    Rule("blocks.{N}.att.{X:w|a|v|g}1", "model.layers.{N}.attn.{X:w|a|v|g}_lora.lora.0.weight", read=_t, write=_t),
    Rule("blocks.{N}.att.{X:w|a|v|g}2", "model.layers.{N}.attn.{X:w|a|v|g}_lora.lora.2.weight", read=_t, write=_t),
    Rule("blocks.{N}.att.{X:w|a|v}0", "model.layers.{N}.attn.{X:w|a|v}_lora.lora.2.bias", read=_row, write=_flat),
    Rule("blocks.{N}.ffn.x_k", "model.layers.{N}.ffn.x_k", read=_row, write=_flat),
    Rule("blocks.{N}.ffn.{X:key|value}.weight", "model.layers.{N}.ffn.{X:key|value}.weight"),
]
for _blink, _proj in _PROJ.items():
    _fla_rules.append(Rule(f"blocks.{{N}}.att.{_blink}.weight", f"model.layers.{{N}}.attn.{_proj}.weight"))


def _fla_split_x_x(sd: Dict[str, Tensor]) -> None:
    """Older fla checkpoints keep the six token-shift mixes as one `attn.x_x` [6, C]."""
    for key in [k for k in sd if k.endswith(".attn.x_x")]:
        x_x = sd.pop(key)
        for i, name in enumerate(("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")):
            sd[key[: -len("x_x")] + name] = x_x[i].reshape(1, 1, -1).clone()


def _fla_fill_layer0_value_lora(sd: Dict[str, Tensor]) -> List[str]:
    """fla drops layer 0's value-residual LoRA (v7 never uses it); BlinkDL keeps it. Fill zeros."""
    if "blocks.0.att.v1" in sd or "blocks.0.att.w1" not in sd:
        return []
    C = sd["blocks.0.att.w1"].shape[0]
    v_lora = sd["blocks.1.att.v1"].shape[1] if "blocks.1.att.v1" in sd else 32
    dtype = sd["blocks.0.att.w1"].dtype
    sd["blocks.0.att.v0"] = torch.zeros(1, 1, C, dtype=dtype)
    sd["blocks.0.att.v1"] = torch.zeros(C, v_lora, dtype=dtype)
    sd["blocks.0.att.v2"] = torch.zeros(v_lora, C, dtype=dtype)
    return ["layer 0's unused value-residual LoRA (v0/v1/v2) is absent in this layout; filled with zeros"]


FLA_RWKV7 = Layout(
    name="fla-rwkv7",
    description="flash-linear-attention's RWKV-7 (model.layers.N.attn.r_proj, *_lora.lora.*)",
    signature=(r"model\.embeddings\.weight$", r"model\.layers\.0\.attn\.(r_proj|w_lora)"),
    rules=tuple(_fla_rules),
    before_read=_fla_split_x_x,
    after_read=_fla_fill_layer0_value_lora,
)
# fla never stores layer 0's value-residual LoRA
FLA_SKIP = (r"blocks\.0\.att\.v[012]$",)

LAYOUTS: Dict[str, Layout] = {l.name: l for l in (BLINKDL, OURS, HF_LEGACY, FLA_RWKV7)}


def detect_layout(keys) -> Layout:
    keys = list(keys)
    for layout in LAYOUTS.values():
        if layout.matches(keys):
            return layout
    sample = ", ".join(keys[:4]) if keys else "no tensors"
    raise CheckpointError(f"not an RWKV checkpoint in any known layout (first keys: {sample})")


def to_blinkdl(sd: Mapping[str, Tensor]) -> Tuple[Layout, Dict[str, Tensor], List[str]]:
    """Detect the layout and map the state dict onto BlinkDL's keys and shapes."""
    layout = detect_layout(sd.keys())
    out, notes = layout.to_blinkdl(sd)
    return layout, out, notes


__all__ = ["LAYOUTS", "Layout", "Rule", "detect_layout", "to_blinkdl", "FLA_SKIP"]
