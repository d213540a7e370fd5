"""`rwkv-hf lambada` and `rwkv-hf ppl`: parse, call `rwkv_hf.evaluation`, print."""

import json

from rwkv_hf.errors import CliError


def _common(p):
    p.add_argument("--device", default="cpu", help="torch device for our model (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="our model's dtype (default fp32)")
    p.add_argument("--json", metavar="OUT", help="also write the numbers to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _write_json(path, result):
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


def _check_model_and_device(args):
    """The folder and the device, checked before any scoring starts (one line each when bad)."""
    from rwkv_hf.generation_cli import check_model_source, resolve_device

    args.device = resolve_device(args.device)
    check_model_source(args.model_dir)


def _lambada_arguments(p):
    p.add_argument("model_dir", nargs="?", help="converted model folder")
    p.add_argument("--data", help="LAMBADA jsonl ({\"text\": ...} per line; default: the shipped test set)")
    p.add_argument("--limit", type=int, help="score only the first N documents")
    p.add_argument("--reference", metavar="CKPT.pth", help="also score with BlinkDL's rwkv package on this checkpoint")
    p.add_argument("--batch-size", type=int, default=1, help="documents per padded batch on our side (default 1)")
    p.add_argument("--print-lm-eval-task", action="store_true", help="print an lm-eval task config for the data and exit")
    _common(p)


def _lambada_run(args):
    from rwkv_hf.evaluation import lm_eval_task_yaml, run_lambada

    if args.print_lm_eval_task:
        print(lm_eval_task_yaml(args.data), end="")
        return
    if not args.model_dir:
        raise CliError("MODEL_DIR is required (unless --print-lm-eval-task)")
    if args.limit is not None and args.limit < 1:
        raise CliError(f"--limit must be at least 1, got {args.limit}")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    _check_model_and_device(args)
    result = run_lambada(
        args.model_dir, data=args.data, limit=args.limit, reference=args.reference, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, progress=not args.no_progress,
    )
    _write_json(args.json, result)


def _ppl_arguments(p):
    p.add_argument("model_dir", help="converted model folder")
    p.add_argument("file", help="UTF-8 text file")
    p.add_argument("--reference", metavar="CKPT.pth", help="also score with BlinkDL's rwkv package on this checkpoint")
    p.add_argument("--chunk", type=int, default=1024, help="tokens per forward; the state carries across (default 1024)")
    _common(p)


def _ppl_run(args):
    from rwkv_hf.evaluation import run_perplexity

    _check_model_and_device(args)
    result = run_perplexity(args.model_dir, args.file, chunk=args.chunk, reference=args.reference,
                            device=args.device, dtype=args.dtype, progress=not args.no_progress)
    _write_json(args.json, result)


EVAL_COMMANDS = [
    ("lambada", "LAMBADA accuracy and perplexity, BlinkDL's procedure (optionally side by side with his package)",
     _lambada_arguments, _lambada_run),
    ("ppl", "token-level perplexity of a text file, streaming the state in chunks", _ppl_arguments, _ppl_run),
]
