"""Issue 12: the converter and the CLI under hostile (or careless) use.

Every case ends in one of two ways: it works, or one line on stderr and exit status 2, with nothing
the user owns deleted and no partial output left. The classes, in order: what `--force` and the final
move may touch; killed runs and the umask; the key set checked before anything is built; config.json
that does not fit its weights; silent wrong weights (warnings); the tracebacks; prompts from files.
"""

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import rwkv_hf  # noqa: F401
from rwkv_hf.cli import main
from rwkv_hf.convert import CheckpointError, convert_checkpoint
from rwkv_hf.safe_write import MANIFEST
from rwkv_hf.testing import make_state_dict

SIZES = dict(n_layer=2, n_embd=64, head_size=32)
SMALL = dict(SIZES, vocab_size=1024)  # converter-only cases: a small embedding writes fast
SRC = str(Path(__file__).resolve().parents[1] / "src")


def quiet(*_):
    pass


def cli(capsys, *argv):
    """(status, stdout, stderr) of `rwkv-hf ARGV` run in-process; a failure must be one line, no traceback."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    if status == 2:
        assert err.count("\n") == 1 and "Traceback" not in err, err
    return status, out, err


def leftovers(folder: Path):
    return sorted(p.name for p in Path(folder).iterdir() if ".partial-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    torch.save(make_state_dict("7", **SMALL), root / "small.pth")
    torch.save(make_state_dict("7", **SIZES), root / "full.pth")
    assert convert_checkpoint(root / "full.pth", root / "hf", log=quiet)
    return root


# ------------------------------------------------------------------ what --force may replace
def test_force_never_touches_the_cwd_the_source_or_their_parents(ckpt, tmp_path, capsys, monkeypatch):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    shutil.copy(ckpt / "small.pth", d / "m.pth")
    shutil.copy(ckpt / "small.pth", d / "sub" / "orig.pth")
    (d / "notes.txt").write_text("mine")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    monkeypatch.chdir(d)
    for argv in (["m.pth", "."], ["sub/orig.pth", "sub"], ["sub/orig.pth", "."], ["m.pth", ".."], [d / "m.pth", d]):
        status, _, err = cli(capsys, "convert", *argv, "--force")
        assert status == 2 and ("current folder" in err or "the source" in err), (argv, err)
    monkeypatch.chdir(tmp_path)
    status, _, err = cli(capsys, "convert", "d/sub/orig.pth", "d", "--force")  # the source's grandparent
    assert status == 2 and "the source" in err, err
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert (d / "notes.txt").read_text() == "mine"


def test_force_replaces_only_a_folder_rwkv_hf_wrote(ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, "convert", ckpt / "small.pth", out)[0] == 0
    listed = json.loads((out / MANIFEST).read_text())["files"]
    assert sorted(listed + [MANIFEST]) == sorted(p.name for p in out.iterdir())
    (out / "notes.txt").write_text("mine")
    status, _, err = cli(capsys, "convert", ckpt / "small.pth", out, "--force")
    assert status == 2 and "notes.txt" in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    assert cli(capsys, "convert", ckpt / "small.pth", out, "--force")[0] == 0
    # a folder without our manifest (another tool's, or the user's) is never replaced
    (out / MANIFEST).unlink()
    status, _, err = cli(capsys, "convert", ckpt / "small.pth", out, "--force")
    assert status == 2 and MANIFEST in err and (out / "config.json").exists()
    # the same rules for the tokenizer folder and the export
    tok = tmp_path / "tok"
    assert cli(capsys, "tokenizer", tok)[0] == 0
    (tok / "mine.json").write_text("{}")
    assert cli(capsys, "tokenizer", tok, "--force")[0] == 2 and (tok / "mine.json").exists()
    status, _, err = cli(capsys, "export", ckpt / "hf", ckpt / "hf" / "model.safetensors", "--force")
    assert status == 2 and "weights" in err
    assert leftovers(tmp_path) == [] and leftovers(ckpt) == []


def test_out_dir_appearing_meanwhile_is_kept_and_the_run_fails(ckpt, tmp_path, capsys, monkeypatch):
    import rwkv_hf.convert.hf_folder as hf_folder

    save = hf_folder._save_tokenizer
    out = tmp_path / "out"

    def user_creates_it(folder):
        out.mkdir()
        (out / "mine.txt").write_text("mine")
        save(folder)

    monkeypatch.setattr(hf_folder, "_save_tokenizer", user_creates_it)
    status, _, err = cli(capsys, "convert", ckpt / "small.pth", out)
    assert status == 2 and "appeared" in err
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and leftovers(tmp_path) == []
    shutil.rmtree(out)

    # two converts to one OUT_DIR: the second finishes while the first writes; the first exits 2
    def second_run_finishes_first(folder):
        monkeypatch.setattr(hf_folder, "_save_tokenizer", save)
        convert_checkpoint(ckpt / "small.pth", out, log=quiet)
        save(folder)

    monkeypatch.setattr(hf_folder, "_save_tokenizer", second_run_finishes_first)
    status, _, err = cli(capsys, "convert", ckpt / "small.pth", out, "--dtype", "bf16")
    assert status == 2 and "appeared" in err
    assert json.loads((out / "config.json").read_text()).get("dtype", json.loads((out / "config.json").read_text()).get("torch_dtype")) == "float32"
    assert (out / MANIFEST).exists() and leftovers(tmp_path) == []


# ----------------------------------------------------------------- killed runs and the umask
_SLOW_CONVERT = r"""
import sys, time
from pathlib import Path
import rwkv_hf.convert.hf_folder as hf_folder
def stall(folder):
    Path(sys.argv[3]).write_text("writing")
    time.sleep(120)
hf_folder._save_tokenizer = stall
from rwkv_hf.cli import main
sys.exit(main(["convert", sys.argv[1], sys.argv[2]]))
"""


def _subprocess_env():
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")


def test_sigterm_during_convert_leaves_no_partial_output(ckpt, tmp_path):
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(ckpt / "small.pth"), str(tmp_path / "out"), str(ready)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_subprocess_env())
    deadline = time.time() + 120
    while not ready.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert ready.exists(), proc.communicate()[1][-2000:]
    assert leftovers(tmp_path)  # the temporary folder is there while it writes
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "interrupted" in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready"]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_runs_are_removed_or_reported(ckpt, tmp_path):
    host = socket.gethostname().replace("-", "_")
    killed = tmp_path / f".out.partial-{host}-{_dead_pid()}-abc123"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 1000)
    unknown = tmp_path / ".out.partial-xyz789"  # no owner in its name (an older rwkv-hf): reported only
    unknown.mkdir()
    lines = []
    convert_checkpoint(ckpt / "small.pth", tmp_path / "out", log=lines.append)
    assert not killed.exists() and any("removed" in l and killed.name in l for l in lines), lines
    assert unknown.exists() and any("leftover" in l and unknown.name in l for l in lines), lines
    # killed between moving the old output aside and the new one in: the old one is put back first
    aside = tmp_path / f".out.old-{host}-{_dead_pid()}-def456"
    aside.mkdir()
    (tmp_path / "out").rename(aside / "old")
    lines.clear()
    convert_checkpoint(ckpt / "small.pth", tmp_path / "out", force=True, log=lines.append)
    assert any("put back" in l for l in lines) and not aside.exists() and (tmp_path / "out" / MANIFEST).exists(), lines


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_honour_the_umask(ckpt, tmp_path, capsys, umask):
    old = os.umask(umask)
    try:
        assert cli(capsys, "convert", ckpt / "small.pth", tmp_path / "out")[0] == 0
        assert cli(capsys, "export", tmp_path / "out", tmp_path / "back.pth")[0] == 0
        assert cli(capsys, "tokenizer", tmp_path / "tok")[0] == 0
    finally:
        os.umask(old)
    for folder in ("out", "tok"):
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o777 & ~umask
        assert (tmp_path / folder / "tokenizer.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "back.pth").stat().st_mode & 0o777 == 0o666 & ~umask


# ------------------------------------------------------------ the key set, before allocating
def test_forged_or_missing_blocks_are_named_before_any_model_is_built(ckpt, tmp_path):
    sd = make_state_dict("7", **SMALL)
    forged = dict(sd)
    forged["blocks.20000.att.key.weight"] = torch.zeros(64, 64)
    torch.save(forged, tmp_path / "forged.pth")
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=r"block 2 is missing but blocks\.20000\.att\.key\.weight"):
        convert_checkpoint(tmp_path / "forged.pth", tmp_path / "o1", log=quiet)
    assert time.perf_counter() - t0 < 10
    gap = {k.replace("blocks.1.", "blocks.2."): v for k, v in sd.items()}
    torch.save(gap, tmp_path / "gap.pth")
    with pytest.raises(CheckpointError, match=r"block 1 is missing but blocks\.2\."):
        convert_checkpoint(tmp_path / "gap.pth", tmp_path / "o2", log=quiet)
    unknown = dict(sd, **{"blocks.1.att.bogus": torch.zeros(3)})
    torch.save(unknown, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*blocks\.1\.att\.bogus"):
        convert_checkpoint(tmp_path / "unknown.pth", tmp_path / "o3", log=quiet)
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_expected_key_set_does_not_build_a_model_per_layer(monkeypatch):
    """A complete 64-layer checkpoint is validated against a 2-layer meta model."""
    from rwkv_hf.convert import build_hf_state_dict
    from rwkv_hf.modeling import FAMILIES

    built = []
    cls = FAMILIES[7][2]
    real_init = cls.__init__

    def spy(self, config, *a, **k):
        built.append(config.num_hidden_layers)
        real_init(self, config, *a, **k)

    monkeypatch.setattr(cls, "__init__", spy)
    sd = make_state_dict("7", n_layer=64, n_embd=32, head_size=16, vocab_size=16)
    spec, config, hf = build_hf_state_dict(sd)
    assert config.num_hidden_layers == 64 and len(hf) == len(sd) and built == [2]


# --------------------------------------------------------- config.json that does not fit its weights
@pytest.mark.parametrize("change", [{"num_hidden_layers": 1}, {"num_hidden_layers": 3}, {"hidden_size": 128},
                                    {"num_hidden_layers": 10**7}, {"hidden_size": 10**6}, {"intermediate_size": 10**7}])
def test_config_not_matching_weights_is_refused(ckpt, tmp_path, capsys, change):
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "edited"
    shutil.copytree(ckpt / "hf", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    t0 = time.perf_counter()
    status, _, err = cli(capsys, "generate", folder, "hi", "--max-new-tokens", "2", "--device", "cpu")
    assert status == 2 and ("does not match" in err or "do not match" in err), err
    assert time.perf_counter() - t0 < 60
    if max(change.values()) < 10**6:  # from_pretrained itself (no CLI pre-check) refuses too
        with pytest.raises(ValueError, match=r"do not match config.json: \d+ (missing|unexpected|of another shape) \(.*model\.blocks\.\d"):
            AutoModelForCausalLM.from_pretrained(folder)


def test_matching_folder_loads_and_loading_info_is_still_available(ckpt):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(ckpt / "hf", output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(AutoModelForCausalLM.from_pretrained(ckpt / "hf")).__name__ == "Rwkv7ForCausalLM"


# ---------------------------------------------------------------------- silent wrong weights
def test_nan_inf_fp16_overflow_and_vocab_size_are_warned_by_name(tmp_path, capsys):
    sd = make_state_dict("7", **SMALL)
    sd["blocks.1.att.key.weight"][0, 0] = float("nan")
    sd["blocks.0.ffn.value.weight"][3, 1] = float("inf")
    sd["blocks.1.ffn.key.weight"][2, 2] = 1e6  # beyond fp16's 65504
    torch.save(sd, tmp_path / "m.pth")
    status, out, _ = cli(capsys, "convert", tmp_path / "m.pth", tmp_path / "o", "--dtype", "fp16")
    assert status == 0
    warnings = [l for l in out.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 3, out
    assert "NaN or Inf" in warnings[0] and "blocks.0.ffn.value.weight" in warnings[0] and "blocks.1.att.key.weight" in warnings[0]
    assert "fp16" in warnings[1] and "blocks.1.ffn.key.weight" in warnings[1] and "blocks.1.att.key" not in warnings[1]
    assert "1024 rows" in warnings[2] and "65536" in warnings[2]
    clean = make_state_dict("7", **SIZES)
    torch.save(clean, tmp_path / "clean.pth")
    status, out, _ = cli(capsys, "convert", tmp_path / "clean.pth", tmp_path / "o2", "--dtype", "fp16")
    assert status == 0 and "warning" not in out


# ----------------------------------------------------------------- tracebacks -> one line, exit 2
def _fixtures(ckpt, tmp_path):
    sd = make_state_dict("7", **SMALL)
    torch.save({**sd, 5: torch.zeros(1)}, tmp_path / "intkey.pth")
    trunc = tmp_path / "trunc"
    shutil.copytree(ckpt / "hf", trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    badtok = tmp_path / "badtok"
    shutil.copytree(ckpt / "hf", badtok)
    (badtok / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (tmp_path / "null.jsonl").write_text('{"text": null}\n')
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint" * 10)
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.txt").write_text("some text to score")


CASES = {
    "non-string key": (["convert", "{t}/intkey.pth", "{t}/o"], "not a string"),
    "--device bogus": (["generate", "{c}/hf", "hi", "--device", "bogus"], "unknown device 'bogus'"),
    "--device cuda:99": (["generate", "{c}/hf", "hi", "--device", "cuda:99"], "cuda:99"),
    "truncated safetensors": (["generate", "{t}/trunc", "hi", "--device", "cpu"], "truncated safetensors"),
    "wrong tokenizer.json": (["generate", "{t}/badtok", "hi", "--device", "cpu"], "tokenizer"),
    "null LAMBADA text": (["lambada", "{c}/hf", "--data", "{t}/null.jsonl", "--no-progress"], "must be a string"),
    "bad --reference": (["lambada", "{c}/hf", "--reference", "{t}/bad.pth", "--no-progress", "--limit", "1"], "cannot be read"),
    "bad ppl --reference": (["ppl", "{c}/hf", "{t}/text.txt", "--reference", "{t}/bad.pth", "--no-progress"], "cannot be read"),
    "lambada --device bogus": (["lambada", "{c}/hf", "--device", "bogus", "--limit", "1"], "unknown device"),
    "empty --raw prompt": (["generate", "{c}/hf", "", "--raw", "--device", "cpu"], "empty prompt"),
    "empty folder": (["generate", "{t}/empty", "hi", "--device", "cpu"], "no config.json"),
    "empty folder, lambada": (["lambada", "{t}/empty", "--limit", "1"], "no config.json"),
    "no such folder": (["generate", "./{t}/nope", "hi", "--device", "cpu"], "no such folder"),
    "top-p out of range": (["generate", "{c}/hf", "hi", "--top-p", "2"], "top-p"),
    "no prompt": (["generate", "{c}/hf"], "at least one PROMPT"),
    "missing prompt file": (["generate", "{c}/hf", "--prompt-file", "{t}/none.txt"], "No such file"),
}


def test_bad_input_is_one_line_and_exit_2(ckpt, tmp_path, capsys):
    _fixtures(ckpt, tmp_path)
    for name, (argv, message) in CASES.items():
        if "cuda" in name and torch.cuda.device_count() > 99:
            continue
        argv = [a.format(c=ckpt, t=tmp_path) for a in argv]
        status, _, err = cli(capsys, *argv)
        assert status == 2 and message in err, (name, err)
    assert not (tmp_path / "o").exists() and leftovers(tmp_path) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_is_one_line(ckpt, capsys):
    status, _, err = cli(capsys, "generate", ckpt / "hf", "hi", "--device", "cuda")
    assert status == 2 and "not available" in err


def test_hub_id_without_network_fails_at_once(capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    t0 = time.perf_counter()
    status, _, err = cli(capsys, "generate", "RWKV/not-cached-here", "hi", "--device", "cpu")
    assert status == 2 and "cannot be reached" in err and time.perf_counter() - t0 < 5, err


def test_tied_tensors_convert_as_separate_copies(tmp_path, capsys):
    sd = make_state_dict("7", **SMALL)
    sd["head.weight"] = sd["emb.weight"]  # one tensor under two names
    sd["blocks.1.att.x_r"] = sd["blocks.0.att.x_r"]
    torch.save(sd, tmp_path / "tied.pth")
    assert cli(capsys, "convert", tmp_path / "tied.pth", tmp_path / "o")[0] == 0
    assert cli(capsys, "export", tmp_path / "o", tmp_path / "back.pth")[0] == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert all(torch.equal(back[k], v) for k, v in sd.items())


_FULL_DISK = r"""
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from rwkv_hf.cli import main
print(json.dumps([main(argv) for argv in json.loads(sys.argv[2])]))
"""


def test_disk_full_during_convert_and_export(ckpt, tmp_path):
    """The writes fail for real (RLIMIT_FSIZE: the kernel refuses them, as a full disk would) in
    safetensors' Rust writer and in torch.save's zip writer."""
    runs = [["convert", str(ckpt / "full.pth"), str(tmp_path / "out")], ["export", str(ckpt / "hf"), str(tmp_path / "back.pth")]]
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(2 * 2**20), json.dumps(runs)],
                          capture_output=True, text=True, env=_subprocess_env(), timeout=300)
    assert json.loads(proc.stdout.splitlines()[-1]) == [2, 2], proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 2 and all("failed" in l for l in lines) and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("rwkv-hf convert: error: writing model.safetensors") and lines[1].startswith("rwkv-hf export: error: writing back.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ------------------------------------------------------------------- prompts from files / stdin
def test_prompts_from_a_file_and_stdin(ckpt, tmp_path, capsys, monkeypatch):
    """A 600 KB prompt (past the 128 KiB a single argv string may hold) reaches generation whole;
    the generation itself is run on a short file (600 KB end to end: test_600kb_prompt_end_to_end)."""
    import io

    import rwkv_hf.generation_cli as generation_cli

    big = tmp_path / "big.txt"
    text = ("The quick brown fox jumps over the lazy dog. 😀\n" * 12500)[:600_000]
    big.write_text(text + "\n", encoding="utf-8")
    seen = []
    real = generation_cli.generate_texts
    monkeypatch.setattr(generation_cli, "generate_texts", lambda m, t, prompts, **k: seen.extend(prompts) or [""] * len(prompts))
    assert cli(capsys, "generate", ckpt / "hf", "--prompt-file", big, "--raw", "--device", "cpu")[0] == 0
    assert seen == [text]  # one trailing newline dropped, nothing else
    monkeypatch.setattr(generation_cli, "generate_texts", real)
    (tmp_path / "short.txt").write_text("Once upon a time\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello from stdin\n"))
    status, out, _ = cli(capsys, "generate", ckpt / "hf", "-", "a second prompt", "--prompt-file", tmp_path / "short.txt",
                         "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu")
    assert status == 0 and "[0] Hello from stdin\n" in out and "[1] a second prompt\n" in out and "[2] Once upon a time\n" in out
    status, _, err = cli(capsys, "generate", ckpt / "hf", "-", "--prompt-file", "-")
    assert status == 2 and "only one prompt" in err


def test_600kb_prompt_end_to_end(ckpt, tmp_path, capsys):
    """600 KB of prompt through the whole generate path. Mostly runs of spaces (the World vocabulary
    has 128-space tokens: about 8k tokens), so the CPU prefill takes seconds, not minutes."""
    big = tmp_path / "big.txt"
    big.write_text((("The quick brown fox jumps over the lazy dog." + " " * 2000) * 300)[:600_000])
    status, out, _ = cli(capsys, "generate", ckpt / "hf", "--prompt-file", big, "--raw", "--max-new-tokens", "3",
                         "--temperature", "0", "--device", "cpu")
    assert status == 0 and out.strip()
