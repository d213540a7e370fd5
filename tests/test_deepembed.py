"""DeepEmbed RWKV-7 (`ffn.s_emb`, `ffn.s_emb_x`, `ffn.s0/s1/s2`) against the reference package run with
RWKV_DE_VERSION=1, and its conversion both ways (including the trust_remote_code folder)."""

from __future__ import annotations

import json

import pytest
import torch

import rwkv_hf  # noqa: F401
from rwkv_hf.convert import convert_checkpoint, export_checkpoint
from rwkv_hf.testing import build_model as build, logits_rel_err as rel_err, make_state_dict, run_reference, run_without_rwkv_hf

SEQ = torch.randint(1, 65536, (40,), generator=torch.Generator().manual_seed(21)).tolist()
REL_TOL = 1e-4






@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("de")
    sd = make_state_dict("7", n_layer=2, n_embd=128, seed=77, deep_embed=32)
    ckpt = root / "rwkv7de.pth"
    torch.save(sd, ckpt)
    return ckpt, sd, build(sd)


def test_deep_embed_matches_reference(deep):
    ckpt, sd, model = deep
    assert model.config.deep_embed_size == 32
    split = [1, 17]
    ref = run_reference(ckpt, SEQ, "7", split_at=split)["logits"]
    ids = torch.tensor([SEQ])
    with torch.no_grad():
        # the gate matters: the same weights without DeepEmbed are far from the reference
        plain = build({k: v for k, v in sd.items() if ".ffn.s" not in k})
        assert rel_err(plain(ids).logits[0], ref) > 1e-2
        for mode in ("recurrent", "chunk"):
            err = rel_err(model(ids, wkv_mode=mode).logits[0], ref)
            print(f"DeepEmbed v7 {mode}: rel err {err:.1e} (without DeepEmbed: {rel_err(plain(ids).logits[0], ref):.1e})")
            assert err <= REL_TOL, mode
            cache, parts = None, []
            for a, b in zip([0, *split], [*split, len(SEQ)]):
                out = model(ids[:, a:b], past_key_values=cache, wkv_mode=mode, use_cache=True, return_dict=False)
                cache = out[1]
                parts.append(out[0][0])
            assert rel_err(torch.cat(parts), ref) <= REL_TOL, (mode, "split")
        # a left-padded row is exact, and decoding (one token at a time) looks up each new token
        pad = 6
        batch = torch.tensor([SEQ, [0] * pad + SEQ[:-pad]])
        mask = torch.ones_like(batch)
        mask[1, :pad] = 0
        out = model(batch, attention_mask=mask).logits
        assert rel_err(out[0], ref) <= REL_TOL and rel_err(out[1, pad:], ref[:-pad]) <= REL_TOL
        gen = model.generate(torch.tensor([SEQ[:-1]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert gen[0, -2].item() == int(ref[-2].argmax())
        with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
            model(inputs_embeds=model.model.emb(ids))


def test_deep_embed_converts_both_ways_and_runs_as_remote_code(deep, tmp_path):
    ckpt, sd, model = deep
    folder = tmp_path / "hf"
    convert_checkpoint(ckpt, folder, log=lambda *a: None)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["deep_embed_size"] == 32
    export_checkpoint(folder, tmp_path / "back.pth", log=lambda *a: None)
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    code = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    print(json.dumps(model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, :16].tolist()))
"""
    proc = run_without_rwkv_hf(code, [folder], cwd=tmp_path, env={"HF_MODULES_CACHE": str(tmp_path / "mods"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        ours = model(torch.tensor([[5, 6, 7, 8]])).logits[0, -1, :16]
    assert torch.equal(ours, torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1])))


def test_reference_worker_runs_deep_embed_checkpoints(deep, tmp_path):
    """`rwkv-hf ppl/lambada --reference` on a DeepEmbed .pth: the worker sets RWKV_DE_VERSION=1."""
    from rwkv_hf.evaluation.perplexity import stream_logprob
    from rwkv_hf.evaluation.reference import reference_perplexity
    from rwkv_hf.tokenization import RwkvWorldTokenizer

    ckpt, _, model = deep
    text = "DeepEmbed looks up one small matrix per token and layer."
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    ref_sum, ref_n, _ = reference_perplexity(ckpt, tmp_path / "t.txt", chunk=8, threads=1)
    tokens = [0] + RwkvWorldTokenizer()(text, add_special_tokens=False)["input_ids"]
    ours, n = stream_logprob(model, tokens, chunk=8)
    assert n == ref_n and abs(ours - ref_sum) <= 1e-4 * abs(ref_sum), (ours, ref_sum)
