"""Token-level perplexity of a text file, with the recurrent state streamed through it in chunks.

The file is encoded once and prefixed with token 0 (the document separator, as in LAMBADA), so every
token of the text is predicted: ppl = exp(-sum log p(t_i | t_<i) / n_tokens). The model sees the
tokens `chunk` at a time with its state carried in an `RwkvCache`, so memory is constant in the
length of the text (only `chunk` x vocab logits exist at once); the result equals one forward over
the whole text.
"""

from __future__ import annotations

import math
import time
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .lambada import _progress, load_model_and_tokenizer, tokenizer_encode


def _cache_of(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


@torch.no_grad()
def stream_logprob(model, tokens: Sequence[int], chunk: int = 1024, device=None, progress: bool = False):
    """(sum of log p(tokens[i] | tokens[:i]) for i >= 1, count): chunk by chunk, carrying the state."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 token, got {chunk}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    tokens = list(tokens)
    total, count, cache = 0.0, 0, None
    bar = _progress(max(0, len(tokens) - 1), "ppl", progress)
    bar.unit = "tok"
    try:
        for start in range(0, len(tokens) - 1, chunk):
            piece = tokens[start : start + chunk]
            nxt = torch.tensor(tokens[start + 1 : start + chunk + 1], dtype=torch.long, device=device)
            out = model(input_ids=torch.tensor([piece], device=device), cache=cache, use_cache=True)
            cache = _cache_of(out)
            logp = F.log_softmax(out.logits[0, : len(nxt)].float(), dim=-1)
            total += float(sum(float(x) for x in logp.gather(1, nxt[:, None])[:, 0].cpu()))
            count += len(nxt)
            bar.update(len(nxt))
    finally:
        bar.close()
    return total, count


def text_tokens(tokenizer, text: str) -> List[int]:
    return [0] + tokenizer_encode(tokenizer)(text)


def run_perplexity(
    model_dir,
    text_file,
    chunk: int = 1024,
    reference: Optional[str] = None,
    device: str = "cpu",
    dtype: str = "fp32",
    progress: bool = True,
    print_fn=print,
) -> dict:
    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype)
    with open(text_file, encoding="utf-8") as f:
        tokens = text_tokens(tokenizer, f.read())
    if len(tokens) < 2:
        raise ValueError(f"{text_file} has no text to score")
    total, count = stream_logprob(model, tokens, chunk=chunk, device=device, progress=progress)
    ppl = math.exp(-total / count)
    result = {"model": str(model_dir), "file": str(text_file), "tokens": count, "chunk": chunk,
              "hf": {"ppl": ppl, "logprob_sum": total, "wall_s": time.perf_counter() - t0}}
    print_fn(f"hf {count} tokens ppl {ppl:.4f}")
    if reference:
        from .reference import reference_perplexity

        rtotal, rcount, wall = reference_perplexity(reference, text_file, chunk)
        rppl = math.exp(-rtotal / rcount)
        result["reference"] = {"ckpt": str(reference), "ppl": rppl, "logprob_sum": rtotal, "tokens": rcount, "wall_s": wall}
        print_fn(f"reference {rcount} tokens ppl {rppl:.4f}")
        print_fn(f"|dppl| {abs(ppl - rppl):.4g}")
    return result
