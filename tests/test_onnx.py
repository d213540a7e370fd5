"""ONNX export of every version, run with onnxruntime and compared with the PyTorch model (fp32).

While exporting, the WKV runs as the plain recurrence with its time loop in the graph (torch.export:
torch's scan -> ONNX Scan; TorchScript: a scripted loop -> ONNX Loop), so one graph takes any batch
and length. Each graph is recorded with an all-ones mask and run with padding on the left and a hole
in the middle, and at other batch sizes and lengths than the example's (T = 1 included): a graph that
baked in the example (an unrolled loop, a mask dropped because the example had no padding) fails.
Cost (2 busy cores): the default exporter (torch.export + onnxscript) 9-21 s a model, TorchScript 2-6 s;
~130 s for the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnxruntime as ort  # (pyproject's `test` extra: missing, these tests fail rather than skip)
import pytest
import torch

import rwkv_hf  # noqa: F401
from rwkv_hf.convert import convert_checkpoint
from rwkv_hf.convert.blinkdl import config_from_state_dict, to_hf_key
from rwkv_hf.export import OnnxLM, export_onnx
from rwkv_hf.modeling import FAMILIES
from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD
from rwkv_hf.testing import make_state_dict

VERSIONS = ["4", "5.2", "6", "7"]
VOCAB = 256
TOL = 1e-5  # max |onnx - torch| / max |logit|, over real positions; fp32 round-off is ~1e-6


def build(version: str, n_layer: int = 2):
    sd = make_state_dict(version, n_layer=n_layer, n_embd=64, vocab_size=VOCAB, seed=3)
    spec, cfg = config_from_state_dict(sd)
    model = FAMILIES[spec.family][2](cfg).eval()
    model.load_state_dict({to_hf_key(k): v for k, v in sd.items()})
    return model


def padded(batch: int, length: int, seed: int):
    """Ids and a mask with left padding in row 0 and a hole in row 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if batch > 1 and length > 4:
        mask[0, :3] = 0
        mask[1, length // 2] = 0
    return ids, mask


def rel_err(onnx_logits, torch_logits, mask) -> float:
    diff = (torch.as_tensor(onnx_logits) - torch_logits).abs().amax(-1) * mask
    return float(diff.max() / torch_logits.abs().max())


@pytest.mark.parametrize("version", VERSIONS)
def test_default_exporter_on_the_causal_lm_itself(version, tmp_path):
    """What a user writes: torch.onnx.export (torch.export) of the *ForCausalLM, with gradients on."""
    model = build(version)
    model.config.use_cache = False
    ids, mask = padded(2, 6, seed=0)
    path = tmp_path / "model.onnx"
    dims = {0: "batch", 1: "length"}
    torch.onnx.export(model, (ids, torch.ones_like(mask)), path, input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_shapes=(dims, dims))
    session = ort.InferenceSession(str(path))
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch, length in [(3, 11), (1, 1), (2, 2)]:
        ids, mask = padded(batch, length, seed=batch * length)
        (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).logits
        assert rel_err(logits, ref, mask) <= TOL, (version, batch, length)


def _check_prompt_then_steps(model, path, tol=TOL):
    """A left-padded prompt of 5, then steps of 1, 1 and 2 tokens, each from the state the last returned,
    against the model on the whole sequence; and the final state against the model's."""
    session = ort.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    ids, mask = padded(2, 9, seed=1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    lm = OnnxLM(model, with_state=True)
    state = [s.numpy() for s in lm.zero_state(2)]
    parts = []
    for a, b in [(0, 5), (5, 6), (6, 7), (7, 9)]:
        logits, *state = session.run(None, dict(zip(names, [ids[:, a:b].numpy(), mask[:, a:b].numpy(), *state])))
        parts.append(logits)
    assert rel_err(np.concatenate(parts, 1), out.logits, mask) <= tol
    expected = lm.state_tensors(getattr(out, CACHE_FIELD))
    assert len(state) == len(expected) == len(names) - 2
    for got, want in zip(state, expected):
        assert np.abs(got - want.numpy()).max() <= tol * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("version", VERSIONS)
def test_torchscript_exporter_logits_and_state(version, tmp_path):
    model = build(version)
    export_onnx(model, tmp_path / "lm.onnx", dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "lm.onnx"))
    for batch, length in [(3, 11), (1, 1)]:
        ids, mask = padded(batch, length, seed=7)
        (logits,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        with torch.no_grad():
            assert rel_err(logits, model(ids, attention_mask=mask).logits, mask) <= TOL, (version, batch, length)
    export_onnx(model, tmp_path / "step.onnx", with_state=True, dynamo=False)
    _check_prompt_then_steps(model, tmp_path / "step.onnx")


@pytest.mark.parametrize("version", ["4", "7"])  # v4: the (aa, bb, pp) state; v7: the most involved step
def test_default_exporter_with_state(version, tmp_path):
    model = build(version)
    export_onnx(model, tmp_path / "step.onnx", with_state=True)
    _check_prompt_then_steps(model, tmp_path / "step.onnx")


def test_normal_paths_are_untouched_outside_export():
    """The export choice only happens while exporting: eager 'auto' still takes the chunked prefill."""
    from rwkv_hf.modeling.rwkv_helpers import exporting
    from rwkv_hf.modeling.rwkv_paths import pick_path

    model = build("7")
    assert not exporting()
    assert pick_path(model, "cpu", 8).wkv == "chunk" and pick_path(model, "cpu", 8, "chunk").wkv == "chunk"


def test_readme_onnx_example_runs(tmp_path, monkeypatch):
    """The README's ONNX code block, as written, in a folder holding a converted tiny RWKV-7."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## ONNX", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    sd = make_state_dict("7", n_layer=1, n_embd=64, seed=5)
    torch.save(sd, tmp_path / "tiny.pth")
    convert_checkpoint(tmp_path / "tiny.pth", tmp_path / "my-rwkv7-hf", log=lambda *_: None)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md (ONNX)", "exec"), scope)
    assert scope["logits"].shape[:2] == (2, 1) and len(scope["state"]) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dynamo", [True, False])
def test_export_from_cuda_avoids_fla_and_cuda_graphs(dynamo, tmp_path):
    """A model on CUDA (where 'auto' would take fla's kernels and the captured decode graph) exports the
    plain recurrence, stays on CUDA, and the graph runs on onnxruntime's CPU provider. (torch 2.11's
    torch.export wrote a wrong state graph, on CUDA and on the CPU alike: export_onnx refuses it.)"""
    model = build("7").cuda()
    try:
        export_onnx(model, tmp_path / "step.onnx", with_state=True, dynamo=dynamo)
    except RuntimeError as e:  # refused, never a wrong file (torch 2.11's torch.export)
        assert "differs from the model's" in str(e)
        pytest.skip(f"this torch's exporter wrote a wrong graph and export_onnx refused it: {e}")
    assert next(model.parameters()).is_cuda
    _check_prompt_then_steps(model.cpu(), tmp_path / "step.onnx")


def test_a_graph_that_differs_from_the_model_is_refused(tmp_path):
    """export_onnx runs what it wrote against the model: a graph that computes something else (here: the
    model changed after the export) is an error, not a file."""
    from rwkv_hf.export import OnnxLM, _check_graph

    model = build("7")
    path = export_onnx(model, tmp_path / "step.onnx", with_state=True, dynamo=False)
    with torch.no_grad():
        model.model.blocks[1].att.key.weight.mul_(1.5)
    names = ["input_ids", "attention_mask"] + OnnxLM(model, True).state_names()
    with pytest.raises(RuntimeError, match="differs from the model's"):
        _check_graph(OnnxLM(model, True).eval(), path, names, dynamo=False)
