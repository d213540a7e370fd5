"""Which path a forward pass takes, decided here and nowhere else.

A `Path` has these parts:

- `runner`: "modules" (through the `nn.Module`s, `ModuleCalls`: training, prefill, hooks, adapters),
  "step" (a decode step: the same `time_mix`/`channel_mix` functions called directly on the weights,
  `DirectCalls`, see `rwkv_decode.model_step`) or "graph" (that step captured once in a CUDA graph and
  replayed, `rwkv_decode.RwkvGraphDecoder`);
- `wkv`: the form of the WKV recurrence, "recurrent" (`rwkv_ops`, the truth), "chunk" (`rwkv_chunk`,
  `rwkv7_chunk`) or "fla" (flash-linear-attention's kernels, `rwkv_fla`; one token per row: its fused
  one-token kernel);
- `compiled`: the step runs under torch.compile (config `compile_decode`: None, the default, compiles
  the step captured in a CUDA graph where Triton runs; True also the CPU step; False never; a
  `generate(..., disable_compile=True)` call never, as transformers' own auto-compilation);
- `triton`: the captured step runs the version's own Triton kernels (`rwkv_triton`; config
  `triton_decode`, None, the default: where Triton runs, up to 32 rows) in place of the compiled one;
- `reduce`: its products `x W^T` as multiply-and-sum reductions (`ReduceCalls`): compiled on CUDA at
  batch <= `REDUCTION_MAX_BATCH`, where inductor makes them memory-bound kernels; else matmuls.

`wkv_mode` (the argument, else the config's) is honoured on every runner: "auto" picks fla on CUDA
where fla is installed and the version has a kernel, else chunk, and recurrent for one token per
row; any other mode is used as given, in a captured graph too. When exporting, everything is the
recurrence through the modules, the one form a recorded graph holds for every length.

`own_generate_loop` decides, the same way, whether generate()'s greedy/sampling loop is transformers'
or ours (`rwkv_generate.decode_loop`, which feeds the decode steps this path names).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from .rwkv_fla import HAVE_FLA
from .rwkv_helpers import exporting
from .rwkv_triton import supports as triton_step_supports

MODES = ("auto", "recurrent", "chunk", "fla")
REDUCTION_MAX_BATCH = 4
TRITON_MAX_BATCH = 32  # the Triton step by default up to this batch (tested on an H200 at 1, 5 and 32)
# a prompt of up to TRITON_PROMPT_MAX tokens a row and TRITON_PROMPT_ROWS in all (batch x tokens),
# where the decode step is the captured Triton one, goes through that step's kernels at once
# (`rwkv_triton.triton_step` with T tokens a row: the step's ~170 launches for the whole prompt) rather
# than through the modules, whose forward pass is some 1,800 launches at any length (0: never). On an
# H200 (1.5B RWKV-7, bf16; uncaptured, session 13) at batch 1 64 tokens took 18 ms against 60; at
# batch 32, 16 tokens 32 ms against 88, and 64 tokens (2,048 rows) 79 against 74. See
# `RwkvForCausalLMBase._decode_path`.
TRITON_PROMPT_MAX = 64
TRITON_PROMPT_ROWS = 1024
_TRITON_PROMPT_FAILED = False


def triton_prompt_fits(batch: int, tokens: int) -> bool:
    """Whether a prompt of `batch` rows of `tokens` may go through the Triton step at once."""
    return not _TRITON_PROMPT_FAILED and 0 < tokens <= TRITON_PROMPT_MAX and batch * tokens <= TRITON_PROMPT_ROWS


def stop_triton_prompt() -> None:
    """The Triton step failed on a prompt here: prompts go through the modules for the rest of the process."""
    global _TRITON_PROMPT_FAILED
    _TRITON_PROMPT_FAILED = True


# set for the length of a generate() call whose generation config has `disable_compile`
_COMPILE_DISABLED = contextvars.ContextVar("rwkv_compile_disabled", default=False)


@contextlib.contextmanager
def compile_disabled(disabled: bool = True):
    """Within it, no decode step is compiled, whatever `compile_decode` says (generate()'s
    `disable_compile`)."""
    token = _COMPILE_DISABLED.set(bool(disabled) or _COMPILE_DISABLED.get())
    try:
        yield
    finally:
        _COMPILE_DISABLED.reset(token)


def _triton_runs() -> bool:
    """Whether inductor can make Triton kernels here (a Triton build and a CUDA card of compute
    capability >= 7), asked once."""
    global _TRITON
    if _TRITON is None:
        try:
            from torch.utils._triton import has_triton

            _TRITON = bool(has_triton())
        except Exception:  # (a private helper of torch's: where it is missing or fails, do not compile)
            _TRITON = False
    return _TRITON


_TRITON: Optional[bool] = None


def stop_auto_compiling() -> None:
    """A compiled step failed here: compile_decode None (auto) compiles nothing more in this process
    (True still asks, each time)."""
    global _TRITON
    _TRITON = False


_TRITON_STEP_FAILED = False


def stop_triton_step() -> None:
    """The Triton decode step failed here: triton_decode None (auto) picks it no more in this process.
    (A failed compile, `stop_auto_compiling`, stops it too: both need Triton to build kernels.)"""
    global _TRITON_STEP_FAILED
    _TRITON_STEP_FAILED = True


class Path(NamedTuple):
    runner: str  # "modules" | "step" | "graph"
    wkv: str  # "recurrent" | "chunk" | "fla"
    compiled: bool = False
    reduce: bool = False
    triton: bool = False  # the captured step runs the version's own Triton kernels (rwkv_triton)


def pick_path(
    model, device, seq_len: int, wkv_mode: Optional[str] = None, step: bool = False,
    graph: Optional[bool] = None, compiled: Optional[bool] = None, batch: int = 0, triton: Optional[bool] = None,
) -> Path:
    """The path for `model` (one of our causal LMs or model bodies) on `device` for `seq_len` tokens
    per row. `step`: the caller found a decode step (one token per row from a full state, no
    gradients, nothing but the logits asked for, no padding); whether it runs as one also depends on
    the model (only plain modules, on one device) and the config (`cuda_graph_decode`,
    `compile_decode`, None: the graph runner compiled where Triton runs; `graph` and `compiled` say
    instead, for a decoder built by hand) and, for
    `reduce`, the `batch` size. `triton` (else the config's `triton_decode`, None: where it runs):
    the captured step runs the version's Triton kernels (`rwkv_triton`), in wkv_mode "auto"
    only; it takes the place of the compiled step."""
    config = model.config
    mode = wkv_mode or getattr(config, "wkv_mode", "auto") or "auto"
    if mode not in MODES:
        raise ValueError(f"unknown WKV mode {mode!r}; expected one of {MODES}")
    if exporting():
        return Path("modules", "recurrent")
    has_fla_kernel = config.model_type != "rwkv4_world"
    if mode == "fla" and not has_fla_kernel:
        raise ValueError("flash-linear-attention has no RWKV-4 kernel; use mode 'chunk' or 'recurrent'")
    on_cuda = torch.device(device).type == "cuda"
    fla = on_cuda and HAVE_FLA and has_fla_kernel
    if graph is None:
        graph = bool(getattr(config, "cuda_graph_decode", False))
    runner = "modules"
    if step and _single_device(model) and plain_modules(model):
        runner = "graph" if on_cuda and graph else "step"
    if compiled is None:
        setting = getattr(config, "compile_decode", None)
        # None ("auto"): the captured step on CUDA, where the first capture's compile (7-16 s on an
        # H200) buys a step about twice as fast; never on CPU
        compiled = (runner == "graph" and _triton_runs()) if setting is None else bool(setting)
        compiled = compiled and not _COMPILE_DISABLED.get()
    if triton is None:
        triton = getattr(config, "triton_decode", None)
    if triton is None:  # "auto": the batches its GPU tests reach (larger batches tile 64 rows, untried)
        triton = not _TRITON_STEP_FAILED and 0 < batch <= TRITON_MAX_BATCH
    if triton and runner == "graph" and mode == "auto" and _triton_step_runs(model):
        return Path(runner, "recurrent", triton=True)  # (its kernels compute the recurrence itself, in fp32)
    # (the compiled step runs the recurrence: fla's kernels stay outside torch.compile)
    compiled = runner != "modules" and compiled and mode in ("auto", "recurrent") and _compilable(model)
    if mode != "auto":
        wkv = mode
    elif seq_len == 1:
        # one token: fla's fused kernel (inference only) where it runs, except under torch.compile,
        # which gets the recurrence to fuse with the rest of the step
        wkv = "fla" if fla and not compiled and not torch.is_grad_enabled() else "recurrent"
    else:
        wkv = "fla" if fla else "chunk"
    return Path(runner, wkv, compiled, compiled and on_cuda and 0 < batch <= REDUCTION_MAX_BATCH)


# ---------------------------------------------------------------------------------- generate()'s loop
# transformers' logits processors that are functions of (input_ids, scores) alone: no state kept from
# one call to the next, no random numbers, no model. Our loop calls them as transformers' does.
PURE_PROCESSORS = frozenset({
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TopHLogitsWarper",
    "TypicalLogitsWarper", "EpsilonLogitsWarper", "EtaLogitsWarper", "RepetitionPenaltyLogitsProcessor",
    "MinLengthLogitsProcessor", "MinNewTokensLengthLogitsProcessor", "NoRepeatNGramLogitsProcessor",
    "SequenceBiasLogitsProcessor", "NoBadWordsLogitsProcessor", "SuppressTokensLogitsProcessor",
    "SuppressTokensAtBeginLogitsProcessor", "ForcedBOSTokenLogitsProcessor", "ForcedEOSTokenLogitsProcessor",
    "InfNanRemoveLogitsProcessor", "ExponentialDecayLengthPenalty", "LogitNormalization",
})
# stopping criteria computed on the device from the ids alone (the length one is the loop's bound)
DEVICE_CRITERIA = frozenset({"MaxLengthCriteria", "EosTokenCriteria", "StopStringCriteria"})
# what generate() may hand the loop besides the ids: the mask, the cache, and what the prefill uses
LOOP_KWARGS = frozenset({"attention_mask", "cache", "past_key_values", "use_cache", "logits_to_keep", "position_ids",
                         "cache_position", "token_type_ids", "wkv_mode", "tokenizer"})


def _transformers_own(obj, names) -> bool:
    return type(obj).__name__ in names and type(obj).__module__.startswith("transformers.")


def own_generate_loop(
    model, input_ids, generation_config, logits_processor, stopping_criteria, model_kwargs, synced_gpus=False
) -> Optional[Path]:
    """The decode-step path for our own generate() loop (`rwkv_generate.decode_loop`), or None for
    transformers' `_sample` loop. Ours runs where it gives what transformers' gives, token for token:
    greedy or multinomial sampling from input_ids (a padding mask, a cache to continue) on CPU or CUDA,
    with transformers' own pure logits processors (`PURE_PROCESSORS`) and device-side stopping
    criteria, returning the sequences (and the cache); and where a decode step leaves the modules (no
    hooks, adapters or quantized layers: `pick_path`). Anything else (scores, logits, hidden states or
    attentions asked for, a user's stopping criteria or processor of another kind, `inputs_embeds`,
    chunked prefill, an assistant's loop, synced GPUs, extra forward arguments) is transformers'."""
    kw = {k: v for k, v in model_kwargs.items() if v is not None}
    cfg = generation_config
    if (
        synced_gpus
        or torch.is_grad_enabled()
        or input_ids is None
        or input_ids.dim() != 2
        or input_ids.device.type not in ("cpu", "cuda")
        or input_ids.device != model.lm_head.weight.device
        or not set(kw) <= LOOP_KWARGS
        or kw.get("use_cache") is False
        or not (type(kw.get("logits_to_keep", 1)) is int and kw.get("logits_to_keep", 1) == 1)
        or any(getattr(cfg, f, False) for f in ("output_scores", "output_logits", "output_attentions",
                                                "output_hidden_states", "is_assistant"))
        or getattr(cfg, "prefill_chunk_size", None) is not None
        or not all(_transformers_own(p, PURE_PROCESSORS) for p in logits_processor)
        or not all(_transformers_own(c, DEVICE_CRITERIA) for c in stopping_criteria)
        or getattr(stopping_criteria, "max_length", None) is None
    ):
        return None
    if any(hasattr(c, "eos_token_id") for c in stopping_criteria):
        # finished rows are fed the padding token: transformers' own step would refuse one outside the vocabulary
        pad = getattr(cfg, "_pad_token_tensor", None)
        if pad is None or pad.numel() != 1 or not 0 <= int(pad) < model.config.vocab_size:
            return None
    path = pick_path(model, input_ids.device, 1, kw.get("wkv_mode"), step=True, batch=input_ids.shape[0])
    return None if path.runner == "modules" else path


def _compilable(model) -> bool:
    """Whether the decode step may run compiled. Not v4-v6 in fp16, whose on-the-fly rescaling depends
    on each layer's number (a recompile per layer). (v4 on CUDA was excluded until the `exporting()` fix
    of rwkv_helpers: under torch 2.11's compiler the step's WKV ran as an export's scan loop, 0.9 of the
    logit range off at batch 5; test_gpu.py::test_fused_decoder_matches_eager[4-*] passes on an H200.)"""
    config = model.config
    return not (getattr(config, "rescale_every", 0) > 0 and model.get_input_embeddings().weight.dtype == torch.float16)


def _triton_step_runs(model) -> bool:
    """A Triton step exists for this model (`rwkv_triton.supports`) and Triton runs on this card."""
    return _triton_runs() and not triton_step_supports(model)


def _single_device(model) -> bool:
    return len(set((getattr(model, "hf_device_map", None) or {0: 0}).values())) == 1


# ------------------------------------------------------------------------ only plain modules and no hooks
_GRAPH_SAFE = (nn.Linear, nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.ModuleList)
# this package's modules, installed (rwkv_hf.modeling.*) or as remote code (transformers_modules.<folder>.*)
_OUR_MODULES = (__name__.rsplit(".", 1)[0] + ".",)

# Which modules and weights a model holds changes rarely (PEFT injecting adapters, a user swapping a
# layer, a quantizer replacing weights); hooks can come and go at any step. `plain_modules` walks the
# module tree only when a submodule or a parameter was registered anywhere since its last walk
# (counted by torch's global registration hooks, installed on the first call) and otherwise checks the
# hook dicts it kept from that walk: ~5 us a step instead of ~250 us for 24 layers. (A module or
# weight written straight into a `_modules`/`_parameters` dict, bypassing setattr, goes unseen.)
_MODULE_REGISTRATIONS = [0]
_PLAIN_CHECKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_COUNTING: list = []


def _count_registration(module, name, value):
    _MODULE_REGISTRATIONS[0] += 1


def global_hooks() -> bool:
    """Forward hooks registered for every module (torch's global ones)."""
    return bool(torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks)


def plain_modules(model: nn.Module) -> bool:
    """Only our own modules and torch's basic layers holding plain tensors, without hooks. A decode step
    calls the layers' functions on their weights directly, and a captured graph replays the modules as
    they were at capture, so anything that can change what a module does between steps (PEFT adapters
    switched on and off, forward hooks) or that a plain product cannot read (quantized layers such as
    bitsandbytes' `Linear8bitLt`/`Linear4bit`, weights that are tensor subclasses) keeps the step in
    the modules."""
    if not _COUNTING:  # (what was registered before this first call is seen by the first walk)
        hooks = torch.nn.modules.module
        _COUNTING.append(hooks.register_module_module_registration_hook(_count_registration))
        _COUNTING.append(hooks.register_module_parameter_registration_hook(_count_registration))
    if global_hooks():
        return False
    seen = _PLAIN_CHECKS.get(model)
    if seen is None or seen[0] != _MODULE_REGISTRATIONS[0]:
        modules = list(model.modules())
        ours = all(type(m) in _GRAPH_SAFE or type(m).__module__.startswith(_OUR_MODULES) for m in modules) and all(
            type(t.data) is torch.Tensor for t in model.parameters())
        hook_dicts = [m._forward_hooks for m in modules] + [m._forward_pre_hooks for m in modules]
        seen = _PLAIN_CHECKS[model] = (_MODULE_REGISTRATIONS[0], ours, hook_dicts)
    return seen[1] and not any(seen[2])
