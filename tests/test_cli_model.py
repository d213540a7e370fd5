"""`rwkv-hf convert / export / generate / chat / demo` end to end on CPU, and the chat state."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rwkv_hf  # noqa: F401
from rwkv_hf.cli import main
from rwkv_hf.testing import save_checkpoint

SIZES = dict(n_layer=2, n_embd=64, head_size=32)


@pytest.fixture(scope="module")
def v7(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = save_checkpoint(root / "rwkv7.pth", "7", **SIZES)
    assert main(["convert", str(ckpt), str(root / "hf")]) == 0
    return ckpt, root / "hf"


def test_convert_prints_detection_and_export_round_trips(v7, tmp_path, capsys):
    ckpt, _ = v7
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--dtype", "bf16", "--max-shard-size", "4MB"]) == 0
    out = capsys.readouterr().out
    assert "detected RWKV-7, 2 layers, width 64, 2 heads of 32" in out and "vocab 65536" in out and "parameters" in out
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()
    assert main(["export", str(tmp_path / "out"), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    orig = torch.load(ckpt, weights_only=True)
    assert all(torch.equal(back[k], orig[k].to(torch.bfloat16)) for k in orig)


def test_cli_errors_are_one_line_exit_2(v7, tmp_path, capsys):
    ckpt, folder = v7
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    cases = [
        (["convert", str(tmp_path / "bad.pth"), str(tmp_path / "o1")], "cannot be read"),
        (["convert", str(tmp_path / "missing.pth"), str(tmp_path / "o2")], "no such file"),
        (["convert", str(ckpt), str(folder)], "not empty"),
        (["convert", str(ckpt), str(tmp_path / "o3"), "--layout", "transformers"], "RWKV-4 only"),
        (["convert", str(ckpt), str(tmp_path / "o3"), "--layout", "rwkv-world-hf"], "RWKV-5/RWKV-6 only"),
        (["convert", str(ckpt), str(tmp_path / "o3"), "--layout", "fla"], "head size 64 only"),  # this one has 32
        (["export", str(tmp_path / "empty"), str(tmp_path / "x.pth")], "no weights"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "x.pth"))


def test_installed_script_error_has_no_traceback(tmp_path):
    (tmp_path / "bad.pth").write_bytes(b"\x00" * 64)
    proc = subprocess.run([sys.executable, "-m", "rwkv_hf.cli", "convert", str(tmp_path / "bad.pth"), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()


def test_generate_batch_and_stream(v7, capsys):
    _, folder = v7
    assert main(["generate", str(folder), "Hello", "What is RWKV?", "x", "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert "[0] Hello" in out and "[2] x" in out
    assert main(["generate", str(folder), "Once upon a time", "--raw", "--max-new-tokens", "5", "--seed", "3", "--top-k", "20"]) == 0
    assert capsys.readouterr().out.strip()


def test_batch_generation_equals_single(v7):
    from rwkv_hf.generation_cli import generate_texts, load_model

    tok, model = load_model(str(v7[1]), "cpu")
    prompts = ["Hi", "A much longer prompt that needs left padding", "x"]
    batch = generate_texts(model, tok, prompts, raw=True, temperature=0, max_new_tokens=6)
    assert batch == [generate_texts(model, tok, [p], raw=True, temperature=0, max_new_tokens=6)[0] for p in prompts]


def test_chat_with_kept_state_equals_rereading_history(v7):
    from rwkv_hf.generation_cli import ChatSession, load_model

    tok, model = load_model(str(v7[1]), "cpu")
    kept = ChatSession(model, tok, keep_state=True, temperature=0, max_new_tokens=8)
    fresh = ChatSession(model, tok, keep_state=False, temperature=0, max_new_tokens=8)
    for message in ("Hello there", "Tell me more", "And a third turn"):
        assert kept.say(message) == fresh.say(message)
        assert kept.ids == fresh.ids
    # the kept state read each token once: everything but the last generated token
    assert kept.tokens_read == len(kept.ids) - 1 or kept.tokens_read == len(kept.ids) - len(tok("\n\n")["input_ids"]) - 1


def test_chat_command_reads_piped_turns(v7, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nHow are you?\n"))
    assert main(["chat", str(v7[1]), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("User: ") == 2 and out.count("Assistant:") == 2


def test_demo_end_to_end(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "weights are random" in out and "ALL CHECKS PASSED" in out
    assert "batched generation == one prompt at a time: True" in out
    assert "trust_remote_code (no rwkv_hf) == installed: True" in out
