"""Evaluation: LAMBADA exactly as BlinkDL scores it (ours and, side by side, his package), and
streamed text perplexity. See `lambada.py` and `perplexity.py`."""

from .lambada import (
    DocResult,
    Tally,
    default_data_path,
    encode_docs,
    format_line,
    lm_eval_task_yaml,
    load_docs,
    run_lambada,
    score_pairs,
)
from .perplexity import run_perplexity, stream_logprob

__all__ = [
    "DocResult",
    "Tally",
    "default_data_path",
    "encode_docs",
    "format_line",
    "lm_eval_task_yaml",
    "load_docs",
    "run_lambada",
    "run_perplexity",
    "score_pairs",
    "stream_logprob",
]
