"""Fast decoding on CUDA: the recurrent state in static buffers, one captured CUDA graph per step.

An RWKV decode step is a few hundred small kernels (token shift, LoRAs, the one-token WKV update,
norms) over a state of fixed size. Launched one by one from Python, the launch gaps dominate; since
the shapes never change from step to step, the whole step can be captured once as a CUDA graph and
replayed, with the state living in buffers that the graph reads and overwrites.

`generate()` uses this by itself: our causal LM's forward sends every one-token step without
gradients on CUDA to `graph_step` (config `cuda_graph_decode`, on by default). The cache being
decoded then holds the decoder's static buffers, so a step copies nothing; when another cache comes
to the same decoder, the previous one first gets its own copy of the state (no two caches share).
Direct use:

    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder
    dec = RwkvGraphDecoder(model, batch_size=1)        # captures on first use
    new_tokens = dec.generate(input_ids, attention_mask=None, max_new_tokens=256)   # greedy
    # or step by step, after loading a state from an ordinary forward pass:
    out = model(input_ids, use_cache=True, logits_to_keep=1); dec.load_cache(out.cache)  # or .past_key_values
    logits = dec.step(next_ids)                        # [B, V], a view of a static buffer

By default the step runs exactly the model's eager one-token forward (same modules, same ops), so
greedy tokens match `model.generate(do_sample=False)`. Works for every version (v4's (aa, bb, pp)
state too). `fused=True` (in `generate()`: config `compile_decode`) captures instead the
torch.compile'd step of `rwkv_step` (about twice as fast for RWKV-7); it computes the same function,
rounded differently in bf16/fp16.
"""

from __future__ import annotations

import operator
import types
import warnings
import weakref
from typing import Optional

import torch

from . import rwkv_step
from .rwkv_common import CACHE_FIELD, RwkvCache

Tensor = torch.Tensor


def _copy_into(dst, src) -> None:
    if isinstance(dst, Tensor):
        dst.copy_(src)
    else:
        for d, s in zip(dst, src):
            _copy_into(d, s)


class RwkvGraphDecoder:
    """Greedy/step decoding of an RWKV causal LM through one CUDA graph per step.

    `model`: one of our `Rwkv*ForCausalLM` on a CUDA device. `batch_size` is fixed at capture.
    """

    def __init__(self, model, batch_size: int = 1, warmup: int = 3, fused: bool = False):
        dev = next(model.parameters()).device
        if dev.type != "cuda":
            raise ValueError("RwkvGraphDecoder needs the model on a CUDA device")
        # weakly: the decoders that `graph_step` keeps per model must not keep the model alive
        self._model = weakref.ref(model)
        self.B, self.device = batch_size, dev
        self.dtype = model.get_input_embeddings().weight.dtype
        body = model.model
        self.cache = RwkvCache(len(body.blocks))
        self.cache.layers_state = [blk.zero_state(batch_size, dev, self.dtype) for blk in body.blocks]
        self.ids = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self._owner: Optional[weakref.ref] = None
        self.logits: Optional[Tensor] = None
        self.warmup = warmup
        # fused=True: each layer's step is one torch.compile'd function (see rwkv_step), ~2x faster for
        # RWKV-7; the first capture compiles it (seconds). Its fused kernels round differently from
        # the eager ops, so bf16 logits differ from eager's by bf16 noise (fp32: by ~1e-6).
        self.fused = bool(fused)
        self._step_fn = self._eager_step
        if self.fused:
            layer_fn = rwkv_step.layer_step_for(model)
            if layer_fn is None:
                raise ValueError(f"no step function for {type(model).__name__} in {self.dtype} (v4-v6 in fp16 rescale on the fly)")
            self._layer_fn = _compiled_layer_step(layer_fn)
            self._params = [rwkv_step.layer_params(blk) for blk in body.blocks]
            self._step_fn = self._fused_step

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
            _copy_into(dst, src)
        self.cache.seen_tokens = cache.seen_tokens

    def export_cache(self) -> RwkvCache:
        """An independent RwkvCache holding the current state (to continue with the eager model)."""
        return self.cache.clone()

    # -------------------------------------------------------------------------------------- step
    def _eager_step(self) -> Tensor:
        body = self.model.model
        tmp = RwkvCache(len(body.blocks))
        tmp.layers_state = list(self.cache.layers_state)
        # the body and the head, not the causal LM's forward (which would send this step here again);
        # inputs_embeds, not input_ids: the ids range check would synchronise, which capture forbids
        # (mode auto: the one-token WKV update is fla's fused kernel where fla is installed, else the recurrence)
        out = body(inputs_embeds=body.emb(self.ids), cache=tmp, use_cache=True)
        new = getattr(out, CACHE_FIELD)
        for dst, src in zip(self.cache.layers_state, new.layers_state):
            _copy_into(dst, src)
        return self.model.lm_head(out.last_hidden_state[:, -1])

    def _fused_step(self) -> Tensor:
        return rwkv_step.model_step(self.model, self.ids, self.cache.layers_state, self._layer_fn, self._params)

    @torch.no_grad()
    def capture(self) -> None:
        saved = self.cache.clone().layers_state
        try:
            self._capture(saved)
        except Exception as e:
            if not self.fused:
                raise
            # torch.compile can fail where the eager step works (no Triton for this GPU, an old
            # compiler...): say so once and decode with the eager step
            warnings.warn(f"the compiled decode step failed ({type(e).__name__}: {e}); using the eager step")
            self.fused, self._step_fn = False, self._eager_step
            self._restore(saved)
            self._capture(saved)

    def _capture(self, saved) -> None:
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(self.warmup):
                self._step_fn()
        torch.cuda.current_stream(self.device).wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            self.logits = self._step_fn()
        self.graph = g
        self._restore(saved)  # warm-up steps changed the state

    def _restore(self, saved) -> None:
        for dst, src in zip(self.cache.layers_state, saved):
            _copy_into(dst, src)

    @torch.no_grad()
    def step(self, ids: Tensor) -> Tensor:
        """Feed one token per row (ids [B] or [B, 1]); returns the logits [B, V] (a static buffer)."""
        if self.graph is None:
            self.capture()
        self.ids.copy_(ids.view(self.B, 1))
        self.graph.replay()
        self.cache.seen_tokens += 1
        return self.logits

    # ------------------------------------------------------------------- a cache that decodes here
    def owns(self, cache: RwkvCache) -> bool:
        # the layer states are tuples, so the same tuple objects mean the same tensors
        return (self._owner is not None and self._owner() is cache and len(cache.layers_state) == len(self.cache.layers_state)
                and all(map(operator.is_, cache.layers_state, self.cache.layers_state)))

    def adopt(self, cache: RwkvCache) -> None:
        """Make `cache` hold the static buffers (its state copied in); a previous holder gets a copy."""
        previous = self._owner() if self._owner is not None else None
        if previous is not None and previous is not cache and _same_tensors(previous.layers_state, self.cache.layers_state):
            previous.layers_state = self.cache.clone().layers_state
        self.load_cache(cache)
        cache.layers_state = list(self.cache.layers_state)
        self._owner = weakref.ref(cache)

    @torch.no_grad()
    def run(self, ids: Tensor, cache: RwkvCache) -> Tensor:
        """One step for `cache` (which ends up holding the static buffers); returns logits [B, V] (a copy)."""
        if not self.owns(cache):
            self.adopt(cache)
        logits = self.step(ids)
        cache.seen_tokens += 1
        return logits.clone()

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


def _compiled_layer_step(fn):
    """A layer step of `rwkv_step` under torch.compile, as a fresh copy of the function for each user.

    Dynamo keeps its compiled variants per code object, and stops compiling new ones after
    `recompile_limit` (8): with one shared function, a few decoders (dtypes, batch sizes; layer 0 and
    the others are two variants each) would run it uncompiled. A copy per decoder needs only its own
    two; inductor's cache makes recompiling identical graphs fast."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__)
    return torch.compile(copy, dynamic=False, fullgraph=True)


# model -> (its plain layer step, the one `fused_step` runs with compile_decode: compiled, or plain if compiling failed)
_FUSED_FNS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fused_step(model, input_ids: Tensor, cache: RwkvCache) -> Tensor:
    """One decode step off CUDA through the version's `rwkv_step` function (compiled if the config's
    `compile_decode` is set). The state is copied first, so, as with the modules, the cache gets new
    tensors and nothing held elsewhere changes. Returns logits [B, V]."""
    plain = rwkv_step.layer_step_for(model)
    fn = plain
    if getattr(model.config, "compile_decode", False):
        entry = _FUSED_FNS.get(model)
        if entry is None or entry[0] is not plain:
            entry = _FUSED_FNS[model] = (plain, _compiled_layer_step(plain))
        fn = entry[1]
    layers = cache.clone().layers_state
    try:
        logits = rwkv_step.model_step(model, input_ids, layers, fn)
    except Exception as e:
        if fn is plain:
            raise
        # torch.compile needs a working C++ compiler on CPU: without one, say so once and go on plainly
        warnings.warn(f"the compiled decode step failed ({type(e).__name__}: {e}); using the plain step")
        fn = plain
        _FUSED_FNS[model] = (plain, plain)
        layers = cache.clone().layers_state
        logits = rwkv_step.model_step(model, input_ids, layers, fn)
    for i, s in enumerate(layers):
        cache.layers_state[i] = s
    cache.seen_tokens += 1
    return logits


def _same_tensors(a, b) -> bool:
    """Whether two layer-state lists hold the very same tensor objects (not just equal values)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if a is None or b is None or len(a) != len(b):
        return False
    return all(_same_tensors(x, y) for x, y in zip(a, b))


# model -> {(batch size, dtype, device, weight storage): decoder}; weak, so a model's graphs go with it,
# and kept off the module itself, so deepcopy / pickling a model never meets a CUDA graph
_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MAX_DECODERS_PER_MODEL = 4


def graph_step(model, input_ids: Tensor, cache: RwkvCache) -> Tensor:
    """One decode step of `model` (a causal LM on CUDA) through the CUDA graph for this batch size."""
    head = model.lm_head.weight
    fused = bool(getattr(model.config, "compile_decode", False)) and rwkv_step.layer_step_for(model) is not None
    # inference mode is part of the key: buffers made under it cannot be updated in place outside it
    key = (input_ids.shape[0], head.dtype, head.device, head.data_ptr(), model.model.emb.weight.data_ptr(),
           torch.is_inference_mode_enabled(), fused)
    decoders = _DECODERS.setdefault(model, {})
    dec = decoders.get(key)
    if dec is None:
        if len(decoders) >= _MAX_DECODERS_PER_MODEL:
            decoders.pop(next(iter(decoders)))
        dec = decoders[key] = RwkvGraphDecoder(model, batch_size=input_ids.shape[0], fused=fused)
    return dec.run(input_ids, cache)
