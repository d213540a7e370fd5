"""The chunked LM-head + cross-entropy against transformers' own causal-LM loss on full logits."""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from rwkv_hf.modeling.rwkv_loss import linear_cross_entropy, shifted_targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["labels", "shift_labels", "num_items"])
def test_chunked_loss_and_gradients_equal_transformers_loss(dtype, case):
    g = torch.Generator().manual_seed(0)
    B, T, C, V = 3, 11, 32, 97
    hidden = (torch.randn(B, T, C, generator=g) * 2).to(dtype).requires_grad_()
    weight = torch.randn(V, C, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :4] = -100
    labels[2, 7] = -100
    kw = {}
    if case == "shift_labels":
        kw["shift_labels"] = torch.roll(labels, 1, 1)
    if case == "num_items":
        kw["num_items_in_batch"] = torch.tensor(41)

    want = ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=V, **kw)
    gh, gw = torch.autograd.grad(want, (hidden, weight))
    targets = shifted_targets(labels, kw.get("shift_labels"))
    got = linear_cross_entropy(hidden.reshape(-1, C), weight, targets, kw.get("num_items_in_batch"), chunk=4)
    h2, w2 = torch.autograd.grad(got * 3, (hidden, weight))  # a non-unit upstream gradient
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got, want.float(), **tol)
    torch.testing.assert_close(h2.float(), 3 * gh.float(), **tol)
    torch.testing.assert_close(w2.float(), 3 * gw.float(), **tol)
    assert h2.dtype == dtype and w2.dtype == dtype


def test_every_target_ignored_is_nan_like_cross_entropy():
    h, w = torch.randn(4, 8), torch.randn(5, 8)
    t = torch.full((4,), -100)
    assert torch.isnan(linear_cross_entropy(h, w, t)) and torch.isnan(torch.nn.functional.cross_entropy(h @ w.T, t))


@pytest.mark.parametrize("version", ["4", "7"])
def test_training_loss_without_logits_equals_the_loss_on_logits(version):
    """In training mode with labels the model fuses the LM head into the loss (no logits returned); the
    loss and every gradient are those of transformers' loss on the full logits (fuse_cross_entropy off)."""
    from rwkv_hf.testing import build_model, make_state_dict

    sd = make_state_dict(version, n_layer=2, n_embd=128, vocab_size=512, seed=5)
    model = build_model(sd).train()
    ids = torch.randint(0, 512, (2, 19), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, :5] = -100

    def run(fused):
        model.config.fuse_cross_entropy = fused
        model.zero_grad()
        out = model(ids, labels=labels, num_items_in_batch=torch.tensor(29))
        out.loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fused, g_fused = run(True)
    plain, g_plain = run(False)
    assert fused.logits is None and plain.logits is not None
    torch.testing.assert_close(fused.loss, plain.loss, rtol=1e-5, atol=1e-6)
    assert g_fused.keys() == g_plain.keys()
    for n in g_plain:
        assert (g_fused[n] - g_plain[n]).norm() <= 1e-5 * g_plain[n].norm() + 1e-9, n
    model.eval()
    assert model(ids, labels=labels).logits is not None  # evaluation keeps its logits


def test_torch_compile_of_the_model_trains_as_eager():
    """`torch.compile(model)` (what `Trainer(torch_compile=True)` runs) trains RWKV-7 as the eager model
    does: the loss of a left-padded batch with labels, and every gradient (inductor's fused kernels
    reorder fp32 sums: within 1e-4 of each gradient's largest entry). Under torch 2.11's compiler,
    before `exporting()` read torch.export's flag, this model ran its export form instead (the WKV as
    a per-token loop), 2.13 never did."""
    from rwkv_hf.testing import build_model, make_state_dict

    model = build_model(make_state_dict("7", n_layer=2, n_embd=128, vocab_size=1000, head_size=64, seed=0)).train()
    ids = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :7] = 0

    def step(m):
        model.zero_grad()
        loss = m(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    want_loss, want = step(model)
    got_loss, got = step(torch.compile(model))
    assert got.keys() == want.keys() and len(want) > 50
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    for name, g in want.items():
        assert (got[name] - g).abs().max() <= 1e-4 * g.abs().max().clamp_min(1e-12), name


@pytest.mark.parametrize("version", ["4", "6", "7"])
def test_relu_square_keeps_only_its_output_with_autograds_gradients(version, monkeypatch):
    """The channel mix's relu(x)^2 (`rwkv_helpers._ReluSquare`) keeps one [tokens, F] tensor for the
    backward pass, its output, which the value product keeps anyway; autograd's own form of it also
    keeps relu(x). The loss and every gradient are those of autograd's form."""
    from rwkv_hf.modeling import rwkv_helpers
    from rwkv_hf.testing import build_model, make_state_dict

    model = build_model(make_state_dict(version, n_layer=2, n_embd=64, vocab_size=500, seed=3)).train()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    hidden = model.model.blocks[0].ffn.key.weight.shape[0]

    def run():
        kept = set()

        def pack(t):
            if t.shape[-1] == hidden and t.dim() >= 2:  # [tokens, F] activations (not the weights: [F, C] / [C, F])
                if t.shape[-2] != model.config.hidden_size:
                    kept.add(t.untyped_storage().data_ptr())
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=ids, wkv_mode="chunk").loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(kept)

    loss, grads, kept = run()
    monkeypatch.setattr(rwkv_helpers, "relu_square", lambda x: torch.square(torch.relu(x)))
    for mod in ("modeling_rwkv4", "modeling_rwkv6", "modeling_rwkv7"):
        monkeypatch.setattr(f"rwkv_hf.modeling.{mod}.relu_square", rwkv_helpers.relu_square)
    loss_plain, grads_plain, kept_plain = run()
    assert kept == 2 and kept_plain == 4, (kept, kept_plain)  # per layer: 1 and 2
    assert torch.equal(loss, loss_plain)
    for n, g in grads_plain.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-6, atol=1e-7, msg=n)
