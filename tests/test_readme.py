"""The README's code runs as written: its Python blocks (in order, one namespace, as a reader pastes
them), its shell commands (they parse; the extras and subcommands they name exist) and its command-line
summary (every subcommand and option it lists is one the parser takes)."""

import contextlib
import io
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from rwkv_hf.convert import convert_checkpoint
from rwkv_hf.testing import make_state_dict

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def blocks(language: str) -> list:
    """The fenced blocks of the README with this info string ("" for plain fences)."""
    found, info, lines = [], None, []
    for line in README.splitlines():
        if line.startswith("```"):
            if info is None:  # an opening fence
                info, lines = line[3:].strip(), []
            else:
                if info == language:
                    found.append("\n".join(lines) + "\n")
                info = None
        elif info is not None:
            lines.append(line)
    return found


def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    code = blocks("python")
    assert len(code) >= 4  # the main example, the pipeline chat, the slow tokenizer, PEFT
    sd = make_state_dict("7", n_layer=2, n_embd=64, head_size=32, seed=3)
    torch.save(sd, tmp_path / "rwkv7.pth")
    monkeypatch.chdir(tmp_path)
    convert_checkpoint(tmp_path / "rwkv7.pth", Path("my-rwkv7-hf"), log=lambda *a: None)
    namespace = {"__name__": "__readme__"}
    for i, block in enumerate(code):
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"README python block {i + 1} raised {type(e).__name__}: {e}\n{block}")
    # what the blocks say they do
    assert type(namespace["slow"]).__name__ == "RwkvWorldTokenizer"
    assert type(namespace["tok"]).__name__ == "RwkvWorldTokenizerFast"
    assert isinstance(namespace["reply"], str)
    assert any("lora_A" in name for name, _ in namespace["lora"].named_parameters())


def test_shell_commands_parse_and_name_what_exists():
    from rwkv_hf.cli import build_parser

    lines = [line for block in blocks("bash") for line in block.strip().splitlines()]
    assert len(lines) >= 2
    extras = set(re.findall(r"^(\w+) = \[", (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1].split("\n[")[0], flags=re.M))
    parser = build_parser()
    for line in lines:
        subprocess.run(["bash", "-n", "-c", line], check=True)  # bash parses it
        for extra in re.findall(r"\.\[(\w+)\]", line):
            assert extra in extras, f"README installs the extra {extra!r}, which pyproject.toml does not define"
        for command in line.split("&&"):
            argv = shlex.split(command)
            if argv and argv[0] == "rwkv-hf":
                parser.parse_args(argv[1:])  # exits (SystemExit) on an unknown subcommand or option


# placeholder values for the summary's upper-case argument names that must parse as numbers
NUMBERS = {"N": "1", "T": "0.5", "P": "0.5", "B": "1"}


def test_command_line_summary_matches_the_parser():
    from rwkv_hf.cli import build_parser

    (summary,) = [b for b in blocks("") if b.lstrip().startswith("rwkv-hf ")]
    parser = build_parser()
    checked = 0
    for line in summary.strip().splitlines():
        usage = line.split("#")[0]
        argv = [a for a in shlex.split(usage.replace("[", " ").replace("]", " ")) if a != "..."]
        assert argv[0] == "rwkv-hf"
        argv = [NUMBERS.get(a, a) for a in argv[1:]]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"the README's command line {line.strip()!r} does not parse: rwkv-hf {' '.join(argv)}")
        checked += 1
    assert checked >= 8
