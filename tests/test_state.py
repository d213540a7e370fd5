"""State files (RWKV-PEFT's `blocks.{i}.att.time_state`) as the initial state, prompt states saved in
the same format, and state tuning; each checked against BlinkDL's `rwkv` package fed the same state.

The reference is fed a state file two ways: for RWKV-5/6 merged into the checkpoint, which the package
loads itself (`args.time_state`: transposed, token shifts zero), and for every version as RWKV-Runner's
`load_rwkv_state` does (`run_reference(state_file=...)`: v5/v6 transposed, v7 as is).
"""

from __future__ import annotations

import pytest
import torch

import rwkv_hf  # noqa: F401
from rwkv_hf.convert.blinkdl import config_from_state_dict, to_hf_key
from rwkv_hf.modeling import FAMILIES
from rwkv_hf.modeling.rwkv_state import StateFileError
from rwkv_hf.testing import make_state_dict, make_state_file_dict, run_reference

VERSIONS = ["5.0", "5.2", "6", "7"]
SEQ = torch.randint(1, 65536, (24,), generator=torch.Generator().manual_seed(11)).tolist()
REL_TOL = 1e-4


def rel_err(ours, ref) -> float:
    ours, ref = ours.float(), ref.float()
    return ((ours - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()


def build(sd):
    spec, cfg = config_from_state_dict(sd)
    model = FAMILIES[spec.family][2](cfg).eval()
    model.load_state_dict({to_hf_key(k): v for k, v in sd.items()})
    return model


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """version -> (checkpoint path, state dict, state file path, model)."""
    root = tmp_path_factory.mktemp("state")
    out = {}
    for i, v in enumerate(VERSIONS):
        sd = make_state_dict(v, n_layer=2, n_embd=128, seed=300 + i)
        ckpt = root / f"rwkv{v}.pth"
        torch.save(sd, ckpt)
        state = root / f"state{v}.pth"
        torch.save(make_state_file_dict(2, 128, 64, seed=400 + i), state)
        out[v] = (ckpt, sd, state, build(sd))
    return out


# ---------------------------------------------------------------------------------- loading a file
@pytest.mark.parametrize("version", VERSIONS)
def test_state_file_matches_reference_forward_and_batch(version, setups, tmp_path):
    ckpt, sd, state, model = setups[version]
    ref = run_reference(ckpt, SEQ, version, state_file=state)["logits"]
    if version != "7":  # the package's own loader: the state merged into the checkpoint
        merged = tmp_path / "merged.pth"
        torch.save({**sd, **torch.load(state, weights_only=True)}, merged)
        native = run_reference(merged, SEQ, version)["logits"]
        assert rel_err(native, ref) <= 1e-6
    ids = torch.tensor([SEQ])
    with torch.no_grad():
        plain = model(ids).logits[0]
        assert rel_err(plain, ref) > 1e-2  # the state matters
        model.load_state_file(state)
        for mode in ("recurrent", "chunk"):
            assert rel_err(model(ids, wkv_mode=mode).logits[0], ref) <= REL_TOL, (version, mode)
        # one state for every row; a left-padded row is exact
        pad = 5
        batch = torch.tensor([SEQ, [0] * pad + SEQ[:-pad]])
        mask = torch.ones_like(batch)
        mask[1, :pad] = 0
        for mode in ("recurrent", "chunk"):
            out = model(batch, attention_mask=mask, wkv_mode=mode).logits
            assert rel_err(out[0], ref) <= REL_TOL and rel_err(out[1, pad:], ref[:-pad]) <= REL_TOL, (version, mode)
        gen = model.generate(batch, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert gen[0, len(SEQ)].item() == int(ref[-1].argmax())
        alone = model.generate(torch.tensor([SEQ[:-pad]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert gen[1, len(SEQ):].tolist() == alone[0, len(SEQ) - pad:].tolist()
        model.load_state_file(None)
        assert torch.equal(model(ids).logits[0], plain)


def test_mismatched_state_files_get_one_line_errors(setups, tmp_path):
    _, sd, _, model = setups["6"]
    cases = {
        "layers": (make_state_file_dict(3, 128, 64), "has 3 layers, the model 2"),
        "heads": (make_state_file_dict(2, 256, 64), "is [4, 64, 64] (4 heads of size 64); the model has 2 heads of size 64"),
        "size": (make_state_file_dict(2, 128, 32), "is [4, 32, 32] (4 heads of size 32); the model has 2 heads of size 64"),
        "gap": ({"blocks.0.att.time_state": torch.zeros(2, 64, 64), "blocks.2.att.time_state": torch.zeros(2, 64, 64)}, "layers [0, 2]"),
        "other": ({"blocks.0.att.time_state": torch.zeros(2, 64, 64), "blocks.0.att.x": torch.zeros(1)}, "holds only blocks.N.att.time_state"),
        "checkpoint": (sd, "is a model checkpoint, not a state file"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(content, path)
        with pytest.raises(StateFileError) as e:
            model.load_state_file(path)
        assert message in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
        assert all(getattr(b.att, "time_state", None) is None for b in model.model.blocks)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(StateFileError, match="not a readable state file"):
        model.load_state_file(tmp_path / "junk.pth")
    v4 = build(make_state_dict("4", n_layer=2, n_embd=128))
    with pytest.raises(StateFileError, match="has none"):
        v4.load_state_file(tmp_path / "layers.pth")
