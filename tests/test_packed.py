"""Packed sequences (transformers' `DataCollatorWithFlattening`): every document of a packed row gives
exactly what it gives alone: logits, loss, gradients and the state it ends in.

The documents run one by one through the model are the judge here; that path is itself checked against
the reference package in test_models.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening

from rwkv_hf.modeling import rwkv_common
from rwkv_hf.testing import build_model, make_state_dict

VOCAB = 1024
LENGTHS = [5, 9, 1, 4]
DOCS = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in LENGTHS]
VERSIONS = ["4", "5.2", "6", "7", "7-deepembed"]


def build(version, seed=0):
    deep = version.endswith("-deepembed")  # RWKV-7 with a per-token embedding in every channel mix
    sd = make_state_dict(version.split("-")[0], n_layer=2, n_embd=128, vocab_size=VOCAB, seed=seed, deep_embed=32 if deep else 0)
    return build_model(sd)


@pytest.fixture(params=[64, 1], ids=["one-batch", "length-groups"])
def groups(request, monkeypatch):
    """How the documents run: PACK_SHORT 64 puts these short ones in one padded batch; 1 makes
    `length_groups` split them by length (9 and 5, then 4, then 1 and 2), as it does long documents."""
    monkeypatch.setattr(rwkv_common, "PACK_SHORT", request.param)
    return request.param


@pytest.fixture(scope="module")
def models():
    return {v: build(v, seed=i) for i, v in enumerate(VERSIONS)}


def one_by_one(model, mode):
    """Each document alone: its logits, and the sum and count of its next-token losses."""
    logits, total, count = [], 0.0, 0
    device = next(model.parameters()).device
    for doc in DOCS:
        ids = torch.tensor([doc], device=device)
        out = model(ids, wkv_mode=mode)
        logits.append(out.logits[0])
        if len(doc) > 1:
            lp = torch.log_softmax(out.logits[0, :-1].float(), -1)
            total = total - lp.gather(1, ids[0, 1:, None]).sum()
            count += len(doc) - 1
    return torch.cat(logits), total / count


@pytest.mark.parametrize("mode", ["recurrent", "chunk"])
@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("form", ["position_ids", "cu_seq_lens"])
def test_packed_batch_gives_each_documents_own_logits_loss_and_gradients(models, version, mode, form, groups):
    model = models[version]
    collate = DataCollatorWithFlattening(
        return_position_ids=form == "position_ids", return_flash_attn_kwargs=form == "cu_seq_lens"
    )
    batch = collate([{"input_ids": d} for d in DOCS])
    assert (form in batch) or ("cu_seq_lens_q" in batch)
    model.zero_grad()
    out = model(**batch, wkv_mode=mode)
    out.loss.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad()
    logits, loss = one_by_one(model, mode)
    loss.backward()
    torch.testing.assert_close(out.logits[0], logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, loss, rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for n, p in model.named_parameters():
        if p.grad is not None:
            g, ref = packed_grads[n], p.grad
            assert (g - ref).norm() <= 1e-4 * ref.norm() + 1e-8, n


@pytest.mark.parametrize("version", VERSIONS)
def test_packed_rows_with_padding_and_a_cache_end_in_the_last_documents_state(models, version, groups):
    """Two packed rows (the second left-padded), continuing from a state: a row's first document
    continues from the row's state, later ones start afresh, and the cache ends in each row's last
    document's state."""
    model = models[version]
    with torch.no_grad():
        prefix = torch.tensor([[7, 8, 9], [10, 11, 12]])
        cache = model(prefix, use_cache=True).past_key_values
        ids = torch.tensor([DOCS[0] + DOCS[1], [0] * 7 + DOCS[2] + DOCS[3] + DOCS[0][:2]])
        mask = torch.ones_like(ids)
        mask[1, :7] = 0
        pos = torch.tensor([list(range(5)) + list(range(9)), [1] * 7 + [0] + list(range(4)) + [0, 1]])
        assert ids.shape == pos.shape == (2, 14)
        out = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache.clone(), use_cache=True)

        def alone(row, doc, start_cache):
            c = None
            if start_cache:
                c = model(prefix[row : row + 1], use_cache=True).past_key_values
            return model(torch.tensor([doc]), past_key_values=c, use_cache=True)

        parts0 = [alone(0, DOCS[0], True), alone(0, DOCS[1], False)]
        torch.testing.assert_close(out.logits[0, :14], torch.cat([p.logits[0] for p in parts0]), rtol=1e-5, atol=1e-5)
        # row 1: padding (7), a document of one token continuing from the row's state, then two fresh ones
        parts1 = [alone(1, DOCS[2], True), alone(1, DOCS[3], False), alone(1, DOCS[0][:2], False)]
        torch.testing.assert_close(out.logits[1, 7:], torch.cat([p.logits[0] for p in parts1]), rtol=1e-5, atol=1e-5)
        final = out.past_key_values
        for row, last in ((0, parts0[-1]), (1, parts1[-1])):
            for got, want in zip(final.layers_state, last.past_key_values.layers_state):
                flat_got = torch.cat([t[row].flatten().float() for t in _flat(got)])
                flat_want = torch.cat([t[0].flatten().float() for t in _flat(want)])
                torch.testing.assert_close(flat_got, flat_want, rtol=1e-5, atol=1e-5)


def test_length_groups_bound_the_padding(monkeypatch):
    """One long document packed with many short ones: the blocks see the tokens once (not every short
    document padded to the long one's length), and every batch pads its documents at most to twice
    their length (or to PACK_SHORT); the hidden states are the documents' own."""
    for lengths in ([1024] + [16] * 32, [70, 3, 140, 1, 33, 90], list(range(1, 300, 7)), [5]):
        groups = rwkv_common.length_groups(lengths)
        assert sorted(d for g in groups for d in g) == list(range(len(lengths)))
        for g in groups:
            longest = max(lengths[d] for d in g)
            assert all(2 * lengths[d] >= longest or longest <= rwkv_common.PACK_SHORT for d in g)
        assert len(groups) <= max(lengths).bit_length() + 2
    model = build("7")
    docs = [torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in [70, 3, 140, 1, 33, 90]]
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in docs])
    seen = []
    real = rwkv_common.RwkvModelBase._blocks
    monkeypatch.setattr(rwkv_common.RwkvModelBase, "_blocks", lambda self, x, *a, **k: seen.append(tuple(x.shape[:2])) or real(self, x, *a, **k))
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
        assert seen == [(3, 140), (3, 33)]  # (without groups: 6 x 140)
        start = 0
        for doc in docs:
            alone = model(torch.tensor([doc]), output_hidden_states=True)
            torch.testing.assert_close(out.logits[0, start:start + len(doc)], alone.logits[0], rtol=1e-5, atol=1e-5)
            for h, h1 in zip(out.hidden_states, alone.hidden_states):
                torch.testing.assert_close(h[0, start:start + len(doc)], h1[0], rtol=1e-5, atol=1e-5)
            start += len(doc)


def _flat(state):
    for s in state:
        if isinstance(s, torch.Tensor):
            yield s
        else:
            yield from _flat(s)


def test_malformed_cu_seq_lens_is_one_clear_error(models):
    model = models["7"]
    ids = torch.tensor([[1, 2, 3, 4]])
    with pytest.raises(ValueError, match="cu_seq_lens"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 2, 3]))
    with pytest.raises(ValueError, match="one flattened row"):
        model(torch.tensor([[1, 2], [3, 4]]), cu_seq_lens_q=torch.tensor([0, 1, 2]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("version", VERSIONS)
def test_packed_on_cuda_matches_documents_alone(version):
    pytest.importorskip("fla")
    model = build(version).cuda()
    batch = DataCollatorWithFlattening()([{"input_ids": d} for d in DOCS])
    batch = {k: v.cuda() for k, v in batch.items()}
    with torch.no_grad():
        out = model(**batch)  # "auto": fla's kernels for v5-v7, the chunked form for v4
        same_path, _ = one_by_one(model, None)
        logits, loss = one_by_one(model, "recurrent")

    def rel(a, b):
        return float((a.double() - b.double()).norm() / b.double().norm())

    # against the documents alone on the same kernels: the packing itself adds nothing but rounding;
    # against the fp32 recurrence: fla's products run in tf32 (test_gpu.py's 1e-2 bound)
    assert rel(out.logits[0], same_path) <= 1e-3, rel(out.logits[0], same_path)
    assert rel(out.logits[0], logits) <= 1e-2, rel(out.logits[0], logits)
    torch.testing.assert_close(out.loss, loss, rtol=1e-2, atol=1e-3)
