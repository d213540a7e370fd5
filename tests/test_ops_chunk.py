"""The chunked WKV forms (`rwkv_chunk.py`) against the per-token recurrences (`rwkv_ops.py`, the truth).

Errors are measured relative to the output scale: max |chunk - recurrent| / max |recurrent|.
fp32: the two forms sum the same terms in a different order, so they agree to a few fp32 ulps of the
output scale (measured max ~1e-6, bound 2e-5). bf16 inputs: both forms upcast the same bf16 values to
fp32 and compute in fp32, so the bound is the same as fp32 (measured max ~1e-6); the tolerance does not
have to cover bf16 rounding because neither form rounds to bf16.
"""

from __future__ import annotations

import pytest
import torch

from rwkv_hf.modeling.rwkv_chunk import wkv4_chunk, wkv5_chunk
from rwkv_hf.modeling.rwkv_ops import wkv4_recurrent, wkv5_recurrent

TOL = 2e-5  # relative to the output scale
L, S = 8, 4  # small chunk and block in most tests, so short sequences cross several chunks
LENGTHS = [1, L - 1, L, L + 1, 3 * L + 5]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------- inputs
def v5_inputs(B, T, H=2, N=8, decay="v6", extreme=False, seed=0, state=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(B, T, H, N, generator=g) for _ in range(3))
    shape = {"v6": (B, T, H, N), "v5.2": (H, N), "v5.2b": (1, 1, H, N), "v5.0": (H, 1)}[decay]
    x = torch.rand(shape, generator=g) * 12 - 5 if extreme else torch.randn(shape, generator=g) - 1
    log_w = -torch.exp(x)  # extreme: per-step log-decay from -e^-5 down to -e^7 ~ -1100
    if extreme and decay == "v6":  # a strong decay followed by weak ones in the same chunk
        log_w[:, ::5] = -1e3
    u = torch.randn(H, N, generator=g)
    s0 = torch.randn(B, H, N, N, generator=g) if state else torch.zeros(B, H, N, N)
    r, k, v = r.to(dtype), k.to(dtype), v.to(dtype)
    return r, k, v, log_w, u, s0


def v4_inputs(B, T, C=16, extreme=False, seed=0, state=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(C, generator=g) * 12 - 5 if extreme else torch.randn(C, generator=g)
    log_w = -torch.exp(x)
    u = torch.randn(C, generator=g) * (10 if extreme else 1)
    k = torch.randn(B, T, C, generator=g) * (40 if extreme else 3)
    v = torch.randn(B, T, C, generator=g)
    if state:  # a state as the recurrence would leave it: run it over some tokens
        st = (torch.zeros(B, C), torch.zeros(B, C), torch.full((B, C), -1e38))
        _, st = wkv4_recurrent(log_w, u, torch.randn(B, 5, C, generator=g) * 3, torch.randn(B, 5, C, generator=g), st)
    else:
        st = (torch.zeros(B, C), torch.zeros(B, C), torch.full((B, C), -1e38))
    return log_w, u, k.to(dtype), v.to(dtype), st


# ---------------------------------------------------------------------------------------- v5 / v6
@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("decay", ["v6", "v5.2", "v5.2b", "v5.0"])
def test_wkv5_matches_recurrent(T, state, decay):
    r, k, v, log_w, u, s0 = v5_inputs(2, T, decay=decay, state=state, seed=T)
    o1, s1 = wkv5_recurrent(r, k, v, log_w, u, s0)
    o2, s2 = wkv5_chunk(r, k, v, log_w, u, s0, chunk_size=L, block_size=S)
    assert o2.shape == o1.shape and o2.dtype == torch.float32 and s2.shape == s1.shape
    assert rel_err(o2, o1) < TOL
    assert rel_err(s2, s1) < TOL


@pytest.mark.parametrize("chunk,block", [(16, 4), (16, 8), (32, 8), (8, 1), (5, 3), (64, 16)])
def test_wkv5_chunk_shapes(chunk, block):
    r, k, v, log_w, u, s0 = v5_inputs(1, 3 * chunk + 5, decay="v6", seed=chunk)
    o1, s1 = wkv5_recurrent(r, k, v, log_w, u, s0)
    o2, s2 = wkv5_chunk(r, k, v, log_w, u, s0, chunk_size=chunk, block_size=block)
    assert rel_err(o2, o1) < TOL and rel_err(s2, s1) < TOL


@pytest.mark.parametrize("decay", ["v6", "v5.2", "v5.0"])
@pytest.mark.parametrize("T", [L + 1, 3 * L + 5, 70])
def test_wkv5_extreme_decay(decay, T):
    r, k, v, log_w, u, s0 = v5_inputs(2, T, decay=decay, extreme=True, seed=T)
    o1, s1 = wkv5_recurrent(r, k, v, log_w, u, s0)
    o2, s2 = wkv5_chunk(r, k, v, log_w, u, s0, chunk_size=L, block_size=S)
    assert torch.isfinite(o2).all() and torch.isfinite(s2).all()
    assert rel_err(o2, o1) < TOL and rel_err(s2, s1) < TOL
    o3, s3 = wkv5_chunk(r, k, v, log_w, u, s0)  # default chunk and block
    assert rel_err(o3, o1) < TOL and rel_err(s3, s1) < TOL


@pytest.mark.parametrize("T", [L - 1, 3 * L + 5])
@pytest.mark.parametrize("decay", ["v6", "v5.2"])
def test_wkv5_bf16_inputs(T, decay):
    r, k, v, log_w, u, s0 = v5_inputs(2, T, decay=decay, seed=T, dtype=torch.bfloat16)
    log_w = log_w.bfloat16()
    o1, s1 = wkv5_recurrent(r, k, v, log_w, u, s0)
    o2, s2 = wkv5_chunk(r, k, v, log_w, u, s0, chunk_size=L, block_size=S)
    assert o2.dtype == torch.float32
    assert rel_err(o2, o1) < TOL and rel_err(s2, s1) < TOL


def masks(B, T):
    """Per row: left padding, right padding, holes in the middle, all real."""
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, : T // 3] = False
    m[1 % B, T - T // 4 :] = False
    if B > 2:
        m[2, 3 : T - 3 : 2] = False
    return m


@pytest.mark.parametrize("T", [L + 1, 3 * L + 5])
@pytest.mark.parametrize("decay", ["v6", "v5.2"])
def test_wkv5_mask(T, decay):
    B = 4
    r, k, v, log_w, u, s0 = v5_inputs(B, T, decay=decay, seed=T)
    m = masks(B, T)
    # garbage at the missing positions must change nothing
    k, v = k.masked_fill(~m[..., None, None], 1e3), v.masked_fill(~m[..., None, None], -1e3)
    o2, s2 = wkv5_chunk(r, k, v, log_w, u, s0, mask=m, chunk_size=L, block_size=S)
    o1, s1 = wkv5_recurrent(r, k, v, log_w, u, s0, mask=m)
    assert rel_err(o2[m], o1[m]) < TOL and rel_err(s2, s1) < TOL
    lw = log_w.expand(B, T, *log_w.shape[-2:])
    for b in range(B):  # each row alone with its missing positions removed
        keep = m[b]
        o3, s3 = wkv5_recurrent(r[b : b + 1, keep], k[b : b + 1, keep], v[b : b + 1, keep], lw[b : b + 1, keep], u, s0[b : b + 1])
        assert rel_err(o2[b, keep], o3[0]) < TOL and rel_err(s2[b], s3[0]) < TOL


def test_wkv5_empty_and_no_state():
    r, k, v, log_w, u, s0 = v5_inputs(2, 0)
    o, s = wkv5_chunk(r, k, v, log_w, u, s0)
    assert o.shape == (2, 0, 2, 8) and torch.equal(s, s0)
    r, k, v, log_w, u, _ = v5_inputs(2, 11, state=False)
    o1, s1 = wkv5_recurrent(r, k, v, log_w, u, torch.zeros(2, 2, 8, 8))
    o2, s2 = wkv5_chunk(r, k, v, log_w, u, None)
    assert rel_err(o2, o1) < TOL and rel_err(s2, s1) < TOL


@pytest.mark.parametrize("decay", ["v6", "v5.2"])
def test_wkv5_gradients(decay):
    B, T = 2, 2 * L + 3
    inputs = list(v5_inputs(B, T, H=2, N=4, decay=decay, seed=1))
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, :4] = False
    grads = []
    for fn in (wkv5_recurrent, lambda *a, mask: wkv5_chunk(*a, mask=mask, chunk_size=L, block_size=S)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, s = fn(*leaves, mask=m)
        g = torch.Generator().manual_seed(7)
        loss = (o * torch.randn(o.shape, generator=g) * m[..., None, None]).sum() + (s * torch.randn(s.shape, generator=g)).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for name, g1, g2 in zip(["r", "k", "v", "log_w", "u", "state"], *grads):
        assert torch.isfinite(g2).all(), name
        assert rel_err(g2, g1) < 1e-4, name


def test_wkv5_gradients_extreme_decay_finite():
    inputs = [x.requires_grad_() for x in v5_inputs(1, 2 * L + 3, H=2, N=4, extreme=True, seed=3)]
    o, s = wkv5_chunk(*inputs, chunk_size=L, block_size=S)
    grads = torch.autograd.grad(o.sum() + s.sum(), inputs)
    assert all(torch.isfinite(g).all() for g in grads)
    inputs2 = [x.detach().clone().requires_grad_() for x in inputs]
    o, s = wkv5_recurrent(*inputs2)
    grads2 = torch.autograd.grad(o.sum() + s.sum(), inputs2)
    for g1, g2 in zip(grads2, grads):
        assert rel_err(g2, g1) < 1e-4


# ------------------------------------------------------------------------------------------- v4
def v4_state_err(s_chunk, s_rec):
    """The two states must mean the same numerator and denominator: compare aa*e^pp and bb*e^pp in
    the scale of the larger one (bb*e^pp, which is positive), after shifting by the recurrent pp.
    Returned as a fraction of the tolerance (pass: < 1). pp is a log-scale: fp32 holds it to about
    |pp| * 6e-8, and an absolute error in pp is the same relative error in e^pp, so the tolerance grows
    with |pp|. Measured with k ~ 40: up to 2e-4 at |pp| ~ 140, i.e. ~13 ulps of pp, the recurrence's own
    step-by-step rounding of pp + log_w; with ordinary inputs < 1e-5."""
    a1, b1, p1 = s_rec
    a2, b2, p2 = s_chunk
    shift = torch.exp(p2 - p1)
    scale = b1.abs().clamp_min(1e-30)
    err = max(((a2 * shift - a1).abs() / scale).max().item(), ((b2 * shift - b1).abs() / scale).max().item())
    return err / (TOL + 2e-6 * p1.abs().max().item())


def continue_err(log_w, u, s_chunk, s_rec, B, C, seed=5):
    """Continue both states with the recurrence over fresh tokens: the outputs must agree."""
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(B, 6, C, generator=g) * 3, torch.randn(B, 6, C, generator=g)
    o1, _ = wkv4_recurrent(log_w, u, k, v, s_rec)
    o2, _ = wkv4_recurrent(log_w, u, k, v, s_chunk)
    return rel_err(o2, o1)


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("state", [False, True])
@pytest.mark.parametrize("extreme", [False, True])
def test_wkv4_matches_recurrent(T, state, extreme):
    B, C = 2, 16
    log_w, u, k, v, st = v4_inputs(B, T, C, extreme=extreme, state=state, seed=T)
    o1, s1 = wkv4_recurrent(log_w, u, k, v, st)
    o2, s2 = wkv4_chunk(log_w, u, k, v, st, chunk_size=L)
    assert o2.shape == o1.shape and o2.dtype == torch.float32
    assert torch.isfinite(o2).all()
    assert rel_err(o2, o1) < TOL
    assert v4_state_err(s2, s1) < 1
    assert continue_err(log_w, u, s2, s1, B, C) < TOL


@pytest.mark.parametrize("chunk", [1, 3, 16, 32, 100])
def test_wkv4_chunk_sizes(chunk):
    log_w, u, k, v, st = v4_inputs(2, 41, extreme=True, seed=chunk)
    o1, s1 = wkv4_recurrent(log_w, u, k, v, st)
    o2, s2 = wkv4_chunk(log_w, u, k, v, st, chunk_size=chunk)
    assert rel_err(o2, o1) < TOL and v4_state_err(s2, s1) < 1


@pytest.mark.parametrize("T", [L - 1, 3 * L + 5])
def test_wkv4_bf16_inputs(T):
    log_w, u, k, v, st = v4_inputs(2, T, dtype=torch.bfloat16, seed=T)
    o1, s1 = wkv4_recurrent(log_w, u, k, v, st)
    o2, s2 = wkv4_chunk(log_w, u, k, v, st, chunk_size=L)
    assert rel_err(o2, o1) < TOL and v4_state_err(s2, s1) < 1


@pytest.mark.parametrize("T", [L + 1, 3 * L + 5])
@pytest.mark.parametrize("extreme", [False, True])
def test_wkv4_mask(T, extreme):
    B, C = 4, 16
    log_w, u, k, v, st = v4_inputs(B, T, C, extreme=extreme, seed=T)
    m = masks(B, T)
    k, v = k.masked_fill(~m[..., None], 50.0), v.masked_fill(~m[..., None], -1e3)
    o2, s2 = wkv4_chunk(log_w, u, k, v, st, mask=m, chunk_size=L)
    o1, s1 = wkv4_recurrent(log_w, u, k, v, st, mask=m)
    assert rel_err(o2[m], o1[m]) < TOL and v4_state_err(s2, s1) < 1
    for b in range(B):
        keep = m[b]
        sb = tuple(x[b : b + 1] for x in st)
        o3, s3 = wkv4_recurrent(log_w, u, k[b : b + 1, keep], v[b : b + 1, keep], sb)
        assert rel_err(o2[b, keep], o3[0]) < TOL
        assert v4_state_err(tuple(x[b : b + 1] for x in s2), s3) < 1


def test_wkv4_gradients():
    B, T, C = 2, 2 * L + 3, 6
    log_w, u, k, v, st = v4_inputs(B, T, C, seed=2)
    inputs = [log_w, u, k, v, *st]
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, :4] = False
    grads = []
    for fn in (wkv4_recurrent, lambda *a, mask: wkv4_chunk(*a, mask=mask, chunk_size=L)):
        leaves = [x.clone().requires_grad_() for x in inputs]
        o, (aa, bb, pp) = fn(*leaves[:4], tuple(leaves[4:]), mask=m)
        g = torch.Generator().manual_seed(7)
        # the state enters the loss through what it means (numerator, denominator), not its triple
        loss = (o * torch.randn(o.shape, generator=g) * m[..., None]).sum()
        loss = loss + ((aa * torch.exp(pp)) * torch.randn(aa.shape, generator=g)).sum() + (bb * torch.exp(pp)).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for name, g1, g2 in zip(["log_w", "u", "k", "v", "aa", "bb", "pp"], *grads):
        assert torch.isfinite(g2).all(), name
        assert rel_err(g2, g1) < 1e-4, name
