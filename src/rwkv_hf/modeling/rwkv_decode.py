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

The step runs exactly the model's eager one-token forward (same modules, same ops), so greedy tokens
match `model.generate(do_sample=False)`. Works for every version (v4's (aa, bb, pp) state too).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from .rwkv_common import CACHE_FIELD, RwkvCache, _map_tensors

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

    def __init__(self, model, batch_size: int = 1, warmup: int = 3, compile: bool = False):
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
        # compile=True: torch.compile fuses the step's elementwise chains (token shift, LoRA activations,
        # the one-token WKV update, norms) into fewer kernels before the graph is captured. Fused kernels
        # keep intermediates in fp32 where eager rounds them to the model's dtype, so bf16 logits differ
        # from eager's in the last bits and greedy tokens can (rarely) diverge; off by default.
        self._step_fn = torch.compile(self._eager_step, dynamic=False) if compile else self._eager_step
        if compile:
            warmup = max(warmup, 3)
            self.warmup = warmup

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
        out = RwkvCache(len(self.cache.layers_state))
        out.layers_state = [_map_tensors(lambda t: t.clone(), s) for s in self.cache.layers_state]
        out.seen_tokens = self.cache.seen_tokens
        return out

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

    @torch.no_grad()
    def capture(self) -> None:
        saved = [_map_tensors(lambda t: t.clone(), s) for s in self.cache.layers_state]
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
        for dst, src in zip(self.cache.layers_state, saved):  # warm-up steps changed the state: restore
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
        return self._owner is not None and self._owner() is cache and _same_tensors(cache.layers_state, self.cache.layers_state)

    def adopt(self, cache: RwkvCache) -> None:
        """Make `cache` hold the static buffers (its state copied in); a previous holder gets a copy."""
        previous = self._owner() if self._owner is not None else None
        if previous is not None and previous is not cache and _same_tensors(previous.layers_state, self.cache.layers_state):
            previous.layers_state = [_map_tensors(lambda t: t.clone(), s) for s in self.cache.layers_state]
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
    # inference mode is part of the key: buffers made under it cannot be updated in place outside it
    key = (input_ids.shape[0], head.dtype, head.device, head.data_ptr(), model.model.emb.weight.data_ptr(),
           torch.is_inference_mode_enabled())
    decoders = _DECODERS.setdefault(model, {})
    dec = decoders.get(key)
    if dec is None:
        if len(decoders) >= _MAX_DECODERS_PER_MODEL:
            decoders.pop(next(iter(decoders)))
        dec = decoders[key] = RwkvGraphDecoder(model, batch_size=input_ids.shape[0])
    return dec.run(input_ids, cache)
