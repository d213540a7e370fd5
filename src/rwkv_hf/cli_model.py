"""The model subcommands of `rwkv-hf` (convert, export, generate, chat, state, demo), in `cli.COMMANDS` form:
`(name, help, add_arguments(parser), run(args))`. Thin: parse, call the library, print."""

from __future__ import annotations

import sys

from .errors import CliError


def _quiet_transformers():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _interrupted(what: str):
    return CliError(f"interrupted; {what}")


# ---------------------------------------------------------------------------------------- convert
def _convert_arguments(p):
    p.add_argument("src", help="a BlinkDL .pth, a .safetensors file, or a model folder (HF-legacy, transformers RWKV-4, fla RWKV-7, rwkv-hf)")
    p.add_argument("out_dir", help="folder to create")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="weights dtype (default: keep the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into safetensors shards of at most this size (default 5GB)")
    p.add_argument("--layout", choices=["rwkv-hf", "transformers", "fla", "rwkv-world-hf"], default="rwkv-hf",
                   help="rwkv-hf (default; remote code included), transformers (RWKV-4 only: transformers' own RwkvForCausalLM), "
                        "fla (RWKV-7: flash-linear-attention's RWKV7ForCausalLM, llama.cpp) or rwkv-world-hf (RWKV-5.2/6: "
                        "the RWKV/ HF repos' layout, llama.cpp for RWKV-6)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if rwkv-hf wrote it (every entry listed in its rwkv_hf_manifest.json)")


def _convert_run(args):
    from .convert import convert_checkpoint

    try:
        conv = convert_checkpoint(args.src, args.out_dir, dtype=args.dtype, force=args.force,
                                  max_shard_size=args.max_shard_size, layout=args.layout)
    except KeyboardInterrupt:
        raise _interrupted(f"{args.out_dir} was not written") from None
    print(f"done: {conv.out_dir} ({len(conv.files)} weight file{'s' if len(conv.files) > 1 else ''})")
    if args.layout in ("rwkv-hf", "transformers"):
        print(f"try:  rwkv-hf generate {conv.out_dir} \"Tell me about RWKV.\"")


# ----------------------------------------------------------------------------------------- export
def _export_arguments(p):
    p.add_argument("model_dir", help="a converted model folder")
    p.add_argument("out", help="the .pth to write (BlinkDL layout: rwkv package, rwkv.cpp, RWKV-Runner)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def _export_run(args):
    from .convert import export_checkpoint

    try:
        export_checkpoint(args.model_dir, args.out, force=args.force)
    except KeyboardInterrupt:
        raise _interrupted(f"{args.out} was not written") from None


# --------------------------------------------------------------------------------- generate / chat
def _sampling_arguments(p):
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.3, help="default 0.3, as RWKV World chat usually runs")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the folder's own code (for repos not converted by rwkv-hf)")


def _state_argument(p):
    p.add_argument("--state", default=None, metavar="FILE",
                   help="start from this state file (blocks.N.att.time_state: RWKV-PEFT state tuning, rwkv-hf state)")


def _load_with_state(args):
    from .generation_cli import load_model

    tokenizer, model = load_model(args.model, args.device, args.dtype, args.trust_remote_code)
    if args.state:
        model.load_state_file(args.state)
    return tokenizer, model


def _sampling(args) -> dict:

    if args.max_new_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise CliError(f"need --max-new-tokens >= 1, --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0; got "
                       f"{args.max_new_tokens}, {args.temperature}, {args.top_p}, {args.top_k}")
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens)


def _generate_arguments(p):
    p.add_argument("model", help="a converted folder or a Hub repo id")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="one or more prompts (generated as one batch); - reads one from stdin")
    p.add_argument("--prompt-file", action="append", default=[], metavar="FILE",
                   help="read a prompt from FILE (UTF-8, one prompt per file; - is stdin); may be repeated, adds to PROMPTs")
    p.add_argument("--raw", action="store_true", help="plain text continuation instead of the World chat template")
    p.add_argument("--system", default=None, help="a system message (chat template only)")
    _state_argument(p)
    _sampling_arguments(p)


def _read_prompt(source: str) -> str:
    """The text of a prompt file, or of stdin for `-`, without one trailing newline (as `echo` adds)."""

    if source == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(source, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as e:
            raise CliError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def _prompts(args) -> list:

    sources = [("-" if p == "-" else None, p) for p in args.prompts] + [(f, None) for f in args.prompt_file]
    if sum(1 for f, _ in sources if f == "-") > 1:
        raise CliError("stdin (-) can give only one prompt")
    prompts = [_read_prompt(f) if f else p for f, p in sources]
    if not prompts:
        raise CliError("give at least one PROMPT (or --prompt-file FILE, or - for stdin)")
    return prompts


def _generate_run(args):
    from .generation_cli import generate_texts

    prompts = _prompts(args)
    sampling = _sampling(args)
    _quiet_transformers()
    tokenizer, model = _load_with_state(args)
    stream = len(prompts) == 1
    try:
        texts = generate_texts(model, tokenizer, prompts, raw=args.raw, seed=args.seed, stream=stream,
                               system=args.system, **sampling)
    except KeyboardInterrupt:
        print()
        return 130
    if not stream:
        for i, (prompt, text) in enumerate(zip(prompts, texts)):
            print(f"[{i}] {prompt}\n{text}\n")


def _chat_arguments(p):
    p.add_argument("model", help="a converted folder or a Hub repo id")
    p.add_argument("--system", default=None, help="a system message")
    _state_argument(p)
    _sampling_arguments(p)


def _chat_run(args):
    from transformers import set_seed

    from .generation_cli import ChatSession, chat_loop

    sampling = _sampling(args)
    _quiet_transformers()
    tokenizer, model = _load_with_state(args)
    if args.seed is not None:
        set_seed(args.seed)
    session = ChatSession(model, tokenizer, system=args.system, **sampling)
    if sys.stdin.isatty():
        print("(empty line or /exit to leave, /reset to start over; the state is kept between turns)")
    chat_loop(session, read=input if sys.stdin.isatty() else _read_piped, stream=True)


def _read_piped(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    print(prompt + line.rstrip("\n"))
    return line.rstrip("\n")


# ------------------------------------------------------------------------------------------ state
def _state_arguments(p):
    p.add_argument("model", help="a converted folder or a Hub repo id (RWKV-5, -6, -7)")
    p.add_argument("prompt", help="the text to read, as is (no chat template unless --system)")
    p.add_argument("out", help="the state file to write (.pth: blocks.N.att.time_state, as RWKV-PEFT writes them)")
    p.add_argument("--system", action="store_true", help="read PROMPT as a system message in the World chat template")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    _state_argument(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default fp32 on CPU, bf16 on GPU")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the folder's own code")


def _state_run(args):
    from pathlib import Path


    out = Path(args.out)
    if out.exists() and not args.force:  # before loading the model: fail fast
        raise CliError(f"{out} exists (use --force to replace it)")
    if not args.prompt:
        raise CliError("the prompt is empty")
    _quiet_transformers()
    tokenizer, model = _load_with_state(args)
    text = args.prompt
    if args.system:
        text = tokenizer.apply_chat_template([{"role": "system", "content": text}], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    try:
        model.save_state_file(out, input_ids=ids, force=args.force)
    except KeyboardInterrupt:
        raise _interrupted(f"{out} was not written") from None
    print(f"wrote {out}: the state after {len(ids)} tokens, {model.config.num_hidden_layers} layers")


# ------------------------------------------------------------------------------------------- demo
def _demo_arguments(p):
    p.add_argument("ckpt", nargs="?", default=None, help="a real checkpoint to run the same checks on (default: a random RWKV-7)")
    p.add_argument("--no-remote", action="store_true", help="skip the trust_remote_code check")


def _demo_run(args):
    from .demo import format_report, run_demo

    _quiet_transformers()
    report = run_demo(args.ckpt, remote=not args.no_remote)
    print(format_report(report))
    return 0 if report.ok else 1


MODEL_COMMANDS = [
    ("convert", "convert an RWKV checkpoint (BlinkDL .pth/.safetensors or an HF folder in any known layout) to a Hugging Face folder",
     _convert_arguments, _convert_run),
    ("export", "write a converted folder back as a BlinkDL .pth", _export_arguments, _export_run),
    ("generate", "generate from one or more prompts (one batch; streams for a single prompt)", _generate_arguments, _generate_run),
    ("chat", "chat in the terminal, keeping the recurrent state between turns", _chat_arguments, _chat_run),
    ("state", "save the state after a prompt as a state file (prompt caching; loads with --state, RWKV-Runner, ChatRWKV)",
     _state_arguments, _state_run),
    ("demo", "convert, load and check a small random RWKV-7 (or CKPT) end to end, offline", _demo_arguments, _demo_run),
]
