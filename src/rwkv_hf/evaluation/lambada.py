"""LAMBADA the way BlinkDL scores it, through our transformers models and (optionally) his package.

The procedure (ChatRWKV's LAMBADA check, World vocabulary):

* a document's context is its text up to the last space, its target is " " + the last word;
* ``src = [0] + encode(context)``, ``dst = encode(target)``; one forward over ``src + dst``;
* the document's log-prob is the sum of the log-probs of the target tokens; it is *correct* when
  every target token is the argmax of its prediction;
* ``ppl = exp(-mean document log-prob)``, ``acc = 100 * correct / n`` (a percentage, as BlinkDL
  prints it).

Batches: documents are cut into windows of whole hundreds (so the progress lines come out in data
order), sorted by length inside a window, and run as *left*-padded batches. Our models treat
attention-mask zeros as absent tokens, so every row gets exactly its own logits, and the target
positions are the last ``len(dst) + 1`` columns of every row: ``logits_to_keep`` builds logits only
there.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .reference import ReferenceLambada

PRINT_EVERY = 100
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}

Pair = Tuple[List[int], List[int]]  # (src, dst) token ids


def default_data_path() -> Path:
    """The LAMBADA test set (OpenAI's detokenised version, 5,153 docs) shipped with the package."""
    return Path(str(resources.files("rwkv_hf.evaluation") / "lambada_test.jsonl"))


def split_doc(text: str) -> Tuple[str, str]:
    """(context, target): the text up to its last space, and " " + the last word."""
    context, last = text.rsplit(" ", 1)
    return context, " " + last


def load_docs(path: Optional[str] = None, limit: Optional[int] = None) -> List[Tuple[str, str]]:
    """(context, target) pairs from a jsonl file of {"text": ...} lines (default: the shipped test set)."""
    path = Path(path) if path is not None else default_data_path()
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: expected a JSON object with a 'text' field ({e})") from None
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: 'text' must be a string, got {type(text).__name__}")
            if " " not in text:
                raise ValueError(f"{path}:{lineno}: the text has no space, so no last word to predict")
            docs.append(split_doc(text))
            if limit is not None and len(docs) >= limit:
                break
    return docs


def encode_docs(docs: Sequence[Tuple[str, str]], encode: Callable[[str], List[int]]) -> List[Pair]:
    """BlinkDL's tokenisation: context and target encoded *separately*; src starts with token 0."""
    return [([0] + list(encode(context)), list(encode(target))) for context, target in docs]


@dataclass
class DocResult:
    logprob: float  # sum over the target tokens
    correct: bool  # every target token was the argmax
    argmax: List[int]  # the predicted token at each target position (for exact side-by-side checks)


def score_logits(logits: torch.Tensor, dst: Sequence[int]) -> DocResult:
    """logits [len(dst), V]: row i predicts dst[i]. Log-softmax in fp32, summed in Python floats."""
    logp = F.log_softmax(logits.float(), dim=-1)
    target = torch.tensor(list(dst), dtype=torch.long, device=logp.device)
    picked = logp.gather(1, target[:, None])[:, 0]
    argmax = logp.argmax(dim=-1)
    return DocResult(
        logprob=float(sum(float(x) for x in picked.cpu())),
        correct=bool((argmax == target).all()),
        argmax=[int(a) for a in argmax.cpu()],
    )


def _windows(n: int, batch_size: int) -> Iterator[range]:
    """Consecutive index ranges of whole hundreds (big enough for ~8 batches to sort into)."""
    size = PRINT_EVERY * max(1, math.ceil(8 * batch_size / PRINT_EVERY))
    for start in range(0, n, size):
        yield range(start, min(n, start + size))


def left_pad(seqs: Sequence[Sequence[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) [len(seqs), longest] with every row's tokens at its right end (pad id 0)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def score_pairs(
    model, pairs: Sequence[Pair], batch_size: int = 1, device=None, on_batch: Optional[Callable[[int], None]] = None
) -> Iterator[Tuple[int, DocResult]]:
    """Yield (index, result) for every (src, dst) pair, in data order, window by window.

    `on_batch(n)` is called after each batch of n documents (for a progress bar)."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    for window in _windows(len(pairs), batch_size):
        order = sorted(window, key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
        done: Dict[int, DocResult] = {}
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            ids, mask = left_pad([pairs[i][0] + pairs[i][1] for i in rows])
            keep = max(len(pairs[i][1]) for i in rows) + 1
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device) if len(rows) > 1 else None,
                use_cache=False,
                logits_to_keep=keep,
            )
            logits = out.logits  # [B, keep, V]: columns width-keep .. width-1
            for r, i in enumerate(rows):
                d = len(pairs[i][1])
                done[i] = score_logits(logits[r, keep - d - 1 : keep - 1], pairs[i][1])
            if on_batch is not None:
                on_batch(len(rows))
        for i in window:
            yield i, done[i]


@dataclass
class Tally:
    """Running totals for one side: n, sum of document log-probs, correct documents."""

    n: int = 0
    logprob_sum: float = 0.0
    correct: int = 0
    results: List[DocResult] = field(default_factory=list)

    def add(self, result: DocResult) -> None:
        self.n += 1
        self.logprob_sum += result.logprob
        self.correct += int(result.correct)
        self.results.append(result)

    @property
    def ppl(self) -> float:
        try:
            return math.exp(-self.logprob_sum / self.n)
        except OverflowError:
            return math.inf

    @property
    def acc(self) -> float:
        return 100.0 * self.correct / self.n


def format_line(side: str, n: int, ppl: float, acc: float) -> str:
    return f"{side} {n} ppl {ppl:.2f} acc {acc:.2f}"


def checkpoints(n: int) -> List[int]:
    """The document counts after which a line is printed: every 100, and the last."""
    marks = list(range(PRINT_EVERY, n + 1, PRINT_EVERY))
    if n and (not marks or marks[-1] != n):
        marks.append(n)
    return marks


def load_model_and_tokenizer(model_dir, device: str = "cpu", dtype: str = "fp32"):
    """Our model and tokenizer from a converted folder (importing rwkv_hf registers the Auto classes)."""
    import rwkv_hf  # noqa: F401  (Auto* registration)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tokenizer


def tokenizer_encode(tokenizer) -> Callable[[str], List[int]]:
    return lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="doc", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def run_lambada(
    model_dir,
    data: Optional[str] = None,
    limit: Optional[int] = None,
    reference: Optional[str] = None,
    batch_size: int = 1,
    device: str = "cpu",
    dtype: str = "fp32",
    print_fn: Callable[[str], None] = print,
    progress: bool = True,
    reference_threads: Optional[int] = None,
) -> dict:
    """Score LAMBADA with our model (and BlinkDL's package on `reference`, a `.pth`), printing the lines.

    The reference runs in a subprocess at the same time as our side and streams one JSON line per
    document; lines are printed in pairs as both sides pass each hundred. Returns the numbers (what
    `--json` writes).
    """
    docs = load_docs(data, limit)
    if not docs:
        raise ValueError("no documents to score")
    marks = set(checkpoints(len(docs)))
    ref = ReferenceLambada(reference, docs, threads=reference_threads) if reference else None
    try:
        t0 = time.perf_counter()
        model, tokenizer = load_model_and_tokenizer(model_dir, device, dtype)
        pairs = encode_docs(docs, tokenizer_encode(tokenizer))
        hf, rf = Tally(), Tally()
        lines: List[dict] = []
        hf_time = None
        bar = _progress(len(docs), "lambada", progress)
        try:
            for i, result in score_pairs(model, pairs, batch_size=batch_size, device=device, on_batch=bar.update):
                hf.add(result)
                if hf.n in marks:
                    if hf.n == len(docs):
                        hf_time = time.perf_counter() - t0
                    entry = {"n": hf.n, "hf": {"ppl": hf.ppl, "acc": hf.acc}}
                    print_fn(format_line("hf", hf.n, hf.ppl, hf.acc))
                    if ref is not None:
                        while rf.n < hf.n:
                            rf.add(DocResult(**ref.next_result()))
                        entry["reference"] = {"ppl": rf.ppl, "acc": rf.acc}
                        print_fn(format_line("reference", rf.n, rf.ppl, rf.acc))
                    lines.append(entry)
        finally:
            bar.close()
        result = {
            "model": str(model_dir),
            "data": str(data if data is not None else default_data_path()),
            "n": hf.n,
            "batch_size": batch_size,
            "device": device,
            "dtype": dtype,
            "hf": {"ppl": hf.ppl, "acc": hf.acc, "wall_s": hf_time},
            "lines": lines,
            "docs": {"hf": [[r.logprob, r.correct, r.argmax] for r in hf.results]},
        }
        if ref is not None:
            dppl = max(abs(e["hf"]["ppl"] - e["reference"]["ppl"]) for e in lines)
            dacc = max(abs(e["hf"]["acc"] - e["reference"]["acc"]) for e in lines)
            print_fn(f"max |dppl| {dppl:.4g} max |dacc| {dacc:.4g}")
            ref.finish()
            result["reference"] = {"ckpt": str(reference), "ppl": rf.ppl, "acc": rf.acc, "wall_s": ref.wall_s}
            result["max_abs_dppl"], result["max_abs_dacc"] = dppl, dacc
            result["docs"]["reference"] = [[r.logprob, r.correct, r.argmax] for r in rf.results]
        return result
    finally:
        if ref is not None:
            ref.close()


def lm_eval_task_yaml(data: Optional[str] = None, task: str = "lambada_rwkv_hf") -> str:
    """An lm-eval task config scoring LAMBADA as above from a local jsonl (no download).

    lm-eval tokenises context + continuation *jointly* and takes the continuation as the tokens past
    the context's own encoding; BlinkDL (and `rwkv-hf lambada`) encode the two separately. Greedy
    longest match can merge across the boundary (e.g. a context ending in a character that forms one
    token with the target's leading space), and then the two procedures score different tokens.
    Pass `add_bos_token=True` in `--model_args` so the context starts with token 0 as here.
    """
    path = Path(data).resolve() if data is not None else default_data_path()
    return (
        f"# LAMBADA from {path}, scored like `rwkv-hf lambada` (use --model_args ...,add_bos_token=True)\n"
        f"task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {json.dumps(str(path))}\n"
        "output_type: loglikelihood\n"
        "test_split: test\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        "metric_list:\n"
        "  - metric: perplexity\n"
        "    aggregation: perplexity\n"
        "    higher_is_better: false\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )
