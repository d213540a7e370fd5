"""What every RWKV version shares: the recurrent state as a transformers `Cache`, padding masks, the
block skeleton, the model body and the causal-LM head with generation support.

Each `modeling_rwkvN.py` only writes its time-mix and channel-mix (the equations of that version) and
plugs them into the classes here.
"""

from __future__ import annotations

import shutil
import sys
import weakref
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .rwkv_peft import register_lora_targets
from .rwkv7_deepembed import deep_embed_inputs
from .rwkv_loss import linear_cross_entropy, shifted_targets
from .rwkv_state import RwkvStateMixin, initial_wkv
from .rwkv_ops import exporting

Tensor = torch.Tensor
register_lora_targets()  # LoraConfig() without target_modules works for our model types


# -------------------------------------------------------------------------------------------- state
def _map_tensors(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(fn, o) for o in obj)
    return obj


def _flat_tensors(obj: Any) -> List[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    return [t for o in obj for t in _flat_tensors(o)] if isinstance(obj, (tuple, list)) else []


def _zip_tensors(fn: Callable[[Tensor, Tensor], Tensor], a: Any, b: Any) -> Any:
    """fn over the tensors of two states of the same structure."""
    if isinstance(a, Tensor):
        return fn(a, b)
    return type(a)(_zip_tensors(fn, x, y) for x, y in zip(a, b))


class RwkvCache(Cache):
    """The recurrent state of an RWKV model, as a transformers `Cache`.

    `layers_state[i]` is the state of layer i: `(att_shift [B, C], wkv, ffn_shift [B, C])`, where wkv is
    the fp32 matrix state `[B, H, N, N]` (v5-v7) or the `(aa, bb, pp)` triple `[B, C]` each (v4).
    `seen_tokens` counts the columns consumed so far (padding included), which is what `generate()`
    needs to know which input ids are new. A state cannot be cropped: it holds no per-token history.
    While CUDA-graph decoding (see rwkv_decode) the state tensors are the graph's buffers and change in
    place from step to step: take snapshots with `clone()`, not by keeping references to them.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.layers_state: List[Optional[tuple]] = [None] * num_layers
        self.seen_tokens = 0

    def __repr__(self):
        return f"RwkvCache(num_layers={self.num_layers}, seen_tokens={self.seen_tokens})"

    def __len__(self):
        return self.num_layers

    def __getitem__(self, layer_idx: int) -> Tuple[Tensor, ...]:
        """Layer `layer_idx`'s state as a flat tuple of tensors (`cache[i]`, as transformers reads a cache per
        layer; empty before the layer has run)."""
        if not -self.num_layers <= layer_idx < self.num_layers:
            raise IndexError(f"the cache has {self.num_layers} layers, not a layer {layer_idx}")
        return tuple(_flat_tensors(self.layers_state[layer_idx]))

    def __iter__(self):
        return (self[i] for i in range(self.num_layers))

    @property
    def is_linear(self) -> List[bool]:
        return [True] * self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> Optional[int]:
        for s in self.layers_state:
            if s is not None:
                return s[0].shape[0]
        return None

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.layers_state = [_map_tensors(fn, s) for s in self.layers_state]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b of the new state is row beam_idx[b] of the old one."""
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise ValueError("an RWKV state holds no per-token history and cannot be cropped")

    def reset(self) -> None:
        self.layers_state = [None] * self.num_layers
        self.seen_tokens = 0

    def to(self, *args, **kwargs) -> "RwkvCache":
        self._apply(lambda t: t.to(*args, **kwargs))
        return self

    def clone(self) -> "RwkvCache":
        """An independent copy, e.g. to branch a conversation from a shared prompt state."""
        new = RwkvCache(self.num_layers)
        new.layers_state = [_map_tensors(lambda t: t.clone(), s) for s in self.layers_state]
        new.seen_tokens = self.seen_tokens
        return new


# v4-v6: the reference keeps the decay, the bonus and ln_x in fp32 whatever the model's dtype; loading
# with dtype=fp16/bf16 does the same here (transformers' `_keep_in_fp32_modules_strict`), and so does
# building from a config in any dtype (`RwkvPreTrainedModel.post_init`). Whole names only: v6's decay
# LoRA `time_decay_w1/w2` stays in the model's dtype, as in the reference.
FP32_PARAMS = ["time_decay", "time_first", "time_faaaa", "ln_x"]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _is_fp32_param(name: str, fp32_names) -> bool:
    return any(part in fp32_names for part in name.split("."))


# -------------------------------------------------------------------------------------------- masks
def token_shift(x: Tensor, prev: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The token shift: for each position, the vector of the previous *real* token.

    x [B, T, C]; prev [B, C] is the last real token before this chunk (from the state).
    Returns (shifted [B, T, C], the new prev [B, C]). Masked positions are skipped: the shift
    carries the last real token's vector across them, so they change nothing.
    """
    if mask is None:
        if x.shape[1] == 1:  # decoding: the previous token is the state's vector
            return prev.unsqueeze(1), x[:, 0]
        return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1), x[:, -1]
    B, T, C = x.shape
    pos = torch.arange(1, T + 1, device=x.device).expand(B, T)
    if exporting():  # ONNX has no cummax: the position of the n-th real token, n = real tokens up to t
        real = mask.long()
        n = real.cumsum(1)
        nth = torch.zeros(B, T + 1, dtype=pos.dtype, device=x.device).scatter(1, n * real, pos * real)
        last_incl, last_excl = torch.gather(nth, 1, n), torch.gather(nth, 1, n - real)
    else:
        last_incl = torch.cummax(torch.where(mask, pos, torch.zeros_like(pos)), dim=1).values  # 0 = from state
        last_excl = F.pad(last_incl[:, :-1], (1, 0))
    ext = torch.cat([prev.unsqueeze(1), x], dim=1)  # index 0 is the state's vector
    shifted = torch.gather(ext, 1, last_excl.unsqueeze(-1).expand(B, T, C))
    new_prev = torch.gather(ext, 1, last_incl[:, -1:].unsqueeze(-1).expand(B, 1, C)).squeeze(1)
    return shifted, new_prev


def group_norm_fp32(norm: nn.GroupNorm, y: Tensor) -> Tensor:
    """v5/v6 `ln_x`: the reference keeps its parameters and the WKV output in fp32 for the GroupNorm."""
    return F.group_norm(y.float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)


def rescale(x: Tensor, scale: float) -> Tensor:
    """x * scale, skipped when the scale is 1 (always, except v4-v6 in fp16)."""
    return x if scale == 1.0 else x * scale


def mix(x: Tensor, prev: Tensor, coeff: Tensor) -> Tensor:
    """The v4/v5 token-shift interpolation: x * coeff + x_prev * (1 - coeff)."""
    return torch.addcmul(x * coeff, prev, 1 - coeff)


# RWKV-7: log w = -0.606531 * sigmoid(.) keeps every decay in (exp(-0.607), 1) (0.606531 ~ exp(-0.5))
DECAY_SCALE = 0.606531


def relu_square(x: Tensor) -> Tensor:
    """relu(x)^2 of the channel mixes (relu in place on a fresh matmul output; square is x * x, faster than pow)."""
    return torch.square(torch.relu_(x))


def check_ids(input_ids: Tensor, vocab_size: int) -> None:
    """A clear error for ids outside the vocabulary (else: an index error deep inside the embedding).
    Not in an exported graph, which cannot raise."""
    if not exporting() and input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        raise ValueError(
            f"input_ids must be in [0, {vocab_size}); got values in [{int(input_ids.min())}, {int(input_ids.max())}]"
        )


def normalize_mask(attention_mask: Optional[Tensor], shape: Tuple[int, int], device) -> Optional[Tensor]:
    """A [B, T] bool mask, or None when every position is real (the fast path)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask must be [batch, seq_len] = {list(shape)} with 1 for real tokens and 0 for padding; "
            f"got shape {list(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    return None if not exporting() and bool(mask.all()) else mask  # (an exported graph keeps the mask)


def document_starts(
    position_ids: Optional[Tensor], cu_seq_lens: Optional[Tensor], shape: Tuple[int, int], mask: Optional[Tensor]
) -> Optional[Tensor]:
    """Packed sequences (transformers' `DataCollatorWithFlattening`): a [B, T] bool tensor, True where a
    new document begins inside a row, or None when no row holds more than one.

    A document begins where `position_ids` restart at 0, or at the offsets of `cu_seq_lens` (the
    flash-attention form, one flattened row), after a real token of its row (so left padding, where the
    first real token has position 0, starts nothing). There the state starts afresh: each document's
    outputs are those of the document run alone; a row's first document continues from the row's state.
    """
    B, T = shape
    if cu_seq_lens is not None:
        if B != 1:
            raise ValueError(f"cu_seq_lens describes one flattened row; the input has {B} rows")
        offsets = cu_seq_lens.to(dtype=torch.long)
        if offsets.dim() != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != T or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"cu_seq_lens must rise from 0 to the sequence length {T}; got {offsets.tolist()}")
        starts = torch.zeros(1, T, dtype=torch.bool, device=offsets.device)
        starts[0, offsets[(offsets > 0) & (offsets < T)]] = True
        return starts if bool(starts.any()) else None
    if position_ids is None or T < 2:
        return None
    if tuple(position_ids.shape[-2:]) != (B, T) and tuple(position_ids.shape) != (T,):
        raise ValueError(f"position_ids must be [batch, seq_len] = {[B, T]}; got shape {list(position_ids.shape)}")
    starts = position_ids.expand(B, T) == 0
    real = torch.ones(B, T, dtype=torch.bool, device=starts.device) if mask is None else mask.to(starts.device)
    starts = starts & (F.pad(real.long().cumsum(1)[:, :-1], (1, 0)) > 0)  # a real token before it
    return starts if bool(starts.any()) else None


# -------------------------------------------------------------------------------------------- block
class RwkvBlock(GradientCheckpointingLayer):
    """LayerNorms and residuals around a version's time-mix and channel-mix.

    x = x + att(ln1(x)); x = x + ffn(ln2(x)); block 0 first applies ln0 to the embedding.
    In fp16, v4-v6 scale each branch by 2^-(layer // rescale_every) and halve x after every
    `rescale_every` layers, as the reference does (on the fly here, so the weights stay as loaded).
    """

    def __init__(self, config, layer_id: int, time_mix_cls, channel_mix_cls):
        super().__init__()
        self.layer_id = layer_id
        C, eps = config.hidden_size, config.layer_norm_epsilon
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C, eps=eps)
        self.ln1 = nn.LayerNorm(C, eps=eps)
        self.ln2 = nn.LayerNorm(C, eps=eps)
        self.att = time_mix_cls(config, layer_id)
        self.ffn = channel_mix_cls(config, layer_id)
        self.rescale_every = getattr(config, "rescale_every", 0)

    def zero_state(self, batch_size: int, device, dtype) -> tuple:
        shift = torch.zeros(batch_size, self.ln1.normalized_shape[0], device=device, dtype=dtype)
        wkv = initial_wkv(self.att, batch_size, device)  # a loaded or tuned state (rwkv_state), else zeros
        return (shift, self.att.zero_wkv(batch_size, device) if wkv is None else wkv, shift.clone())

    def norm_embedding(self, x: Tensor) -> Tensor:
        """Block 0's ln0 of the embedding: the reference normalises it in fp32 before casting it."""
        ln0 = self.ln0
        return F.layer_norm(x.float(), ln0.normalized_shape, ln0.weight.float(), ln0.bias.float(), ln0.eps).to(x.dtype)

    def forward(self, x: Tensor, state: tuple, mask: Optional[Tensor], v_first: Optional[Tensor], mode: Optional[str], deep=None):
        if self.layer_id == 0:
            x = self.norm_embedding(x)
        rescale = self.rescale_every > 0 and x.dtype == torch.float16
        scale = 0.5 ** (self.layer_id // self.rescale_every) if rescale else 1.0
        att_shift, wkv, ffn_shift = state
        out, att_shift, wkv, v_first = self.att(self.ln1(x), att_shift, wkv, mask, v_first, mode, scale)
        x = x + out
        if deep is None:
            out, ffn_shift = self.ffn(self.ln2(x), ffn_shift, mask, scale)
        else:  # DeepEmbed RWKV-7 (rwkv7_deepembed)
            out, ffn_shift = self.ffn(self.ln2(x), ffn_shift, mask, scale, deep)
        x = x + out
        if rescale and (self.layer_id + 1) % self.rescale_every == 0:
            x = x / 2
        return x, (att_shift, wkv, ffn_shift), v_first


# -------------------------------------------------------------------------------------------- model
# transformers 5 renamed `past_key_values` to `cache` (in outputs, generate() and forward kwargs);
# 4.57 still uses the old name. We accept both on input and fill whichever the installed line reads.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def loading_problems(info: dict) -> List[str]:
    """transformers' loading report (`output_loading_info`, 4.57 and 5.x) as short phrases naming the
    weights; empty when every weight was found and fitted."""
    out = []
    for field, what in (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of another shape")):
        names = sorted(k if isinstance(k, str) else k[0] for k in (info.get(field) or ()))
        if names:
            out.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    return out


class RwkvPreTrainedModel(PreTrainedModel):
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _is_stateful = True
    _supports_cache_class = True
    _no_split_modules = ["RwkvBlock"]
    _keep_in_fp32_modules_strict: List[str] = []

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """transformers' loader, except that weights which do not fit config.json (missing, unexpected,
        another shape) raise one ValueError naming them, where transformers would log a report and run
        with random or dropped weights. With `output_loading_info=True` the report is returned instead."""
        if kwargs.get("output_loading_info"):
            return super().from_pretrained(*args, **kwargs)
        kwargs.setdefault("ignore_mismatched_sizes", True)  # report mismatched shapes here, as one line
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = loading_problems(info)
        if problems:
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"{where}: the weights do not match config.json: {'; '.join(problems)}")
        return model

    def post_init(self):
        # keep only the fp32 names this model has (transformers 4.57 rejects names that are not there)
        fp32 = self._keep_in_fp32_modules_strict
        if fp32:
            names = {part for name, _ in self.named_parameters() for part in name.split(".")}
            fp32 = [m for m in fp32 if m in names]
            # transformers 4.57 matches these as whole dotted names; 5.x searches them as patterns
            # anywhere in a name ("time_decay" would also take "time_decay_w1"): there, whole words only
            self._keep_in_fp32_modules_strict = [rf"(?<!\w){m}(?!\w)" for m in fp32] if TRANSFORMERS_5 else fp32
        super().post_init()
        # built from a config in half precision (`from_config(dtype=...)`, a default dtype): same rule
        for name, param in self.named_parameters():
            if fp32 and _is_fp32_param(name, fp32) and param.dtype != torch.float32:
                param.data = param.data.float()

    def _init_weights(self, module: nn.Module) -> None:
        """For models built from a config (training from scratch, tests); conversion loads every tensor."""
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        if hasattr(module, "init_parameters"):
            module.init_parameters()

    def save_pretrained(self, save_directory, *args, push_to_hub: bool = False, **kwargs):
        """transformers' save, plus what a converted folder has, so that the folder loads with
        `trust_remote_code=True` where rwkv-hf is not installed: `auto_map` naming this model's
        classes, the model code files it names (this flat folder), the World tokenizer files unless the
        folder already has a tokenizer (`tokenizer.save_pretrained` writes its own, and wins), and a
        model card unless there is one."""
        self.config.auto_map = _auto_map(self)
        super().save_pretrained(save_directory, *args, **kwargs)
        if args[0] if args else kwargs.get("is_main_process", True):
            _write_self_contained(self, Path(save_directory))
        if push_to_hub:  # transformers' own push would run before the files above exist
            hub = {k: kwargs[k] for k in ("commit_message", "private", "token", "create_pr", "revision") if k in kwargs}
            self.push_to_hub(kwargs.get("repo_id", Path(save_directory).name), **hub)


# ------------------------------------------------------------------------------------------- saving
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "rwkv_vocab_v20230424.txt",
                    "tokenization_rwkv_world.py", "tokenization_rwkv_world_fast.py", "tokenizer_json_rwkv_world.py")


def _auto_map(model) -> dict:
    """`auto_map` for this model's version: its config, base model and causal-LM classes."""
    cls = next(c for c in type(model).__mro__ if c.__module__.rsplit(".", 1)[-1].startswith("modeling_rwkv"))
    if getattr(cls, "model_cls", None):
        lm_cls = cls
    else:
        lm_cls = next(c for c in vars(sys.modules[cls.__module__]).values() if getattr(c, "model_cls", None) is cls)

    def name(c: type) -> str:
        return f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}"

    return {"AutoConfig": name(type(model.config)), "AutoModel": name(lm_cls.model_cls), "AutoModelForCausalLM": name(lm_cls)}


def _write_self_contained(model, out: Path) -> None:
    here = Path(__file__).resolve().parent
    for f in here.glob("*.py"):  # the model code is this flat folder (as remote code: the files copied with it)
        if f.name != "__init__.py" and f.resolve() != (out / f.name).resolve():
            shutil.copyfile(f, out / f.name)
    if not (out / "tokenizer_config.json").exists():
        try:  # rwkv-hf installed: its tokenizer files
            from rwkv_hf.tokenization import save_tokenizer_files

            save_tokenizer_files(out)
        except ImportError:  # running as remote code: the tokenizer of the folder the model came from, if local
            src = Path(str(model.name_or_path))
            if (src / "tokenizer_config.json").is_file() and src.resolve() != out.resolve():
                for name in _TOKENIZER_FILES:
                    if (src / name).is_file():
                        shutil.copyfile(src / name, out / name)
    if not (out / "README.md").exists():
        (out / "README.md").write_text(_model_card(model, out.name), encoding="utf-8")


def _model_card(model, name: str) -> str:
    version = getattr(model.config, "rwkv_version", model.config.model_type.replace("rwkv", "").replace("_world", ""))
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- rwkv
---

# {name}

An RWKV-{version} World model ({model.config.num_hidden_layers} layers, width {model.config.hidden_size}), saved with
`save_pretrained`. The model code is in this folder:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```

With rwkv-hf installed, `import rwkv_hf` first and leave out `trust_remote_code`.
"""


class RwkvModelBase(RwkvPreTrainedModel):
    """Embedding, blocks, final LayerNorm. Subclasses set `time_mix_cls`, `channel_mix_cls`, `init_state`."""

    time_mix_cls: type = None
    channel_mix_cls: type = None

    def __init__(self, config):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(
            [RwkvBlock(config, i, self.time_mix_cls, self.channel_mix_cls) for i in range(config.num_hidden_layers)]
        )
        self.ln_out = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.emb

    def set_input_embeddings(self, value):
        self.emb = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        cache: Optional[RwkvCache] = None,
        past_key_values: Optional[RwkvCache] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        wkv_mode: Optional[str] = None,
        keep_last: int = 0,
        position_ids: Optional[Tensor] = None,
        cu_seq_lens_q: Optional[Tensor] = None,
        **kwargs,
    ) -> Union[BaseModelOutputWithPast, tuple]:
        """`keep_last` k > 0: `last_hidden_state` holds only the last k positions (all the causal LM's
        `logits_to_keep` needs; with long inputs, the others are never all in memory at once).

        `position_ids` play no part in the equations, except that a restart at 0 inside a row (or the
        offsets of `cu_seq_lens_q`) marks packed documents: each starts from a fresh state."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            check_ids(input_ids, self.config.vocab_size)
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if T == 0:
            raise ValueError("the input has no tokens")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        cache = cache if cache is not None else past_key_values
        if cache is not None and not isinstance(cache, RwkvCache):
            raise TypeError(f"an RWKV model's cache must be an RwkvCache, got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = RwkvCache(len(self.blocks))
        if cache is not None and cache.batch_size not in (None, B):
            raise ValueError(f"the cache holds a batch of {cache.batch_size} but the input has {B} rows")
        device = (input_ids if input_ids is not None else inputs_embeds).device
        mask = normalize_mask(attention_mask, (B, T), device)
        mode = wkv_mode or self.config.wkv_mode

        def embed(part: slice) -> Tensor:
            return self.emb(input_ids[:, part]) if input_ids is not None else inputs_embeds[:, part]

        def ids(part: slice) -> Optional[Tensor]:
            return None if input_ids is None else input_ids[:, part]

        all_hidden = [] if output_hidden_states else None
        keep = keep_last if keep_last and keep_last < T and all_hidden is None else 0
        segment = getattr(self.config, "prefill_segment", 0) or T
        starts = None if exporting() else document_starts(position_ids, cu_seq_lens_q, (B, T), mask)
        if starts is not None:
            x = self._packed(embed(slice(None)), mask, starts.to(device), cache, mode, all_hidden, ids(slice(None)))
        elif not exporting() and T > segment and all_hidden is None:  # (an exported graph takes any length at once)
            # a long input in segments: the state carries over, activations exist for one segment at a
            # time, and only the segments' outputs that are asked for are kept
            state = cache if cache is not None else RwkvCache(len(self.blocks))
            outs = []
            for t in range(0, T, segment):
                part = slice(t, t + segment)
                x = self._blocks(embed(part), None if mask is None else mask[:, part], state, mode, input_ids=ids(part))
                if keep:
                    x = x[:, max(0, T - keep - t) :]
                outs.append(x)
            x = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        else:
            x = self._blocks(embed(slice(None)), mask, cache, mode, all_hidden, input_ids=ids(slice(None)))
        if keep:
            x = x[:, -keep:]
        x = self.ln_out(x)
        if all_hidden is not None:
            all_hidden.append(x)
        if cache is not None:
            cache.seen_tokens += T
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
            **{CACHE_FIELD: cache},
        )
        return out if return_dict is not False else out.to_tuple()

    def _packed(
        self, x: Tensor, mask: Optional[Tensor], starts: Tensor, cache: Optional[RwkvCache], mode, all_hidden=None, input_ids=None
    ) -> Tensor:
        """Packed rows (see `document_starts`): every document becomes a row of a right-padded batch
        (padding changes nothing, see `normalize_mask`), runs through the blocks from a fresh state (a
        row's first document: from the row's state in `cache`), and its outputs go back in place. The
        cache ends with each row's last document's state."""
        B, T, C = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        doc = starts.long().cumsum(1)  # document number within the row
        count = doc[:, -1] + 1
        first = F.pad(count.cumsum(0)[:-1], (1, 0))  # the number of each row's first document overall
        rows = (doc + first[:, None]).reshape(-1)  # each column's document, overall
        begin = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
        cols = (pos - begin).reshape(-1)  # each column's place in its document
        D, L = int(count.sum()), int(cols.max()) + 1

        def unpack(t: Tensor) -> Tensor:  # [B, T, ...] -> [D, L, ...], zeros past a document's end
            return t.new_zeros(D, L, *t.shape[2:]).index_put((rows, cols), t.reshape(B * T, *t.shape[2:]))

        def repack(t: Tensor) -> Tensor:
            return t[rows, cols].reshape(B, T, *t.shape[2:])

        real = unpack(torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None else mask)
        docs = None
        if cache is not None:
            docs = RwkvCache(len(self.blocks))
            for i, block in enumerate(self.blocks):
                if cache.layers_state[i] is not None:
                    zero = block.zero_state(D, x.device, x.dtype)
                    docs.layers_state[i] = _zip_tensors(lambda z, s: z.index_put((first,), s.to(z.dtype)), zero, cache.layers_state[i])
        hidden = [] if all_hidden is not None else None
        ids = None if input_ids is None else unpack(input_ids[..., None])[..., 0]
        y = self._blocks(unpack(x), None if bool(real.all()) else real, docs, mode, hidden, input_ids=ids)
        if all_hidden is not None:
            all_hidden.extend(repack(h) for h in hidden)
        if cache is not None:
            last = first + count - 1
            cache.layers_state = [_map_tensors(lambda t: t[last], s) for s in docs.layers_state]
        return repack(y)

    def _blocks(self, x: Tensor, mask: Optional[Tensor], cache: Optional[RwkvCache], mode, all_hidden=None, input_ids=None) -> Tensor:
        """x [B, T, C] through every block, from the state in `cache` (None: zeros), which it updates.
        Appends each block's input to `all_hidden` if given. (`input_ids`: for DeepEmbed RWKV-7.)"""
        B = x.shape[0]
        v_first = None
        deep = deep_embed_inputs(input_ids, lambda: self.blocks[0].norm_embedding(x)) if getattr(self.config, "deep_embed_size", 0) else None
        for i, block in enumerate(self.blocks):
            if all_hidden is not None:
                all_hidden.append(x)
            state = cache.layers_state[i] if cache is not None else None
            if state is None:
                state = block.zero_state(B, x.device, x.dtype)
            x, new_state, v_first = block(x, state, mask, v_first, mode) if deep is None else block(x, state, mask, v_first, mode, deep)
            if cache is not None:
                cache.layers_state[i] = new_state
        return x


_GRAPH_SAFE = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.ModuleList)
# this package's modules, installed (rwkv_hf.modeling.*) or as remote code (transformers_modules.<folder>.*)
_OUR_MODULES = (__name__.rsplit(".", 1)[0] + ".",)

# Which modules a model holds changes rarely (PEFT injecting adapters, a user swapping a layer); hooks
# can come and go at any step. `_plain_modules` walks the module tree only when a submodule was
# registered anywhere since its last walk (counted by torch's global registration hook) and otherwise
# checks the hook dicts it kept from that walk: ~5 us a step instead of ~250 us for 24 layers. (A
# module written straight into a parent's `_modules` dict, bypassing setattr/add_module, goes unseen.)
_MODULE_REGISTRATIONS = [0]


def _count_registration(module, name, submodule):
    _MODULE_REGISTRATIONS[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
_PLAIN_CHECKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _global_hooks() -> bool:
    """Forward hooks registered for every module (torch's global ones)."""
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


class RwkvForCausalLMBase(RwkvStateMixin, RwkvPreTrainedModel, GenerationMixin):
    """The language-model head over a version's model. Subclasses set `model_cls` (and list
    `GenerationMixin` among their own bases: transformers' `can_generate` looks at the direct ones).
    State files and state tuning: `RwkvStateMixin` (rwkv_state)."""

    model_cls: type = None
    # with config.tie_word_embeddings, lm_head.weight is the embedding matrix (transformers ties them;
    # 5.x names the source of each tied weight, 4.57 only the tied ones)
    _tied_weights_keys = {"lm_head.weight": "model.emb.weight"} if TRANSFORMERS_5 else ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_cls(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.emb

    def set_input_embeddings(self, value):
        self.model.emb = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        cache: Optional[RwkvCache] = None,
        past_key_values: Optional[RwkvCache] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: Union[int, Tensor] = 0,
        wkv_mode: Optional[str] = None,
        position_ids: Optional[Tensor] = None,
        **kwargs,
    ) -> Union[CausalLMOutputWithPast, tuple]:
        """`logits_to_keep`: 0 computes logits everywhere; k > 0 only for the last k positions; a tensor
        of indices only there. `labels` give the mean shifted cross-entropy, ignoring -100 (or keyword
        `shift_labels`, already shifted; with keyword `num_items_in_batch`, the sum divided by it)."""
        cache = cache if cache is not None else past_key_values
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        shift_labels = kwargs.get("shift_labels")
        with_loss = labels is not None or shift_labels is not None
        targets = labels if labels is not None else shift_labels
        path = self._one_token_path(input_ids, attention_mask, cache, targets, output_hidden_states, wkv_mode)
        if path is not None:
            from .rwkv_decode import fused_step, graph_step

            check_ids(input_ids, self.config.vocab_size)
            logits = (graph_step if path == "graph" else fused_step)(self, input_ids, cache)[:, None]
            result = CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})
            return result if return_dict is not False else result.to_tuple()
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            wkv_mode=wkv_mode,
            keep_last=logits_to_keep if isinstance(logits_to_keep, int) and not with_loss else 0,
            position_ids=position_ids,
            cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        fused = with_loss and self._fused_loss()
        logits = None if fused else self.lm_head(hidden[:, keep])
        loss = None
        if with_loss:
            if isinstance(logits_to_keep, int) and logits_to_keep != 0:
                raise ValueError("labels need logits at every position: leave logits_to_keep at 0")
            # transformers' causal-LM loss: shifts `labels` (or takes `shift_labels` as they are), ignores
            # -100, and with `num_items_in_batch` (Trainer's gradient accumulation) sums and divides by it;
            # training: the same loss with the LM head, chunk by chunk of tokens (rwkv_loss)
            if fused:
                targets = shifted_targets(labels, shift_labels)
                loss = linear_cross_entropy(
                    hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, targets, kwargs.get("num_items_in_batch")
                )
            else:
                loss = self.loss_function(
                    logits, labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels,
                    num_items_in_batch=kwargs.get("num_items_in_batch"),
                )
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=out.hidden_states, **{CACHE_FIELD: getattr(out, CACHE_FIELD)}
        )
        return result if return_dict is not False else result.to_tuple()

    def _fused_loss(self) -> bool:
        """Training with labels (config `fuse_cross_entropy`, on by default): the loss without the
        [tokens, vocab] logits, which are then not returned. Only for a plain `nn.Linear` head without
        hooks (a PEFT adapter or a quantized head computes its logits the usual way)."""
        head = self.lm_head
        return bool(
            getattr(self.config, "fuse_cross_entropy", True)
            and self.training
            and torch.is_grad_enabled()
            and type(head) is nn.Linear
            and head.bias is None
            and not (head._forward_hooks or head._forward_pre_hooks)
            and not _global_hooks()
        )

    def _one_token_path(self, input_ids, attention_mask, cache, labels, output_hidden_states, wkv_mode) -> Optional[str]:
        """How to run a decode step (one token per row, a full state, no gradients, nothing but the
        logits asked for): "graph" on CUDA (a captured CUDA graph, see rwkv_decode; config
        `cuda_graph_decode`), "fused" elsewhere (`rwkv_step`: the same equations without the per-module
        overhead), or None: through the modules."""
        if not (
            input_ids is not None
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and isinstance(cache, RwkvCache)
            and cache.batch_size == input_ids.shape[0]
            and all(s is not None for s in cache.layers_state)
            and labels is None
            and not output_hidden_states
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not exporting()
            and len(set((getattr(self, "hf_device_map", None) or {0: 0}).values())) == 1
            and not getattr(self.config, "deep_embed_size", 0)  # the step functions have no DeepEmbed
        ):
            return None
        # only in mode "auto" (argument, else config): any other mode, "recurrent" included, runs the
        # modules with that WKV form (the graph's step would take fla's kernel, the fused one rwkv_step's)
        if (wkv_mode or self.config.wkv_mode) != "auto":
            return None
        if input_ids.is_cuda:
            path = "graph" if getattr(self.config, "cuda_graph_decode", False) else None
        else:
            from .rwkv_step import layer_step_for  # (here: rwkv_step imports this module)

            path = "fused" if layer_step_for(self) is not None else None
        if path is None or not self._plain_modules():
            return None
        return path if attention_mask is None or bool(attention_mask.all()) else None

    def _plain_modules(self) -> bool:
        """Only our own modules and torch's basic layers, without hooks: a captured graph replays the
        modules as they were at capture, so anything that can change what a module does between steps
        (PEFT adapters switched on and off, forward hooks) keeps the step eager. (Cached: see
        `_MODULE_REGISTRATIONS`.)"""
        if _global_hooks():
            return False
        seen = _PLAIN_CHECKS.get(self)
        if seen is None or seen[0] != _MODULE_REGISTRATIONS[0]:
            modules = list(self.modules())
            ours = all(type(m) in _GRAPH_SAFE or type(m).__module__.startswith(_OUR_MODULES) for m in modules)
            hook_dicts = [m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules]
            seen = _PLAIN_CHECKS[self] = (_MODULE_REGISTRATIONS[0], ours, hook_dicts)
        return seen[1] and not any(seen[2])

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Optional[RwkvCache] = None,
        attention_mask: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        cache: Optional[RwkvCache] = None,
        use_cache: Optional[bool] = None,
        next_sequence_length: Optional[int] = None,
        cache_position: Optional[Tensor] = None,
        logits_to_keep: Optional[Union[int, Tensor]] = None,
        **kwargs,
    ) -> dict:
        """Feed only the columns the state has not consumed yet (works for transformers 4.57 and 5.x).

        How many are new: what generate() says (5.x: `next_sequence_length`; 4.57: `cache_position`, one
        position per new column), else every column past the cache's count (`cache.seen_tokens`), so that
        a cache handed back from an earlier `generate()` call continues exactly where it stopped. A prompt
        given as `inputs_embeds` is fed from there (`input_ids` then holds only the generated tokens),
        also when it continues a cache. Keyword arguments not named here go on to `forward`.
        """
        cache = cache if cache is not None else past_key_values
        seen = cache.get_seq_length() if isinstance(cache, RwkvCache) else 0
        new = next_sequence_length if next_sequence_length is not None else (
            cache_position.shape[0] if cache_position is not None else None
        )
        first = kwargs.pop("is_first_iteration", None)
        if first is None:  # 4.57: the prompt's embeddings are used until a token was generated
            first = seen == 0 or input_ids is None or input_ids.shape[1] == 0
        inputs = {}
        if inputs_embeds is not None and first:
            inputs["inputs_embeds"] = inputs_embeds[:, -new:] if new else inputs_embeds[:, seen:]
        else:
            if new is None:
                new = input_ids.shape[1] - seen
            if new <= 0 or new > input_ids.shape[1]:
                raise ValueError(
                    f"the cache has already consumed {seen} columns but input_ids has only {input_ids.shape[1]}: "
                    "pass the whole conversation (old tokens and new) together with the cache"
                )
            inputs["input_ids"] = input_ids[:, -new:]
        width = next(iter(inputs.values())).shape[1]
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask[:, -width:]
        inputs["cache"] = cache
        inputs["use_cache"] = True if use_cache is None else use_cache
        # generation only needs the last position: never build [T, vocab] logits for a prompt
        inputs["logits_to_keep"] = logits_to_keep if isinstance(logits_to_keep, Tensor) or logits_to_keep else 1
        for name in ("position_ids", "token_type_ids"):  # positions mean nothing to a recurrent model
            kwargs.pop(name, None)
        inputs.update(kwargs)
        return inputs

    def _reorder_cache(self, cache: RwkvCache, beam_idx: torch.LongTensor) -> RwkvCache:
        cache.reorder_cache(beam_idx)
        return cache
