"""The converter: every source layout, every bad input, sharding, the round trip, remote-code loading."""

import json
import os
from pathlib import Path

import pytest
import torch

import rwkv_hf  # noqa: F401
from rwkv_hf.convert import CheckpointError, convert_checkpoint, export_checkpoint
from rwkv_hf.convert.layouts import FLA_SKIP, LAYOUTS
from rwkv_hf.testing import make_state_dict, run_without_rwkv_hf

SIZES = dict(n_layer=2, n_embd=64, head_size=32)
TOKENS = torch.tensor([[11, 400, 9000, 65535, 3, 3, 77, 1024, 500, 20000, 1, 2]])


def quiet(*_):
    pass


def our_logits(folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(TOKENS).logits[0]


@pytest.fixture(scope="module")
def blinkdl(tmp_path_factory):
    """Synthetic BlinkDL checkpoints, and the logits of each converted straight from .pth."""
    root = tmp_path_factory.mktemp("ckpts")
    out = {}
    for version in ("4", "5.2", "6", "7"):
        sd = make_state_dict(version, seed=1, **SIZES)
        path = root / f"v{version}.pth"
        torch.save(sd, path)
        folder = root / f"hf-v{version}"
        convert_checkpoint(path, folder, log=quiet)
        out[version] = (sd, path, folder, our_logits(folder))
    return out


def _save_layout(sd, layout, folder: Path, fmt="safetensors"):
    from safetensors.torch import save_file

    theirs = LAYOUTS[layout].from_blinkdl(sd, skip=FLA_SKIP if layout == "fla-rwkv7" else ())
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": layout}))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in theirs.items()}, str(folder / "model.safetensors"))
    else:
        torch.save(theirs, folder / "pytorch_model.bin")
    return folder


@pytest.mark.parametrize(
    "version,layout,fmt",
    [
        ("4", "hf-legacy", "bin"),  # transformers' RWKV-4 / RWKV/rwkv-4-world-* (pytorch_model.bin)
        ("5.2", "hf-legacy", "bin"),  # RWKV/rwkv-5-world-*
        ("6", "hf-legacy", "safetensors"),  # RWKV/v6-Finch-*-HF
        ("7", "fla-rwkv7", "safetensors"),  # fla-hub/rwkv7-*
        ("7", "blinkdl", "safetensors"),  # a BlinkDL-layout .safetensors folder
    ],
)
def test_every_source_layout_gives_the_blinkdl_logits(blinkdl, tmp_path, version, layout, fmt):
    sd, _, _, expected = blinkdl[version]
    src = _save_layout(sd, layout, tmp_path / "src", fmt)
    conv = convert_checkpoint(src, tmp_path / "out", log=quiet)
    assert conv.source.layout == layout
    assert conv.spec.version == version
    assert torch.equal(our_logits(tmp_path / "out"), expected)  # same weights, same code: exactly equal


def test_blinkdl_safetensors_file_and_old_fla_x_x(blinkdl, tmp_path):
    from safetensors.torch import save_file

    sd, _, _, expected = blinkdl["7"]
    save_file(sd, str(tmp_path / "m.safetensors"))
    convert_checkpoint(tmp_path / "m.safetensors", tmp_path / "a", log=quiet)
    assert torch.equal(our_logits(tmp_path / "a"), expected)
    # older fla checkpoints keep the six mixes as one attn.x_x [6, C]
    fla = LAYOUTS["fla-rwkv7"].from_blinkdl(sd, skip=FLA_SKIP)
    for i in range(2):
        p = f"model.layers.{i}.attn."
        fla[p + "x_x"] = torch.cat([fla.pop(p + n).reshape(1, -1) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")])
    save_file(fla, str(tmp_path / "fla.safetensors"))
    convert_checkpoint(tmp_path / "fla.safetensors", tmp_path / "b", log=quiet)
    assert torch.equal(our_logits(tmp_path / "b"), expected)


def test_layout_maps_are_inverse_and_match_transformers_names():
    from transformers import RwkvConfig, RwkvForCausalLM

    sd = make_state_dict("4", **SIZES)
    theirs = LAYOUTS["hf-legacy"].from_blinkdl(sd)
    with torch.device("meta"):
        tf = RwkvForCausalLM(RwkvConfig(vocab_size=65536, hidden_size=64, num_hidden_layers=2, intermediate_size=256))
    assert {k: tuple(v.shape) for k, v in tf.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_transformers_layout_loads_in_transformers_rwkv(blinkdl, tmp_path):
    from transformers import AutoModelForCausalLM, RwkvForCausalLM

    sd, path, _, expected = blinkdl["4"]
    convert_checkpoint(path, tmp_path / "tf", layout="transformers", log=quiet)
    assert not list((tmp_path / "tf").glob("modeling_*.py"))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "tf", dtype=torch.float32).eval()
    assert type(model) is RwkvForCausalLM
    with torch.no_grad():
        theirs = model(TOKENS).logits[0]
    # transformers halves the residual every 6 layers in eval mode (exact in fp32 up to LayerNorm eps)
    assert (theirs - expected).abs().max() <= 1e-4 * expected.abs().max()
    # and the folder converts back to ours, exactly
    convert_checkpoint(tmp_path / "tf", tmp_path / "ours", log=quiet)
    assert torch.equal(our_logits(tmp_path / "ours"), expected)
    with pytest.raises(CheckpointError, match="RWKV-4 only"):
        convert_checkpoint(blinkdl["7"][1], tmp_path / "no", layout="transformers", log=quiet)
    assert not (tmp_path / "no").exists()


def test_written_folder(blinkdl):
    _, _, folder, _ = blinkdl["6"]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["Rwkv6ForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_rwkv6.Rwkv6ForCausalLM"
    assert config["rwkv_version"] == "6" and config["hidden_size"] == 64 and config["mix_lora"] == 32
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [0, 261] and gen["pad_token_id"] == 0  # 261: "\n\n", the chat turn end
    for name in ("tokenizer.json", "tokenizer_config.json", "rwkv_vocab_v20230424.txt", "tokenization_rwkv_world.py",
                 "tokenization_rwkv_world_fast.py", "modeling_rwkv6.py", "rwkv_common.py", "README.md", "model.safetensors"):
        assert (folder / name).is_file(), name
    card = (folder / "README.md").read_text()
    assert "RWKV-6" in card and "v6.pth" in card and "trust_remote_code=True" in card
    assert not [p for p in folder.parent.iterdir() if ".partial-" in p.name]


def test_sharding_and_dtype(blinkdl, tmp_path):
    _, path, _, expected = blinkdl["5.2"]
    convert_checkpoint(path, tmp_path / "s", max_shard_size="1MB", dtype="bf16", log=quiet)
    shards = sorted((tmp_path / "s").glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3  # the 65536-row embedding and head are each over 1MB
    index = json.loads((tmp_path / "s" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "s", dtype="auto")  # 4.57 defaults to fp32
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        got = model(TOKENS).logits[0].float()
    # bf16 weights and activations: a few percent of the logit range
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()


def test_round_trip_is_bit_for_bit(tmp_path):
    for version, dtype in (("5.0", torch.float32), ("7", torch.bfloat16), ("4", torch.float16)):
        sd = make_state_dict(version, dtype=dtype, **SIZES)
        torch.save(sd, tmp_path / f"{version}.pth")
        convert_checkpoint(tmp_path / f"{version}.pth", tmp_path / f"hf{version}", max_shard_size="2MB", log=quiet)
        export_checkpoint(tmp_path / f"hf{version}", tmp_path / f"back{version}.pth", log=quiet)
        back = torch.load(tmp_path / f"back{version}.pth", weights_only=True)
        assert list(back) == list(sd) or set(back) == set(sd)
        for k, v in sd.items():
            assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k


# ------------------------------------------------------------------------------------- bad inputs
def _bad(tmp_path, name, sd=None, raw=None):
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
    else:
        torch.save(sd, path)
    return path


def bad_inputs(tmp_path):
    good = make_state_dict("6", **SIZES)
    torch.save(good, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    missing = dict(good)
    del missing["blocks.1.att.time_faaaa"]
    misshaped = dict(good)
    misshaped["blocks.1.ffn.value.weight"] = torch.zeros(64, 100)
    return {
        "truncated": (_bad(tmp_path, "trunc.pth", raw=data[: len(data) // 2]), "cannot be read"),
        "corrupt": (_bad(tmp_path, "corrupt.pth", raw=b"\x00garbage" * 100), "cannot be read"),
        "corrupt safetensors": (_bad(tmp_path, "c.safetensors", raw=b"\x08\x00\x00\x00\x00\x00\x00\x00{bad}"), "cannot be read"),
        "other model": (_bad(tmp_path, "gpt.pth", {"transformer.wte.weight": torch.zeros(10, 4), "lm_head.weight": torch.zeros(10, 4)}), "not an RWKV checkpoint"),
        "missing tensor": (_bad(tmp_path, "missing.pth", missing), "missing 1 tensor"),
        "mis-shaped": (_bad(tmp_path, "shape.pth", misshaped), "has shape"),
        "not tensors": (_bad(tmp_path, "list.pth", [1, 2, 3]), "not a state dict"),
        "no file": (tmp_path / "nope.pth", "no such file"),
    }


def test_bad_inputs_one_error_and_no_folder(tmp_path):
    for name, (path, message) in bad_inputs(tmp_path).items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        with pytest.raises(CheckpointError, match=message):
            convert_checkpoint(path, out, log=quiet)
        assert not out.exists(), name
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_refuses_non_empty_out_dir_and_crash_leaves_nothing(tmp_path, monkeypatch):
    torch.save(make_state_dict("4", **SIZES), tmp_path / "m.pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        convert_checkpoint(tmp_path / "m.pth", out, log=quiet)
    with pytest.raises(FileExistsError, match="keep.txt"):  # not a folder rwkv-hf wrote: --force refuses it too
        convert_checkpoint(tmp_path / "m.pth", out, force=True, log=quiet)
    assert (out / "keep.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    convert_checkpoint(tmp_path / "m.pth", ours, log=quiet)
    before = sorted(p.name for p in ours.iterdir())
    # a crash (or Ctrl-C) in the middle of writing leaves the old folder and no partial one
    import rwkv_hf.convert.hf_folder as hf_folder

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(hf_folder, "_save_tokenizer", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tmp_path / "m.pth", ours, force=True, log=quiet)
    assert sorted(p.name for p in ours.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "ours", "out"]
    monkeypatch.undo()
    convert_checkpoint(tmp_path / "m.pth", ours, force=True, log=quiet)
    assert sorted(p.name for p in ours.iterdir()) == before


# -------------------------------------------------------------------------------- remote code
REMOTE = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
ids = tok("Hello world", return_tensors="pt")["input_ids"]
with torch.no_grad():
    print(json.dumps({"cls": type(model).__module__, "tok": type(tok).__module__, "ids": ids[0].tolist(),
                      "logits": model(ids).logits[0, -1, :8].tolist()}))
"""


def test_converted_folder_loads_without_rwkv_hf(blinkdl, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, folder, _ = blinkdl["7"]
    proc = run_without_rwkv_hf(REMOTE, [folder], cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "mods"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cls"].startswith("transformers_modules.") and out["tok"].startswith("transformers_modules.")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = tok("Hello world", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == out["ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits[0, -1, :8], torch.tensor(out["logits"]))
