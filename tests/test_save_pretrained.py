"""`model.save_pretrained(out)` writes a folder as self-contained as a converted one (issue 17 point 4):
it loads with `trust_remote_code=True` in a process where rwkv_hf cannot be imported, whichever way the
model was made (a converted folder, a config, a PEFT merge, remote code itself)."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import rwkv_hf  # noqa: F401
from rwkv_hf import Rwkv5Config, Rwkv5ForCausalLM
from rwkv_hf.convert import convert_checkpoint
from rwkv_hf.testing import make_state_dict, run_without_rwkv_hf

SIZES = dict(n_layer=2, n_embd=64, head_size=32)
TEXT = "Hello world"

# for each argument "FOLDER" or "FOLDER>OUT": load FOLDER without rwkv_hf (with ">OUT": save it to OUT as
# remote code, and load OUT instead); print one JSON line each
REMOTE = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
for arg in sys.argv[1:]:
    folder, _, out = arg.partition(">")
    if out:
        AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).save_pretrained(out)
        folder = out
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    ids = tok(%r, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1, :16].tolist()
    print(json.dumps({"cls": type(model).__module__, "ids": ids[0].tolist(), "logits": logits}))
""" % TEXT


def load_without_rwkv_hf(tmp_path, *folders):
    proc = run_without_rwkv_hf(REMOTE, folders, cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "mods"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(folders):]]


def our_last_logits(model, tokenizer_folder):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_folder)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ids[0].tolist(), model.eval()(ids).logits[0, -1, :16]


def assert_self_contained(out, family):
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_rwkv{family}.Rwkv{family}Config",
        "AutoModel": f"modeling_rwkv{family}.Rwkv{family}Model",
        "AutoModelForCausalLM": f"modeling_rwkv{family}.Rwkv{family}ForCausalLM",
    }
    for name in (f"modeling_rwkv{family}.py", f"configuration_rwkv{family}.py", "rwkv_common.py", "README.md",
                 "tokenizer_config.json", "rwkv_vocab_v20230424.txt", "tokenization_rwkv_world.py"):
        assert (out / name).is_file(), name


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv")
    torch.save(make_state_dict("7", seed=2, **SIZES), root / "v7.pth")
    convert_checkpoint(root / "v7.pth", root / "hf", log=lambda *_: None)
    return root / "hf"


def test_saved_after_from_pretrained_and_peft_merge_loads_without_rwkv_hf(converted, tmp_path):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["receptance", "key"], init_lora_weights=False))
    merged = peft.merge_and_unload()  # random LoRA weights: the merged model differs from the converted one
    models = {"plain": AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32), "merged": merged}
    for name, m in models.items():
        m.save_pretrained(tmp_path / name)
        assert_self_contained(tmp_path / name, 7)
    results = load_without_rwkv_hf(tmp_path, *(tmp_path / name for name in models))
    for (name, m), got in zip(models.items(), results):
        ids, logits = our_last_logits(m, converted)
        assert got["cls"].startswith("transformers_modules.") and got["ids"] == ids
        assert torch.allclose(torch.tensor(got["logits"]), logits, atol=1e-5, rtol=0), name
    assert results[0]["logits"] != results[1]["logits"]  # the merge changed the model, and the save kept it


def test_saved_from_a_config_and_from_remote_code_loads_without_rwkv_hf(converted, tmp_path):
    torch.manual_seed(0)
    model = Rwkv5ForCausalLM(Rwkv5Config(vocab_size=65536, hidden_size=64, num_hidden_layers=2, intermediate_size=224, head_size=32))
    model.save_pretrained(tmp_path / "fresh")
    assert_self_contained(tmp_path / "fresh", 5)
    assert "RWKV-5.2 World model" in (tmp_path / "fresh" / "README.md").read_text()
    ids, logits = our_last_logits(model, converted)
    # and a model running as remote code (no rwkv_hf) saves a folder that loads the same way again
    for got in load_without_rwkv_hf(tmp_path, tmp_path / "fresh", f"{tmp_path / 'fresh'}>{tmp_path / 'again'}"):
        assert got["ids"] == ids and torch.allclose(torch.tensor(got["logits"]), logits, atol=1e-5, rtol=0)
    assert_self_contained(tmp_path / "again", 5)


def test_save_keeps_the_users_tokenizer_and_card(converted, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted, model_max_length=1234)
    tok.save_pretrained(tmp_path / "out")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    (tmp_path / "out" / "README.md").write_text("mine")
    AutoModelForCausalLM.from_pretrained(converted).save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text() == "mine"
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["model_max_length"] == 1234
    assert all((tmp_path / "out" / name).read_bytes() == data for name, data in saved.items())
    assert (tmp_path / "out" / "modeling_rwkv7.py").is_file()
