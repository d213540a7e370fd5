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
from rwkv_hf.modeling.rwkv_state import StateFileError
from rwkv_hf.testing import build_model as build, logits_rel_err as rel_err, make_state_dict, make_state_file_dict, run_reference

VERSIONS = ["5.2", "6", "7", "5.0", "5.1"]  # every version with a WKV state
SEQ = torch.randint(1, 65536, (24,), generator=torch.Generator().manual_seed(11)).tolist()
REL_TOL = 1e-4


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
            err = rel_err(model(ids, wkv_mode=mode).logits[0], ref)
            print(f"v{version} state file, {mode}: rel err {err:.1e} (without the state: {rel_err(plain, ref):.1e})")
            assert err <= REL_TOL, (version, mode)
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


# ------------------------------------------------------------------------- saving a prompt's state
@pytest.mark.parametrize("version", ["6", "7"])  # transposed (5.x share 6's layout) and not
def test_prompt_state_file_is_the_references_state_and_continues_like_it(version, setups, tmp_path):
    ckpt, _, _, model = setups[version]
    prompt, cont = SEQ[:16], SEQ[16:]
    path = model.save_state_file(tmp_path / "prompt.pth", input_ids=prompt)
    saved = torch.load(path, weights_only=True)
    assert sorted(saved) == ["blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert all(t.dtype == torch.float32 and t.shape == (2, 64, 64) for t in saved.values())
    # loaded the RWKV-Runner way, the file is the reference's own WKV state after the prompt
    ref_state = run_reference(ckpt, prompt, version)["state"]
    for i in range(2):
        runner = saved[f"blocks.{i}.att.time_state"]
        runner = runner if version == "7" else runner.transpose(1, 2)
        ref = ref_state[i * 3 + 1]
        err = ((runner - ref).abs().max() / ref.abs().max()).item()
        print(f"v{version} prompt state layer {i} vs the reference's: rel err {err:.1e}")
        assert err <= 1e-4, i
    # and the reference continuing from the file (token shifts zero) is what we compute from it
    ref = run_reference(ckpt, cont, version, state_file=path)["logits"]
    with torch.no_grad():
        model.load_state_file(path)
        ours = model(torch.tensor([cont])).logits[0]
        model.load_state_file(None)
    print(f"v{version} continuing from the prompt state file: rel err {rel_err(ours, ref):.1e}")
    assert rel_err(ours, ref) <= REL_TOL
    with pytest.raises(FileExistsError):
        model.save_state_file(path, input_ids=prompt)
    model.save_state_file(path, input_ids=cont, force=True)
    assert not torch.equal(torch.load(path, weights_only=True)["blocks.1.att.time_state"], saved["blocks.1.att.time_state"])
    assert [p.name for p in tmp_path.iterdir()] == ["prompt.pth"]  # no temporary files left


# ------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def folder(setups, tmp_path_factory):
    from rwkv_hf.convert import convert_checkpoint

    out = tmp_path_factory.mktemp("cli") / "hf"
    convert_checkpoint(str(setups["7"][0]), str(out))
    return out


def test_cli_state_generate_and_chat(setups, folder, tmp_path, capsys, monkeypatch):
    import io
    import sys

    from rwkv_hf.cli import main
    from rwkv_hf.generation_cli import generate_texts, load_model

    _, _, state, _ = setups["7"]
    tok, model = load_model(str(folder), "cpu")
    prompts = ["Hello", "A longer prompt that is left padded"]
    gen = ["--max-new-tokens", "6", "--temperature", "0", "--raw"]
    assert main(["generate", str(folder), *prompts, *gen]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", str(folder), *prompts, *gen, "--state", str(state)]) == 0
    with_state = capsys.readouterr().out
    model.load_state_file(state)
    expected = generate_texts(model, tok, prompts, raw=True, temperature=0, max_new_tokens=6)
    assert with_state != plain
    assert all(f"[{i}] {p}\n{t}\n" in with_state for i, (p, t) in enumerate(zip(prompts, expected)))

    # rwkv-hf state: the prompt's state, as save_state_file(input_ids=...) writes it
    out = tmp_path / "sys.pth"
    assert main(["state", str(folder), "System: be brief.\n\n", str(out)]) == 0
    assert "the state after" in capsys.readouterr().out
    model.load_state_file(None)
    model.save_state_file(tmp_path / "py.pth", input_ids=tok("System: be brief.\n\n")["input_ids"])
    a, b = torch.load(out, weights_only=True), torch.load(tmp_path / "py.pth", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\n"))
    assert main(["chat", str(folder), "--state", str(out), "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count("Assistant:") == 1

    # errors: one line, exit 2, nothing overwritten
    before = out.read_bytes()
    bad = tmp_path / "bad.pth"
    torch.save(make_state_file_dict(3, 64, 32), bad)
    for argv, message in [
        (["state", str(folder), "x", str(out)], "exists (use --force"),
        (["generate", str(folder), "x", "--state", str(bad)], "has 3 layers, the model 2"),
        (["generate", str(folder), "x", "--state", str(tmp_path / "missing.pth")], "no such state file"),
        (["state", str(folder), "", str(tmp_path / "empty.pth")], "the prompt is empty"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert out.read_bytes() == before and not (tmp_path / "empty.pth").exists()


# ----------------------------------------------------------------------------------- state tuning
def _tuning_data(n: int = 8, T: int = 12, seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, 65536, (n, T), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


@pytest.mark.parametrize("version", ["6", "7"])
def test_state_tuning_with_trainer_and_the_saved_file(version, setups, tmp_path):
    from transformers import Trainer, TrainingArguments

    ckpt, sd, _, _ = setups[version]
    model = build(sd).enable_state_tuning()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(trainable) == [f"model.blocks.{i}.att.time_state" for i in range(2)]
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=12, learning_rate=0.05,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, warmup_steps=0,
        lr_scheduler_type="constant",
    )
    data = _tuning_data()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and losses[-1] < losses[0], losses
    model.eval()
    # the loss on the training rows fell, and only the states moved
    batch = torch.stack([d["input_ids"] for d in data])
    tuned_loss = model(batch, labels=batch).loss.item()
    with torch.no_grad():
        fresh = build(sd)
        base_loss = fresh(batch, labels=batch).loss.item()
    print(f"v{version} state tuning: Trainer loss {losses[0]:.3f} -> {losses[-1]:.3f}; eval loss {base_loss:.3f} -> {tuned_loss:.3f}")
    assert tuned_loss < base_loss - 0.5, (base_loss, tuned_loss)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # just the state: saved, loaded into a fresh model, through the reference
    path = model.save_state_file(tmp_path / "tuned.pth")
    ids = batch[0]
    with torch.no_grad():
        tuned = model(ids[None]).logits[0]
        fresh.load_state_file(path)
        assert torch.equal(fresh(ids[None]).logits[0], tuned)
    ref = run_reference(ckpt, ids.tolist(), version, state_file=path)["logits"]
    print(f"v{version} tuned state file through the reference: rel err {rel_err(tuned, ref):.1e}")
    assert rel_err(tuned, ref) <= REL_TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_state_tuning_on_cuda_fla_gradients_match_the_recurrence(version):
    """fla's chunked kernels take the initial state and give its gradient: the same gradient as the
    plain recurrence (fp32 weights; fla's products run in tf32, so 1e-2 relative), and Adam on it
    lowers the loss."""
    from rwkv_hf.modeling.rwkv_fla import HAVE_FLA

    if not HAVE_FLA:
        pytest.skip("needs flash-linear-attention")
    model = build(make_state_dict(version, n_layer=2, n_embd=128, seed=9)).cuda().enable_state_tuning()
    with torch.no_grad():
        for i, att in enumerate(b.att for b in model.model.blocks):
            att.time_state.copy_(make_state_file_dict(2, 128, 64, seed=i, scale=0.5)["blocks.0.att.time_state"])
    ids = torch.randint(1, 65536, (2, 100), generator=torch.Generator().manual_seed(1)).cuda()
    grads = {}
    for mode in ("recurrent", "chunk", "fla"):
        model.zero_grad()
        model(ids, labels=ids, wkv_mode=mode).loss.backward()
        grads[mode] = torch.stack([b.att.time_state.grad for b in model.model.blocks]).double()
    for mode in ("chunk", "fla"):
        err = float((grads[mode] - grads["recurrent"]).norm() / grads["recurrent"].norm())
        print(f"v{version} state gradient {mode} vs recurrent: {err:.2e}")
        assert err <= (1e-4 if mode == "chunk" else 1e-2), (mode, err)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = model(ids, labels=ids).loss  # auto: fla on CUDA
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
