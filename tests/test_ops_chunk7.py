"""The chunked RWKV-7 WKV (rwkv7_chunk.wkv7_chunk) against the per-token recurrence (the truth).

Errors are measured relative to the scale of the reference (max |out|, max |state|). fp32 bounds are
tight (a few 1e-6; measured ~3e-7); bf16 inputs are cast to fp32 by both forms, so the same bound
holds there, and the bf16 rounding of the inputs themselves is checked separately against a loose
bound that only says the op does not amplify it.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_hf.modeling.rwkv7_chunk import DEFAULT_CHUNK, wkv7_chunk
from rwkv_hf.modeling.modeling_rwkv7 import WKV_FORMS
from rwkv_hf.modeling.rwkv_ops import wkv7_recurrent

H, N = 2, 16
CHUNK = 16  # small chunks in tests so every length below spans several chunks quickly
FP32_TOL = 5e-6


def make_inputs(B, T, realistic=True, seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    r, k, v = randn(B, T, H, N), randn(B, T, H, N), randn(B, T, H, N)
    log_w = -0.606531 * torch.sigmoid(2 * randn(B, T, H, N))
    if realistic:  # the model's inputs: kk unit per head, a = -kk, b = kk * gate, gate in (0, 1)
        kk = torch.nn.functional.normalize(randn(B, T, H, N), dim=-1)
        a, b = -kk, kk * torch.sigmoid(randn(B, T, H, N))
    else:  # arbitrary low-rank terms of moderate size
        a, b = 0.3 * randn(B, T, H, N), 0.3 * randn(B, T, H, N)
    xs = [x.to(dtype) for x in (r, log_w, k, v, a, b)]
    if requires_grad:
        for x in xs:
            x.requires_grad_(True)
    return xs


def rel_err(x, ref):
    return ((x.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def check(xs, state, mask=None, tol=FP32_TOL, chunk=CHUNK, **kw):
    o_ref, s_ref = wkv7_recurrent(*xs, state, mask)
    o, s = wkv7_chunk(*xs, state, mask, chunk_size=chunk, **kw)
    assert o.dtype == torch.float32 and s.dtype == torch.float32
    assert o.shape == o_ref.shape and s.shape == s_ref.shape
    keep = mask if mask is not None else torch.ones(o.shape[:2], dtype=torch.bool)
    eo, es = rel_err(o[keep], o_ref[keep]), rel_err(s, s_ref)
    assert eo < tol and es < tol, (eo, es)
    return eo, es


LENGTHS = [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5]


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("realistic", [True, False])
@pytest.mark.parametrize("zero_state", [True, False])
def test_matches_recurrent_fp32(T, realistic, zero_state):
    xs = make_inputs(2, T, realistic, seed=T)
    state = torch.zeros(2, H, N, N) if zero_state else torch.randn(2, H, N, N)
    check(xs, state)


@pytest.mark.parametrize("T", [CHUNK + 1, 3 * CHUNK + 5])
def test_matches_recurrent_bf16_inputs(T):
    xs = make_inputs(2, T, seed=7, dtype=torch.bfloat16)
    state = torch.randn(2, H, N, N)
    # both forms compute in fp32 from the same bf16 values: the algorithmic error is the fp32 one
    check(xs, state, tol=FP32_TOL)
    # and against the fp32 truth on the unrounded inputs the error is the input rounding (2^-8 ~ 4e-3
    # relative per input), not amplified by the chunked algebra
    o32, s32 = wkv7_recurrent(*make_inputs(2, T, seed=7), state)
    o, s = wkv7_chunk(*xs, state, chunk_size=CHUNK)
    assert rel_err(o, o32) < 3e-2 and rel_err(s, s32) < 3e-2


@pytest.mark.parametrize("chunk", [1, 2, 8, 32, 64])
def test_chunk_sizes(chunk):
    check(make_inputs(1, 100, seed=3), torch.randn(1, H, N, N), chunk=chunk)


def test_long_sequence_default_chunk():
    """Hundreds of steps through the state with the default chunk: errors do not accumulate."""
    check(make_inputs(1, 600, seed=4), torch.randn(1, H, N, N), chunk=DEFAULT_CHUNK)


def test_strong_decay_shrinks_chunk():
    """Decays far beyond RWKV-7's range (log_w down to -12), with no lower bound given (the default is
    RWKV-7's own), stay finite: the chunk shrinks."""
    xs = make_inputs(1, 70, seed=5)
    xs[1] = xs[1] * 20
    o, s = wkv7_chunk(*xs, torch.randn(1, H, N, N), chunk_size=64, lower_bound=None)
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    check(xs, torch.randn(1, H, N, N), chunk=64, lower_bound=None)


def drop_masked(xs, state, mask_row):
    """The truth for one row: run the recurrence with the masked positions removed."""
    idx = mask_row.nonzero().squeeze(-1)
    return wkv7_recurrent(*[x[:, idx] for x in xs], state)


MASKS = {
    "left_pad": lambda T: torch.arange(T) >= 7,
    "right_pad": lambda T: torch.arange(T) < T - 9,
    "holes": lambda T: (torch.arange(T) % 5 != 2) & ((torch.arange(T) < 20) | (torch.arange(T) > 30)),
}


@pytest.mark.parametrize("kind", list(MASKS))
def test_mask_equals_removing_positions(kind):
    T = 3 * CHUNK + 5
    xs = make_inputs(1, T, seed=11)
    state = torch.randn(1, H, N, N)
    m = MASKS[kind](T)
    o, s = wkv7_chunk(*xs, state, m[None], chunk_size=CHUNK)
    o_ref, s_ref = drop_masked(xs, state, m)
    assert rel_err(o[:, m], o_ref) < FP32_TOL and rel_err(s, s_ref) < FP32_TOL
    check(xs, state, m[None])  # and the recurrence with the same mask agrees


def test_batch_with_different_masks_per_row():
    T = 2 * CHUNK + 3
    xs = make_inputs(3, T, seed=12)
    state = torch.randn(3, H, N, N)
    mask = torch.stack([MASKS["left_pad"](T), MASKS["right_pad"](T), MASKS["holes"](T)])
    o, s = wkv7_chunk(*xs, state, mask, chunk_size=CHUNK)
    for i in range(3):
        row = [x[i : i + 1] for x in xs]
        o_ref, s_ref = drop_masked(row, state[i : i + 1], mask[i])
        assert rel_err(o[i, mask[i]], o_ref[0]) < FP32_TOL
        assert rel_err(s[i], s_ref[0]) < FP32_TOL


def test_rwkv7_names_its_forms():
    """RWKV-7's table of WKV forms (what `rwkv_paths` picks from) holds the chunked form, which computes the recurrence."""
    xs = make_inputs(1, 40, seed=13)
    state = torch.randn(1, H, N, N)
    o, s = WKV_FORMS["chunk"](*xs, state, None)
    o_ref, s_ref = wkv7_recurrent(*xs, state)
    assert WKV_FORMS["recurrent"] is wkv7_recurrent
    assert rel_err(o, o_ref) < FP32_TOL and rel_err(s, s_ref) < FP32_TOL


def test_state_is_not_modified():
    xs = make_inputs(1, 20, seed=14)
    state = torch.randn(1, H, N, N)
    before = state.clone()
    wkv7_chunk(*xs, state, chunk_size=CHUNK)
    assert torch.equal(state, before)


@pytest.mark.parametrize("realistic", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradients_match_recurrent(realistic, masked):
    T = CHUNK + 5
    mask = (torch.arange(T) % 7 != 3)[None].expand(2, T).clone() if masked else None
    if masked:
        mask[1, :4] = False
    grads = []
    for fn in (wkv7_recurrent, lambda *a: wkv7_chunk(*a, chunk_size=8)):
        xs = make_inputs(2, T, realistic, seed=21, requires_grad=True)
        state = torch.randn(2, H, N, N, generator=torch.Generator().manual_seed(22)).requires_grad_(True)
        o, s = fn(*xs, state, mask)
        go = torch.randn(o.shape, generator=torch.Generator().manual_seed(23))
        gs = torch.randn(s.shape, generator=torch.Generator().manual_seed(24))
        if mask is not None:
            go = go * mask[:, :, None, None]  # outputs at masked positions are meaningless
        ((o * go).sum() + (s * gs).sum()).backward()
        grads.append([x.grad for x in xs] + [state.grad])
    names = ["r", "log_w", "k", "v", "a", "b", "state"]
    for name, g_ref, g in zip(names, *grads):
        if mask is not None and name == "r":
            g, g_ref = g[mask], g_ref[mask]  # r at masked positions only feeds the ignored outputs
        assert rel_err(g, g_ref) < 2e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_recurrent():
    xs = [x.cuda() for x in make_inputs(2, 3 * DEFAULT_CHUNK + 5, seed=31)]
    state = torch.randn(2, H, N, N, device="cuda")
    mask = MASKS["holes"](3 * DEFAULT_CHUNK + 5)[None].expand(2, -1).cuda()
    torch.backends.cuda.matmul.allow_tf32 = False
    o_ref, s_ref = wkv7_recurrent(*xs, state, mask)
    o, s = wkv7_chunk(*xs, state, mask)
    assert rel_err(o[mask], o_ref[mask]) < 1e-5 and rel_err(s, s_ref) < 1e-5


def test_long_inputs_go_in_segments(monkeypatch):
    """Inputs longer than one segment are carried through several passes: same result, same grads."""
    import rwkv_hf.modeling.rwkv7_chunk as chunk_mod

    T = 5 * CHUNK + 3
    mask = MASKS["holes"](T)[None].expand(2, T)
    results = []
    for segment in (10**9, 2 * H * CHUNK):  # one pass; 1 chunk per pass at B=2
        monkeypatch.setattr(chunk_mod, "_SEGMENT", segment)
        xs = make_inputs(2, T, seed=41, requires_grad=True)
        state = torch.randn(2, H, N, N, generator=torch.Generator().manual_seed(42)).requires_grad_(True)
        o, s = wkv7_chunk(*xs, state, mask, chunk_size=CHUNK)
        ((o * mask[:, :, None, None]).square().sum() + s.square().sum()).backward()
        results.append([o[mask], s] + [x.grad for x in xs] + [state.grad])
    for one, many in zip(*results):
        assert rel_err(many, one) < FP32_TOL
    o_ref, s_ref = wkv7_recurrent(*[x.detach() for x in make_inputs(2, T, seed=41)], state.detach(), mask)
    assert rel_err(results[1][0], o_ref[mask]) < FP32_TOL and rel_err(results[1][1], s_ref) < FP32_TOL
