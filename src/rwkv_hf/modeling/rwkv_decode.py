"""Decode steps: one token per row through a whole causal LM, without the per-module overhead, and
on CUDA captured once as a CUDA graph and replayed.

A decode step runs the same `time_mix`/`channel_mix` functions as the modules (each version's
equations, written once in its `modeling_rwkvN.py`), called directly on the weights (`DirectCalls`):
`model_step`. `rwkv_paths.pick_path` decides when a forward pass is such a step and how it runs:

- "step": `model_step` as it is (off CUDA, or with config `cuda_graph_decode` off);
- "graph": `model_step` captured in a CUDA graph (`RwkvGraphDecoder`), the state living in static
  buffers that the graph reads and overwrites. An RWKV decode step is a few hundred small kernels over
  a state of fixed size, so launched one by one from Python the launch gaps dominate;
- compiled (config `compile_decode`): each block's step under torch.compile, so that inductor fuses
  each chain of elementwise work into the kernel around it; at small batch on CUDA each product
  `x W^T` is a multiply-and-sum (`ReduceCalls`) that inductor turns into a reduction kernel reading W
  once near the memory bandwidth. It computes the same function, rounded differently in bf16/fp16;
- Triton (config `triton_decode`: RWKV-7 by default, the others when asked): the captured step is
  `rwkv_triton.triton_step`, the version's equations as seven (RWKV-6: nine) hand-written kernels a
  layer, products included (inductor leaves each product a kernel of its own beside the fused elementwise
  ones).

`generate()` uses this by itself. The cache being decoded by a graph holds the decoder's static
buffers, so a step copies nothing; when another cache comes to the same decoder, the previous one
first gets its own copy of the state (no two caches share). Direct use:

    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder
    dec = RwkvGraphDecoder(model, batch_size=1)        # captures on first use
    new_tokens = dec.generate(input_ids, attention_mask=None, max_new_tokens=256)   # greedy
    # or step by step, after loading a state from an ordinary forward pass:
    out = model(input_ids, use_cache=True, logits_to_keep=1); dec.load_cache(out.cache)  # or .past_key_values
    logits = dec.step(next_ids)                        # [B, V], a view of a static buffer

This file imports no model class: it reaches the blocks through the model it is given.
"""

from __future__ import annotations

import operator
import types
import warnings
import weakref
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from .rwkv_cache import CACHE_FIELD, RwkvCache, copy_into, map_tensors, same_tensors
from .rwkv_helpers import DirectCalls, ReduceCalls
from .rwkv_inputs import normalize_mask
from .rwkv_paths import Path, pick_path, stop_auto_compiling, stop_triton_prompt, stop_triton_step
from . import rwkv_paths, rwkv_triton
from .rwkv_triton import _pow2, make_plan, triton_step, tune_step

Tensor = torch.Tensor


def model_step(model, ids: Tensor, cache: RwkvCache, path: Path, block_fn=None, calls=None) -> Tensor:
    """One token per row (ids [B, 1]) through a whole causal LM of ours, from the state in `cache`
    (which it updates): logits [B, V]. `block_fn(block, *args)` runs one block (default: its forward,
    without `nn.Module.__call__`); `calls`: how products run (default: as the path says)."""
    body = model.model
    if calls is None:
        calls = ReduceCalls if path.reduce else DirectCalls
    x = F.embedding(ids, body.emb.weight)
    x = body._blocks(x, None, cache, path.wkv, input_ids=ids, calls=calls, block_fn=block_fn or _block_forward)
    return F.linear(DirectCalls.norm(body.ln_out, x[:, -1]), model.lm_head.weight)


def _block_forward(block, *args):
    return type(block).forward(block, *args)


def _block_forward_in_place(block, x, state, *args):
    """A block's step that writes the new state into `state`'s tensors (a captured graph's buffers).
    Compiled, inductor writes each new state straight into its buffer (with the copies outside the
    compiled function, batch 32 of a 1.5B RWKV-7 measured 9,359 tok/s on an H200, against 10,447 for
    the step before the redesign, which wrote inside, on another H200: ~0.8 GB of extra state traffic
    per step)."""
    x, new, v_first = type(block).forward(block, x, state, *args)
    copy_into(state, new)
    return x, state, v_first


def _compiled(fn, backend="inductor"):
    """`fn` under torch.compile (`backend`), as a fresh copy of the function for each user.

    Dynamo keeps its compiled variants per code object, and stops compiling new ones after
    `recompile_limit` (8): with one shared function, a few decoders (dtypes, batch sizes; layer 0 and
    the others are two variants each) would run it uncompiled. A copy per decoder needs only its own
    few; inductor's cache makes recompiling identical graphs fast."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
    return torch.compile(copy, dynamic=False, fullgraph=True, backend=backend)


class RwkvGraphDecoder:
    """Greedy/step decoding of an RWKV causal LM through one CUDA graph per step.

    `model`: one of our `Rwkv*ForCausalLM` on a CUDA device. `batch_size` is fixed at capture.
    `fused`: capture the compiled step (see the module's docstring; the first capture compiles, for
    seconds). `path`: the path to capture (`rwkv_paths.pick_path`; default: picked for this model).
    """

    def __init__(self, model, batch_size: int = 1, warmup: int = 3, fused: bool = False, path: Optional[Path] = None,
                 triton: Optional[bool] = False):
        dev = next(model.parameters()).device
        if dev.type != "cuda":
            raise ValueError("RwkvGraphDecoder needs the model on a CUDA device")
        # weakly: the decoders that `step_logits` keeps per model must not keep the model alive
        self._model = weakref.ref(model)
        self.B, self.device = batch_size, dev
        self.dtype = model.get_input_embeddings().weight.dtype
        if path is None:
            with torch.no_grad():
                path = pick_path(model, dev, 1, step=True, graph=True, compiled=fused, batch=batch_size, triton=triton)
        self.path = path
        self._block_fn = _compiled(_block_forward_in_place) if path.compiled else _block_forward_in_place
        self._plan = None
        if path.triton:
            try:
                self._plan = make_plan(model)
            except Exception as e:
                self._eager_instead("Triton", e, stop=False)  # (this model's weights: another may do)
        self.cache = _started(model, RwkvCache(len(model.model.blocks)), batch_size)
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._owner: Optional[weakref.ref] = None
        self.logits: Optional[Tensor] = None
        self.warmup = warmup
        self._prompts: dict = {}  # width -> _PromptGraph (`prompt`)
        self._pool = None  # their memory pool: one for all, as they never run at once

    @property
    def fused(self) -> bool:
        return self.path.compiled

    @property
    def model(self):
        model = self._model()
        if model is None:
            raise RuntimeError("the model this decoder was captured for no longer exists")
        return model

    # ------------------------------------------------------------------------------------- state
    def load_cache(self, cache: RwkvCache) -> None:
        """Copy an RwkvCache (e.g. after prefill) into the static buffers."""
        if cache.batch_size != self.B:
            raise ValueError(f"the decoder was built for batch {self.B}, the cache holds {cache.batch_size}")
        for dst, src in zip(self.cache.layers_state, cache.layers_state):
            copy_into(dst, src)
        self.cache.seen_tokens = cache.seen_tokens

    def export_cache(self) -> RwkvCache:
        """An independent RwkvCache holding the current state (to continue with the eager model)."""
        return self.cache.clone()

    # -------------------------------------------------------------------------------------- step
    def _step(self) -> Tensor:
        # a cache over the static buffers, which the in-place block step overwrites; the ids range
        # check of a forward pass would synchronise, which capture forbids
        if self.path.triton:  # (its kernels update the state tensors in place)
            return triton_step(self.model, self.ids, self.cache.layers_state, self._plan)
        tmp = RwkvCache(len(self.cache.layers_state))
        tmp.layers_state = list(self.cache.layers_state)
        return model_step(self.model, self.ids, tmp, self.path, self._block_fn)

    @torch.no_grad()
    def capture(self) -> None:
        saved = self.cache.clone().layers_state
        try:
            self._capture(saved)
        except Exception as e:
            if not (self.path.compiled or self.path.triton):
                raise
            self._eager_instead("compiled" if self.path.compiled else "Triton", e)
            self._restore(saved)
            self._capture(saved)

    def _eager_instead(self, what: str, e: Exception, stop: bool = True) -> None:
        """The compiled or Triton step failed where the eager one works (torch.compile or Triton without
        a C compiler for their launchers, an old compiler, a card Triton does not know...): say so once
        and decode with the eager step; the process picks that step by default no more."""
        setting = "compile_decode" if what == "compiled" else "triton_decode"
        warnings.warn(f"the {what} decode step failed ({type(e).__name__}: {e}); using the eager step "
                      f"({setting}=False says so from the start)")
        if stop and self.path.compiled:
            stop_auto_compiling()
        if stop and self.path.triton:
            stop_triton_step()
        self.path = self.path._replace(compiled=False, reduce=False, triton=False)
        self._block_fn, self._plan = _block_forward_in_place, None

    def _capture(self, saved) -> None:
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            if self.path.triton and rwkv_triton.STEP_TUNING:
                tune_step(self._step)  # each product's tiles timed as the step runs them (once a process)
            for _ in range(self.warmup):
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.logits = self._step()
        self.graph = g
        self._restore(saved)  # warm-up steps changed the state

    def _restore(self, saved) -> None:
        for dst, src in zip(self.cache.layers_state, saved):
            copy_into(dst, src)

    @torch.no_grad()
    def step(self, ids: Tensor) -> Tensor:
        """Feed one token per row (ids [B] or [B, 1]); returns the logits [B, V] (a static buffer)."""
        if self.graph is None:
            self.capture()
        self.ids.copy_(ids.view(self.B, 1))
        self.graph.replay()
        self.cache.seen_tokens += 1
        return self.logits

    # ----------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def prompt(self, ids: Tensor, mask: Optional[Tensor]) -> Tensor:
        """ids [B, T] through the Triton step at once (`triton_step`, T tokens a row), from the state in
        the static buffers and into them; `mask` [B, T] bool (False: padding) or None. The last
        column's logits [B, V] (a copy). Launched from Python, the step's ~170 launches cost the host
        more than the card takes to run them; so the step is captured, once for each width: T rounded
        up to a power of two (`prompt_width`), the rows padded on the left, which changes no state.
        A real token's outputs are those of the uncaptured step but for the products' rounding where
        the padded row count takes other tiles. Where that width would exceed `TRITON_PROMPT_ROWS`
        rows, or with `PROMPT_GRAPHS` off, it runs uncaptured. The widths' graphs keep their buffers
        in one pool while the decoder lives: by their sizes, some 120 MB at 1,024 rows of a 1.5B RWKV-7
        (width 2048)."""
        B, T = ids.shape
        width = prompt_width(B, T)
        if width is None:
            return triton_step(self.model, ids, self.cache.layers_state, self._plan, mask)
        g = self._prompts.get(width)
        if g is None:
            g = self._prompts[width] = self._capture_prompt(width)
        pad = width - T
        if pad:
            g.ids[:, :pad].zero_()
            g.mask[:, :pad].zero_()
        g.ids[:, pad:].copy_(ids)
        if mask is None:
            g.mask[:, pad:].fill_(True)
        else:
            g.mask[:, pad:].copy_(mask)
        g.graph.replay()
        return g.logits.clone()

    def _capture_prompt(self, width: int) -> "_PromptGraph":
        model, B = self.model, self.B
        ids = torch.zeros(B, width, dtype=torch.long, device=self.device)
        mask = torch.ones(B, width, dtype=torch.bool, device=self.device)
        # once on copies of the state, which stays as it is, so that Triton builds this width's kernels.
        # (Their products take the tiles the decode step's tuning chose for the same kind and row
        # block, else one tile, `rwkv_triton._UNTUNED`. Tuning a prompt's products as the decode step's
        # are, on an H200 at 32 x 16 tokens, left the prompt at 13.2 ms against 13.5 and doubled the
        # first generate() call on a cold card, 35 -> 71 s: not done.)
        triton_step(model, ids, [map_tensors(torch.clone, s) for s in self.cache.layers_state], self._plan, mask)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):  # (capturing runs nothing)
            logits = triton_step(model, ids, self.cache.layers_state, self._plan, mask)
        return _PromptGraph(g, ids, mask, logits)

    # ------------------------------------------------------------------- a cache that decodes here
    def owns(self, cache: RwkvCache) -> bool:
        # the layer states are tuples, so the same tuple objects mean the same tensors
        return (self._owner is not None and self._owner() is cache and len(cache.layers_state) == len(self.cache.layers_state)
                and all(map(operator.is_, cache.layers_state, self.cache.layers_state)))

    def adopt(self, cache: RwkvCache) -> None:
        """Make `cache` hold the static buffers (its state copied in); a previous holder gets a copy."""
        previous = self._owner() if self._owner is not None else None
        if previous is not None and previous is not cache and same_tensors(previous.layers_state, self.cache.layers_state):
            previous.layers_state = self.cache.clone().layers_state
        self.load_cache(cache)
        cache.layers_state = list(self.cache.layers_state)
        self._owner = weakref.ref(cache)

    @torch.no_grad()
    def run(self, ids: Tensor, cache: RwkvCache, dtype: Optional[torch.dtype] = None) -> Tensor:
        """One step for `cache` (which ends up holding the static buffers); returns logits [B, V] (a copy,
        in `dtype` if given)."""
        if not self.owns(cache):
            self.adopt(cache)
        logits = self.step(ids)
        cache.seen_tokens += 1
        return logits.to(dtype or logits.dtype, copy=True)

    # ---------------------------------------------------------------------------------- generate
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, max_new_tokens: int = 16) -> Tensor:
        """Greedy decoding: prefill with the model's own forward (fastest prefill path), then graph steps.

        Returns only the new tokens, [B, max_new_tokens].
        """
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=True, logits_to_keep=1)
        self.load_cache(getattr(out, CACHE_FIELD))
        nxt = out.logits[:, -1].argmax(-1)
        toks = [nxt]
        for _ in range(max_new_tokens - 1):
            nxt = self.step(nxt).argmax(-1)
            toks.append(nxt)
        return torch.stack(toks, dim=1)


class _PromptGraph(NamedTuple):
    """A prompt width's captured Triton step: the graph, its static inputs and its logits."""

    graph: "torch.cuda.CUDAGraph"
    ids: Tensor
    mask: Tensor
    logits: Tensor


# prompts go through `RwkvGraphDecoder.prompt`'s captured steps (else its Triton step uncaptured)
PROMPT_GRAPHS = True


def prompt_width(batch: int, tokens: int) -> Optional[int]:
    """The width of the captured step a prompt of `batch` rows of `tokens` goes through: `tokens`
    rounded up to a power of two; None (uncaptured) with `PROMPT_GRAPHS` off or where that would be
    more rows than `rwkv_paths.TRITON_PROMPT_ROWS`."""
    width = _pow2(tokens)
    return width if PROMPT_GRAPHS and batch * width <= rwkv_paths.TRITON_PROMPT_ROWS else None


# ------------------------------------------------------------------------------- from a forward pass
def step_logits(model, input_ids: Tensor, cache: RwkvCache, path: Path, dtype: Optional[torch.dtype] = None) -> Tensor:
    """One decode step of `model` along `path` (runner "step" or "graph"); logits [B, V] (in `dtype`
    if given: from a graph, the copy out of its buffer is the conversion)."""
    if path.runner == "graph":
        return _decoder(model, input_ids.shape[0], path).run(input_ids, cache, dtype)
    logits = _plain_step(model, input_ids, cache, path)
    return logits if dtype is None else logits.to(dtype)


def prompt_logits(model, input_ids: Tensor, cache: RwkvCache, path: Path, attention_mask=None) -> Optional[Tensor]:
    """input_ids [B, T] through the Triton step at once (`rwkv_triton.triton_step`, T tokens a row in
    each launch) from the state in `cache` (empty: each block's starting state, as the modules start);
    the last column's logits [B, 1, V]. `attention_mask` [B, T]: 0 for padding (left, or inside a row;
    each row's last token real), which changes no state. On a captured path (runner "graph") the state
    ends in the decoder's buffers, which `cache` then holds, as after a decode step; where that
    decoder's Triton step failed and it fell back to the eager one, the tokens go through it one by
    one (with padding: None, the modules take it). Else `cache` gets new state tensors.

    Where the step fails on the first prompt of the process, or the first with padding (a Triton
    that cannot build these kernels), it says so once, puts `cache` back as it was and returns None (the caller runs the
    modules); prompts go through the modules from then on (`rwkv_paths.stop_triton_prompt`)."""
    B, T = input_ids.shape
    mask = normalize_mask(attention_mask, (B, T), input_ids.device)
    kind = mask is not None  # (the kernels built for padding, or not)
    empty = cache.batch_size is None
    dec = snapshot = None
    if path.runner == "graph":
        dec = _decoder(model, B, path)
        if dec.graph is None:
            dec.capture()  # (first: it tunes the tiles, and where Triton fails it falls back to the eager step)
        if not dec.path.triton:
            if mask is not None:
                return None
            if empty:
                _started(model, cache, B)
            for t in range(T):
                logits = step_logits(model, input_ids[:, t, None], cache, path)
            return logits[:, None]
        if kind not in _PROMPT_RAN and dec.owns(cache):  # (the state lives only in the buffers the step overwrites)
            snapshot = dec.export_cache().layers_state
    if empty:
        _started(model, cache, B)
    before = cache.layers_state  # (adopting copies them into the decoder's buffers: they stay as they are)
    try:
        if dec is None:
            states = [map_tensors(lambda t: t.clone(), s) for s in cache.layers_state]
            logits = triton_step(model, input_ids, states, make_plan(model), mask)
            cache.layers_state = states
        else:
            if not dec.owns(cache):
                dec.adopt(cache)
            logits = dec.prompt(input_ids, mask)
            dec.cache.seen_tokens += T
    except Exception as e:
        if kind in _PROMPT_RAN:
            raise
        warnings.warn(f"the Triton step failed on a prompt ({type(e).__name__}: {e}); prompts go through the "
                      "modules in this process")
        stop_triton_prompt()
        if snapshot is not None:
            for dst, src in zip(dec.cache.layers_state, snapshot):
                copy_into(dst, src)
        else:
            cache.layers_state = [None] * len(before) if empty else before
        return None
    _PROMPT_RAN.add(kind)
    cache.seen_tokens += T
    return logits[:, None]


# a prompt with padding (True) or without (False) went through the Triton step in this process: a later
# failure of that kind is an error
_PROMPT_RAN: set = set()


def _started(model, cache: RwkvCache, batch: int) -> RwkvCache:
    """An empty `cache` given each block's starting state, as the modules start from (in place)."""
    emb = model.get_input_embeddings().weight
    cache.layers_state = [blk.zero_state(batch, emb.device, emb.dtype) for blk in model.model.blocks]
    return cache


# model -> its compiled block step (for `compile_decode` off CUDA), or None where compiling failed
_COMPILED_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _plain_step(model, input_ids: Tensor, cache: RwkvCache, path: Path) -> Tensor:
    """A step without a graph (compiled if the path says so). The cache gets new state tensors, as
    with the modules; nothing held elsewhere changes."""
    block_fn = None
    if path.compiled:
        if model not in _COMPILED_STEPS:
            _COMPILED_STEPS[model] = _compiled(_block_forward)
        block_fn = _COMPILED_STEPS[model]
    tmp = RwkvCache(len(cache.layers_state))
    tmp.layers_state = list(cache.layers_state)
    try:
        logits = model_step(model, input_ids, tmp, path, block_fn)
    except Exception as e:
        if block_fn is None:
            raise
        # torch.compile needs a working C++ compiler on CPU: without one, say so once and go on plainly
        warnings.warn(f"the compiled decode step failed ({type(e).__name__}: {e}); using the plain step")
        _COMPILED_STEPS[model] = None
        tmp.layers_state = list(cache.layers_state)
        logits = model_step(model, input_ids, tmp, path._replace(compiled=False, reduce=False))
    cache.layers_state = tmp.layers_state
    cache.seen_tokens += 1
    return logits


# model -> {(batch size, dtype, device, weight storage, path): decoder}; weak, so a model's graphs go
# with it, and kept off the module itself, so deepcopy / pickling a model never meets a CUDA graph
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MAX_DECODERS_PER_MODEL = 4


def _decoder(model, batch: int, path: Path) -> "RwkvGraphDecoder":
    """The model's decoder for this batch size and path (made here the first time, captured on first use)."""
    head = model.lm_head.weight
    # inference mode is part of the key: buffers made under it cannot be updated in place outside it
    key = (batch, head.dtype, head.device, head.data_ptr(), model.model.emb.weight.data_ptr(),
           torch.is_inference_mode_enabled(), path)
    decoders = _DECODERS.setdefault(model, {})
    dec = decoders.get(key)
    if dec is None:
        if len(decoders) >= _MAX_DECODERS_PER_MODEL:
            decoders.pop(next(iter(decoders)))
        dec = decoders[key] = RwkvGraphDecoder(model, batch_size=batch, path=path)
    return dec
