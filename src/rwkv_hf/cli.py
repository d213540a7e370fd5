"""``rwkv-hf`` command line: thin wrappers that parse arguments, call the library and print.

Each subcommand is one entry of ``COMMANDS``: ``(name, help, add_arguments(parser), run(args))``.
``run`` returns an exit status (or None for 0); a ``CliError`` (or OSError/ValueError) becomes one
line on stderr and exit status 2. Bad input is turned into one of these where it is read (a damaged
file, a device this machine lacks, ...), so any other exception is a bug and keeps its traceback.
Ctrl-C and SIGTERM unwind the same way (KeyboardInterrupt), so every temporary output is removed.
"""

import argparse
import contextlib
import signal
import sys
import threading

from rwkv_hf.cli_eval import EVAL_COMMANDS  # lambada, ppl
from rwkv_hf.cli_model import MODEL_COMMANDS  # convert, export, generate, chat, demo, state
from rwkv_hf.errors import CliError


def _tokenizer_arguments(parser):
    parser.add_argument("out_dir", help="folder to create with the World tokenizer files")
    parser.add_argument("--force", action="store_true", help="replace the folder if rwkv-hf wrote it (listed in its rwkv_hf_manifest.json)")


def _tokenizer_run(args):
    from rwkv_hf.tokenization import write_tokenizer_folder

    out = write_tokenizer_folder(args.out_dir, force=args.force)
    print(f"wrote the RWKV World tokenizer to {out}")


COMMANDS = MODEL_COMMANDS + [
    ("tokenizer", "write a standalone RWKV World tokenizer folder", _tokenizer_arguments, _tokenizer_run),
] + EVAL_COMMANDS


def build_parser():
    parser = argparse.ArgumentParser(prog="rwkv-hf", description="RWKV World models for Hugging Face transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, add_arguments, run in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def _one_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


def _terminate(signum, frame):
    raise KeyboardInterrupt  # unwinds through every `finally`: temporary outputs are removed


@contextlib.contextmanager
def _sigterm_unwinds():
    """SIGTERM behaves like Ctrl-C while a command runs (main thread only; restored after)."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        with _sigterm_unwinds():
            status = args._run(args)
    except (CliError, OSError, ValueError) as e:
        print(f"rwkv-hf {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"rwkv-hf {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0 if status is None else int(status)


if __name__ == "__main__":
    sys.exit(main())
