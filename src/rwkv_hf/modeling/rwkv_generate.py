"""generate()'s greedy and sampling loop for our causal LMs, with the host off the critical path.

transformers' `_sample` loop does, per new token, a forward call through `prepare_inputs_for_generation`
and `_update_model_kwargs_for_generation`, our forward's checks (ids in range, the mask all ones: each
a device-to-host sync), a `torch.cat` of the whole sequence, and a sync to ask whether every row has
finished. On CUDA each sync drains the queue, so the GPU waits for the host's next step every token.
`decode_loop` computes the same tokens from the same functions: transformers' prefill, the decode step
the forward pass would run (`rwkv_decode.step_logits` on the path `rwkv_paths.own_generate_loop`
picked: a captured CUDA graph by default on CUDA), transformers' logits processors and stopping
criteria as it built them, and its token choice (softmax, then `torch.multinomial(probs, 1)`, so that
a seed draws the same tokens; or argmax). What differs is only when the host looks: every
`STOP_CHECK_EVERY` steps (one sync, which also hands the new tokens to a streamer, one `put` per step
as transformers does), not every step. Steps run past the last token are undone where they would
show: the result is cut where transformers' loop stops; a cache that outlives the call (one passed in,
or returned with `return_dict_in_generate`) is set back to the state after the last token fed, which
transformers' loop leaves (every token but the last generated one); and the random generator is set
to where transformers' draws leave it.

`RwkvForCausalLMBase._sample` asks `rwkv_paths.own_generate_loop` and runs this loop or transformers'.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .rwkv_cache import CACHE_FIELD, RwkvCache, map_tensors
from .rwkv_decode import step_logits
from .rwkv_paths import Path

Tensor = torch.Tensor

# how many steps the host queues before it looks at the device's tokens (a sync). On CPU a look
# costs nothing: every step, so that nothing runs past the end and streamed text comes at once.
STOP_CHECK_EVERY = {"cpu": 1, "cuda": 8}


def decode_loop(
    model, input_ids: Tensor, logits_processor, stopping_criteria, generation_config, path: Path,
    streamer=None, **model_kwargs,
):
    """transformers' `_sample` for an RWKV causal LM on `path` (see the module's docstring): the
    sequences [B, prompt + new], or transformers' output class holding them and the cache when
    `generation_config.return_dict_in_generate`."""
    B, start = input_ids.shape
    device = input_ids.device
    outputs = _prefill(model, input_ids, generation_config, model_kwargs)
    cache: RwkvCache = getattr(outputs, CACHE_FIELD)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32)
    del outputs
    # transformers stops when the sequence reaches max_length, after at least one new token
    total = max(1, stopping_criteria.max_length - start)
    # the sequences so far, in a buffer that grows by doubling (a length limit far beyond where EOS
    # comes would otherwise reserve memory for nothing); the processors and criteria see views of it
    ids = input_ids.new_empty(B, start + min(total, 256))
    ids[:, :start] = input_ids
    checks = type(stopping_criteria)(c for c in stopping_criteria if type(c).__name__ != "MaxLengthCriteria")
    pad_finished = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    pad = generation_config._pad_token_tensor.to(device) if pad_finished else None
    processors = list(logits_processor)
    do_sample = bool(generation_config.do_sample)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    alive = torch.zeros((), dtype=torch.long, device=device)  # steps after which some row was unfinished
    every = STOP_CHECK_EVERY.get(device.type, 8)
    kept = cache if _cache_outlives(model_kwargs, generation_config) else None
    rng = _generator(device) if do_sample else None
    # (only a stop that depends on the tokens can come between two looks: with none, nothing runs past the end)
    mark = _Mark(0, 0, kept, rng) if every > 1 and checks else None
    new = total  # tokens in the result
    streamed = 0
    probs = None
    for j in range(total):  # token j goes to column start + j
        if start + j == ids.shape[1]:
            ids = torch.cat([ids, ids.new_empty(B, min(ids.shape[1], start + total - ids.shape[1]))], 1)
        if j:
            logits = step_logits(model, ids[:, start + j - 1, None], cache, path, torch.float32)
        scores = logits
        seen = ids[:, : start + j]
        for p in processors:
            scores = p(seen, scores)
        if do_sample:
            probs = F.softmax(scores, dim=-1)
            tok = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            tok = torch.argmax(scores, dim=-1)
        if pad_finished:  # finished rows get the padding token (transformers: four launches of arithmetic)
            tok = torch.where(unfinished, tok, pad)
        ids[:, start + j] = tok
        if checks:
            unfinished = unfinished & ~checks(ids[:, : start + j + 1], None)
            alive += unfinished.any()
        if (j + 1) % every and j + 1 < total:
            continue
        # a look at the device: how far the rows went, and the tokens for the streamer
        if checks:
            steps_alive = int(alive)
            if steps_alive < j + 1:
                new = steps_alive + 1  # the first step after which every row had finished
        if streamer is not None:
            tokens = ids[:, start + streamed : start + min(new, j + 1)].cpu()
            for k in range(tokens.shape[1]):
                streamer.put(tokens[:, k])
            streamed += tokens.shape[1]
        if new <= j + 1:
            break
        if mark is not None:
            mark = _Mark(j, j + 1, kept, rng)
    if mark is not None and j + 1 > new:
        mark.undo_past(new, model, ids[:, start:], cache, path, probs)
    if streamer is not None:
        streamer.end()
    sequences = ids if ids.shape[1] == start + new else ids[:, : start + new].clone()
    if generation_config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=sequences, **{CACHE_FIELD: cache})
    return sequences


def _prefill(model, input_ids: Tensor, generation_config, model_kwargs: dict):
    """The prompt's forward pass, as transformers' loop makes it (a cache passed in: only the columns it
    has not consumed)."""
    if hasattr(model, "_prefill"):  # transformers 5
        return model._prefill(input_ids, generation_config, model_kwargs)
    model_kwargs = model._get_initial_cache_position(input_ids.shape[1], input_ids.device, model_kwargs)  # 4.57
    return model(**model.prepare_inputs_for_generation(input_ids, **model_kwargs), return_dict=True)


def _cache_outlives(model_kwargs: dict, generation_config) -> bool:
    """The caller sees the cache after the call: it passed one in, or asked for it back."""
    passed = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    return passed is not None or bool(generation_config.return_dict_in_generate)


def _generator(device: torch.device) -> torch.Generator:
    """The generator `torch.multinomial` draws from on `device`."""
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


class _Mark:
    """Where the loop last looked: `fed` tokens fed to the state, `drawn` sampling draws made; a copy
    of the state (of a cache that outlives the call) and of the generator there, to go back to when
    the steps after it ran past the end."""

    def __init__(self, fed: int, drawn: int, cache: Optional[RwkvCache], rng: Optional[torch.Generator]):
        self.fed, self.drawn = fed, drawn
        self.state = None if cache is None else ([map_tensors(lambda t: t.clone(), s) for s in cache.layers_state],
                                                 cache.seen_tokens)
        self.rng = None if rng is None else (rng, rng.get_state())

    def undo_past(self, new: int, model, tokens: Tensor, cache: RwkvCache, path: Path, probs: Optional[Tensor]) -> None:
        """Leave the cache and the generator as transformers' loop does after `new` tokens: the state
        after feeding tokens[:, :new - 1], `new` draws made."""
        if self.state is not None:
            cache.layers_state, cache.seen_tokens = list(self.state[0]), self.state[1]
            for k in range(self.fed, new - 1):
                step_logits(model, tokens[:, k, None], cache, path)
        if self.rng is not None:
            rng, state = self.rng
            rng.set_state(state)
            for _ in range(new - self.drawn):  # the same draws from a distribution of the same shape
                torch.multinomial(probs, num_samples=1)
