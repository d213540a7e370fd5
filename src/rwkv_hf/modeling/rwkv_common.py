"""What every RWKV version shares: the block skeleton, the model body and the causal-LM head with
generation support. Each `modeling_rwkvN.py` writes its time mix and channel mix (the equations of that
version) and plugs them into the classes here; `rwkv_paths` decides how a forward pass runs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .rwkv7_deepembed import deep_embed_inputs
from .rwkv_cache import CACHE_FIELD, RwkvCache, zip_tensors
from .rwkv_decode import prompt_logits, step_logits
from .rwkv_generate import decode_loop
from .rwkv_helpers import ModuleCalls, exporting, layer_norm_fp32
from .rwkv_inputs import check_ids, document_starts, normalize_mask
from .rwkv_loss import linear_cross_entropy, shifted_targets
from .rwkv_paths import Path as RunPath
from . import rwkv_paths
from .rwkv_paths import compile_disabled, global_hooks, own_generate_loop, pick_path
from .rwkv_peft import register_lora_targets
from .rwkv_saving import auto_map, write_self_contained
from .rwkv_state import RwkvStateMixin, initial_wkv

Tensor = torch.Tensor
register_lora_targets()  # LoraConfig() without target_modules works for our model types


# v4-v6: the reference keeps the decay, the bonus and ln_x in fp32 whatever the model's dtype; loading
# with dtype=fp16/bf16 does the same here (transformers' `_keep_in_fp32_modules_strict`), and so does
# building from a config in any dtype (`RwkvPreTrainedModel.post_init`). Whole names only: v6's decay
# LoRA `time_decay_w1/w2` stays in the model's dtype, as in the reference.
FP32_PARAMS = ["time_decay", "time_first", "time_faaaa", "ln_x"]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def _is_fp32_param(name: str, fp32_names) -> bool:
    return any(part in fp32_names for part in name.split("."))


# ---------------------------------------------------------------------------------- packed documents
# documents this long or shorter share a padded batch with any shorter ones (`length_groups`)
PACK_SHORT = 64


def length_groups(lengths: List[int]) -> List[List[int]]:
    """Packed documents (their numbers, by `lengths`) in padded batches: longest first, a document
    joining the current batch while it is at least half as long as the batch's longest, or the longest
    is at most `PACK_SHORT` tokens. So padding at most doubles a batch's work beyond `PACK_SHORT`
    tokens a document, and there are at most log2(longest / PACK_SHORT) + 2 batches."""
    groups: List[List[int]] = []
    for d in sorted(range(len(lengths)), key=lambda d: -lengths[d]):
        if groups and (2 * lengths[d] >= lengths[groups[-1][0]] or lengths[groups[-1][0]] <= PACK_SHORT):
            groups[-1].append(d)
        else:
            groups.append([d])
    return groups


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
        """Block 0's ln0 of the embedding (in fp32, as the reference)."""
        return layer_norm_fp32(self.ln0, x)

    def forward(self, x: Tensor, state: tuple, mask: Optional[Tensor], v_first: Optional[Tensor], form: str, deep=None,
                calls=ModuleCalls):
        """x [B, T, C] from the state (att_shift, wkv, ffn_shift); returns (x, the new state, v_first).
        `form`: the WKV form; `calls`: how products run (`rwkv_helpers`: through the modules, or
        directly on their weights for a decode step, which then calls the mixes' functions without
        `nn.Module.__call__`)."""
        if "ln0" in self._modules:  # block 0 (not `layer_id == 0`: torch.compile would specialise on every layer's id)
            x = self.norm_embedding(x)
        rescale = self.rescale_every > 0 and x.dtype == torch.float16
        scale = 0.5 ** (self.layer_id // self.rescale_every) if rescale else 1.0
        through_modules = calls is ModuleCalls
        att, ffn = (self.att, self.ffn) if through_modules else (self.att.forward, self.ffn.forward)
        att_shift, wkv, ffn_shift = state
        out, att_shift, wkv, v_first = att(calls.norm(self.ln1, x), att_shift, wkv, mask, v_first, form, scale, calls)
        x = x + out
        h = calls.norm(self.ln2, x)
        if deep is None and through_modules:
            out, ffn_shift = ffn(h, ffn_shift, mask, scale)
        else:  # (DeepEmbed RWKV-7: rwkv7_deepembed)
            out, ffn_shift = ffn(h, ffn_shift, mask, scale, deep, calls)
        x = x + out
        if rescale and (self.layer_id + 1) % self.rescale_every == 0:
            x = x / 2
        return x, (att_shift, wkv, ffn_shift), v_first


# -------------------------------------------------------------------------------------------- model
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
        self.config.auto_map = auto_map(self)
        super().save_pretrained(save_directory, *args, **kwargs)
        if args[0] if args else kwargs.get("is_main_process", True):
            write_self_contained(self, Path(save_directory))
        if push_to_hub:  # transformers' own push would run before the files above exist
            hub = {k: kwargs[k] for k in ("commit_message", "private", "token", "create_pr", "revision") if k in kwargs}
            self.push_to_hub(kwargs.get("repo_id", Path(save_directory).name), **hub)


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
        form = pick_path(self, device, T, wkv_mode).wkv

        def embed(part: slice) -> Tensor:
            return self.emb(input_ids[:, part]) if input_ids is not None else inputs_embeds[:, part]

        def ids(part: slice) -> Optional[Tensor]:
            return None if input_ids is None else input_ids[:, part]

        all_hidden = [] if output_hidden_states else None
        keep = keep_last if keep_last and keep_last < T and all_hidden is None else 0
        segment = getattr(self.config, "prefill_segment", 0) or T
        starts = None if exporting() else document_starts(position_ids, cu_seq_lens_q, (B, T), mask)
        if starts is not None:
            x = self._packed(embed(slice(None)), mask, starts.to(device), cache, form, all_hidden, ids(slice(None)))
        elif not exporting() and T > segment and all_hidden is None:  # (an exported graph takes any length at once)
            # a long input in segments: the state carries over, activations exist for one segment at a
            # time, and only the segments' outputs that are asked for are kept
            state = cache if cache is not None else RwkvCache(len(self.blocks))
            outs = []
            for t in range(0, T, segment):
                part = slice(t, t + segment)
                x = self._blocks(embed(part), None if mask is None else mask[:, part], state, form, input_ids=ids(part))
                if keep:
                    x = x[:, max(0, T - keep - t) :]
                outs.append(x)
            x = torch.cat(outs, 1) if len(outs) > 1 else outs[0]
        else:
            x = self._blocks(embed(slice(None)), mask, cache, form, all_hidden, input_ids=ids(slice(None)))
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
        self, x: Tensor, mask: Optional[Tensor], starts: Tensor, cache: Optional[RwkvCache], form: str, all_hidden=None,
        input_ids=None,
    ) -> Tensor:
        """Packed rows (see `document_starts`): every document becomes a row of a right-padded batch
        (padding changes nothing, see `normalize_mask`), runs through the blocks from a fresh state (a
        row's first document: from the row's state in `cache`), and its outputs go back in place. The
        cache ends with each row's last document's state.

        Documents of very different lengths run as several such batches (`length_groups`), so that
        padding at most doubles the work (one long document and many short ones in one batch would
        pad every short one to the long one's length)."""
        B, T, C = x.shape
        pos = torch.arange(T, device=x.device).expand(B, T)
        doc = starts.long().cumsum(1)  # document number within the row
        count = doc[:, -1] + 1
        first = F.pad(count.cumsum(0)[:-1], (1, 0))  # the number of each row's first document overall
        rows = (doc + first[:, None]).reshape(-1)  # each column's document, overall
        begin = torch.cummax(torch.where(starts, pos, torch.zeros_like(pos)), dim=1).values
        cols = (pos - begin).reshape(-1)  # each column's place in its document
        D = int(count.sum())
        lengths = torch.bincount(rows, minlength=D).tolist()
        groups = length_groups(lengths)
        group_of, slot = [0] * D, [0] * D  # each document's batch, and its row there
        for g, docs in enumerate(groups):
            for i, d in enumerate(docs):
                group_of[d], slot[d] = g, i
        col_group = torch.tensor(group_of, device=x.device)[rows]
        col_slot = torch.tensor(slot, device=x.device)[rows]
        first_list, last_list = first.tolist(), (first + count - 1).tolist()
        flat = {"x": x.reshape(B * T, C), "real": (torch.ones(B, T, dtype=torch.bool, device=x.device) if mask is None
                                                   else mask).reshape(-1)}
        if input_ids is not None:
            flat["ids"] = input_ids.reshape(-1)
        y = x.new_zeros(B * T, C)
        hidden = None if all_hidden is None else [x.new_zeros(B * T, C) for _ in self.blocks]
        # each row's last document's state, layer by layer
        final = None if cache is None else [block.zero_state(B, x.device, x.dtype) for block in self.blocks]
        for g, docs in enumerate(groups):
            cols_g = (col_group == g).nonzero().squeeze(1)
            at = (col_slot[cols_g], cols[cols_g])
            n, L = len(docs), max(lengths[d] for d in docs)

            def batch(t: Tensor) -> Tensor:  # the group's columns as [n, L, ...], zeros past a document's end
                return t.new_zeros(n, L, *t.shape[1:]).index_put(at, t[cols_g])

            real = batch(flat["real"])
            docs_cache = None
            if cache is not None:
                docs_cache = RwkvCache(len(self.blocks))
                # the rows whose first document is in this group: that document continues the row's state
                row_idx = [b for b in range(B) if group_of[first_list[b]] == g]
                into = torch.tensor([slot[first_list[b]] for b in row_idx], device=x.device)
                for i, block in enumerate(self.blocks):
                    if cache.layers_state[i] is not None:
                        zero = block.zero_state(n, x.device, x.dtype)
                        docs_cache.layers_state[i] = zip_tensors(
                            lambda z, s: z.index_put((into,), s[row_idx].to(z.dtype)), zero, cache.layers_state[i]
                        ) if row_idx else zero
            hid = [] if hidden is not None else None
            out = self._blocks(batch(flat["x"]), None if bool(real.all()) else real, docs_cache, form, hid,
                               input_ids=batch(flat["ids"]) if "ids" in flat else None)
            y = y.index_put((cols_g,), out[at])
            if hidden is not None:
                hidden = [h.index_put((cols_g,), part[at]) for h, part in zip(hidden, hid)]
            if cache is not None:  # the rows whose last document is in this group: their state
                ends = [b for b in range(B) if group_of[last_list[b]] == g]
                if ends:
                    rows_t = torch.tensor(ends, device=x.device)
                    take = torch.tensor([slot[last_list[b]] for b in ends], device=x.device)
                    final = [zip_tensors(lambda dst, src: dst.index_put((rows_t,), src[take].to(dst.dtype)), done, st)
                             for done, st in zip(final, docs_cache.layers_state)]
        if all_hidden is not None:
            all_hidden.extend(h.view(B, T, C) for h in hidden)
        if cache is not None:
            cache.layers_state = final
        return y.view(B, T, C)

    def _blocks(
        self, x: Tensor, mask: Optional[Tensor], cache: Optional[RwkvCache], form: str, all_hidden=None, input_ids=None,
        calls=ModuleCalls, block_fn=None,
    ) -> Tensor:
        """x [B, T, C] through every block, from the state in `cache` (None: zeros), which it updates.
        Appends each block's input to `all_hidden` if given. (`input_ids`: for DeepEmbed RWKV-7.)
        A decode step (`rwkv_decode`) passes its `calls` and `block_fn(block, *args)`, which runs a
        block's forward without `nn.Module.__call__` (compiled or not)."""
        B = x.shape[0]
        v_first = None
        deep = deep_embed_inputs(input_ids, lambda: self.blocks[0].norm_embedding(x)) if getattr(self.config, "deep_embed_size", 0) else None
        for i, block in enumerate(self.blocks):
            if all_hidden is not None:
                all_hidden.append(x)
            state = cache.layers_state[i] if cache is not None else None
            if state is None:
                state = block.zero_state(B, x.device, x.dtype)
            if block_fn is not None:
                x, new_state, v_first = block_fn(block, x, state, mask, v_first, form, deep, calls)
            elif deep is None:
                x, new_state, v_first = block(x, state, mask, v_first, form)
            else:
                x, new_state, v_first = block(x, state, mask, v_first, form, deep)
            if cache is not None:
                cache.layers_state[i] = new_state
        return x


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
        packed = position_ids is not None or kwargs.get("cu_seq_lens_q") is not None
        if cache is None and (self.config.use_cache if use_cache is None else use_cache):
            cache_made = RwkvCache(len(self.model.blocks))  # (a prompt's decode steps start from it)
        else:
            cache_made = cache
        path = self._decode_path(input_ids, attention_mask, cache_made, targets, output_hidden_states, wkv_mode,
                                 logits_to_keep, packed)
        if path is not None:  # decode steps: the logits only (rwkv_decode)
            cache = cache_made
            check_ids(input_ids, self.config.vocab_size)
            if input_ids.shape[1] == 1 and cache.batch_size is not None:
                logits = step_logits(self, input_ids, cache, path)[:, None]
            else:  # (None: the Triton step failed on it here, and left the state as it was: the modules go on)
                logits = prompt_logits(self, input_ids, cache, path, attention_mask)
            if logits is not None:
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
            and not global_hooks()
        )

    def _decode_path(
        self, input_ids, attention_mask, cache, labels, output_hidden_states, wkv_mode, logits_to_keep=1, packed=False,
    ) -> Optional[RunPath]:
        """The path of a decode step (one token per row from a full state, no gradients, nothing but
        the logits asked for, no padding), or None: through the modules (`rwkv_paths` decides).

        A short prompt (up to `rwkv_paths.TRITON_PROMPT_MAX` tokens a row, one document a row, from a
        full or an empty cache, the last logits asked for, padded only where each row's last token is
        real) takes it too where the step is the captured Triton one, whose kernels then take all its
        tokens at once (`rwkv_decode.prompt_logits`): the modules' forward pass is launch-bound at
        that length."""
        B, T = input_ids.shape if input_ids is not None and input_ids.dim() == 2 else (0, 0)
        full = isinstance(cache, RwkvCache) and cache.batch_size == B and all(s is not None for s in cache.layers_state)
        empty = isinstance(cache, RwkvCache) and cache.batch_size is None
        step = T == 1 and full
        prompt = (not step and rwkv_paths.triton_prompt_fits(B, T) and (full or empty)
                  and isinstance(logits_to_keep, int) and logits_to_keep == 1 and not packed)
        if not (
            (step or prompt)
            and labels is None
            and not output_hidden_states
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and not exporting()
        ):
            return None
        path = pick_path(self, input_ids.device, 1, wkv_mode, step=True, batch=B)
        if path.runner == "modules" or (prompt and not path.triton):
            return None
        # padding: a prompt's, where each row's last token is real (`prompt_logits`); not a step's
        if attention_mask is not None and not bool(attention_mask.all()):
            if not (prompt and attention_mask.dim() == 2 and bool(attention_mask[:, -1].all())):
                return None
        return path

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

    def generate(self, *args, **kwargs):
        """transformers' `generate()`. Its `disable_compile` (an argument or the generation config's)
        keeps this call's decode steps uncompiled, whatever the config's `compile_decode` says, as it
        turns off transformers' own automatic compilation."""
        config = kwargs.get("generation_config", args[1] if len(args) > 1 else None) or self.generation_config
        disabled = kwargs.get("disable_compile", getattr(config, "disable_compile", None))
        with compile_disabled(bool(disabled)):
            return super().generate(*args, **kwargs)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False, streamer=None,
                **model_kwargs):
        """generate()'s greedy and sampling loop: ours (`rwkv_generate.decode_loop`: the same tokens, the
        host off the device's critical path) where `rwkv_paths.own_generate_loop` finds that it gives
        what transformers' gives, else transformers' own, unchanged. transformers has prepared everything
        before this point (generation config, logits processors, stopping criteria, cache, streamer)."""
        path = own_generate_loop(self, input_ids, generation_config, logits_processor, stopping_criteria, model_kwargs,
                                 synced_gpus)
        if path is None:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        return decode_loop(self, input_ids, logits_processor, stopping_criteria, generation_config, path, streamer,
                           **model_kwargs)

    def _reorder_cache(self, cache: RwkvCache, beam_idx: torch.LongTensor) -> RwkvCache:
        cache.reorder_cache(beam_idx)
        return cache
