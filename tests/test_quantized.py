"""Quantized loading (issue 13): bitsandbytes' 8-bit and 4-bit layers load through transformers'
`BitsAndBytesConfig`, generate, and keep every decode step in the modules (a step that reads the
weights directly, or a captured graph, cannot read a quantized layer). bitsandbytes runs on the CPU
here; on CUDA the same layers take the same path."""

from __future__ import annotations

import pytest
import torch

import rwkv_hf  # noqa: F401
from rwkv_hf.convert import convert_checkpoint
from rwkv_hf.modeling import rwkv_decode
from rwkv_hf.modeling.rwkv_paths import pick_path, plain_modules
from rwkv_hf.testing import make_state_dict

bnb = pytest.importorskip("bitsandbytes", reason="pyproject's test extra installs bitsandbytes")  # noqa: F841
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
CONFIGS = {
    "8bit": (BitsAndBytesConfig(load_in_8bit=True), "Linear8bitLt", 1),
    "4bit": (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), "Linear4bit", 0.5),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = {}
    for version in ("6", "7"):
        tmp = tmp_path_factory.mktemp(f"q{version}")
        # blocks wide enough that their weights outweigh the embedding and head (which stay as they are)
        torch.save(make_state_dict(version, n_layer=2, n_embd=256, vocab_size=1024, seed=3), tmp / "m.pth")
        convert_checkpoint(tmp / "m.pth", tmp / "hf")
        out[version] = tmp / "hf"
    return out


def _block_linear_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".blocks." in n and n.endswith(".weight")
               and p.dim() == 2 and "emb" not in n)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("version", ["6", "7"])
def test_bitsandbytes_loads_generates_and_steps_aside(version, kind, folders, monkeypatch):
    config, layer_name, bytes_per_weight = CONFIGS[kind]
    ref = AutoModelForCausalLM.from_pretrained(folders[version])
    model = AutoModelForCausalLM.from_pretrained(folders[version], quantization_config=config, device_map="cpu")
    kinds = {type(m).__name__ for m in model.model.blocks.modules()}
    assert layer_name in kinds and "Linear" not in kinds, kinds
    # the fp32 parameters of v6 (decay, bonus, ln_x) stay fp32
    if version == "6":
        assert model.model.blocks[0].att.time_decay.dtype == torch.float32
    # the block projections take 1 byte (8-bit) or half a byte (4-bit) per weight, against fp32's 4
    quantized = sum(m.weight.numel() for m in model.model.blocks.modules() if type(m).__name__ == layer_name)
    print(f"\nv{version} {kind}: block weights {_block_linear_bytes(ref) / 2**20:.2f} MiB fp32, "
          f"footprint {ref.get_memory_footprint() / 2**20:.2f} -> {model.get_memory_footprint() / 2**20:.2f} MiB")
    assert model.get_memory_footprint() <= ref.get_memory_footprint() - quantized * (4 - bytes_per_weight) * 0.9

    assert not plain_modules(model)
    assert pick_path(model, "cpu", 1, step=True, batch=1).runner == "modules"
    monkeypatch.setattr(rwkv_decode, "model_step", lambda *a, **k: pytest.fail("a decode step read quantized weights"))
    with torch.no_grad():
        a, b = ref(IDS).logits, model(IDS).logits
        out = model.generate(IDS, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, IDS.shape[1] + 6)
    assert torch.isfinite(b).all()
    err_fp32 = float((b - a).abs().max() / a.abs().max())
    print(f"v{version} {kind}: logits against fp32's {err_fp32:.3g} of max|logit| (random weights)")
    if kind == "8bit":
        # the judge of what the 8-bit layers compute: bitsandbytes' own dequantization, through
        # transformers' `dequantize()`, which puts back plain nn.Linear layers with those weights.
        # (LLM.int8 also rounds the activations to int8.) Not for 4-bit: on the CPU bitsandbytes'
        # `dequantize_4bit` (what dequantize() uses) returns weights 1.44 (relative norm) away from the
        # originals, while each Linear4bit layer computes within 12% of its fp32 layer (nf4's rounding of
        # these random weights; through the layers the logits end 0.4-0.5 of max|logit| from fp32's).
        model.dequantize()
        assert plain_modules(model)
        with torch.no_grad():
            c = model(IDS).logits
        err = float((b - c).abs().max() / c.abs().max())
        print(f"v{version} {kind}: logits against the dequantized weights' {err:.2e} of max|logit|")
        assert err < 5e-2


def test_a_weight_swapped_for_a_tensor_subclass_steps_aside(folders):
    """A weight replaced after the first decode-step check (as torchao's quantize_ does, with a tensor
    subclass) is seen: the parameter registration makes the next check walk the model again."""

    class Wrapped(torch.Tensor):
        pass

    model = AutoModelForCausalLM.from_pretrained(folders["7"])
    assert plain_modules(model)
    lin = model.model.blocks[0].att.key
    lin.weight = torch.nn.Parameter(lin.weight.detach().as_subclass(Wrapped), requires_grad=False)
    assert not plain_modules(model)
