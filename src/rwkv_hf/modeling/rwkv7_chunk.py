"""RWKV-7 WKV in chunked matrix form (WY / UT transform of a diagonal-plus-low-rank delta rule).

The recurrence (per batch row and head; S is [value, key], vectors are columns), as in
``rwkv_ops.wkv7_recurrent``, which is the truth this is tested against:

    S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T,        out_t = S_t r_t,        w_t = exp(log_w_t).

Derivation. Split the time axis into chunks of L steps; inside one chunk let S_0 be the state before
it, c_t = sum_{s<=t} log_w_s the cumulative log-decay (c_0 = 0) and u_t = S_{t-1} a_t the rank-one
read-out. Then the update is purely diagonal plus two outer products,
S_t = S_{t-1} diag(w_t) + u_t b_t^T + v_t k_t^T, which unrolls to

    S_t = S_0 diag(e^{c_t}) + sum_{j<=t} (u_j b_j^T + v_j k_j^T) diag(e^{c_t - c_j}).        (1)

Reading (1) at t-1 against a_t gives a strictly lower-triangular linear system for the rows u_i^T:

    U = A~ S_0^T + M_ab U + M_ak V,   M_xy[i, j] = sum_n x_i[n] y_j[n] e^{c_{i-1}[n] - c_j[n]}  (j < i),

with A~ rows a_i * e^{c_{i-1}}; so U = (I - M_ab)^{-1} (A~ S_0^T + M_ak V) = W S_0^T + U0 (one small
unit-triangular solve, independent of S_0). Reading (1) against r_t gives the outputs and at t = L the
next state:

    O   = R~ S_0^T + Q_b U + Q_k V = (R~ + Q_b W) S_0^T + (Q_b U0 + Q_k V),   Q_y[t, j] = r_t . y_j e^{c_t - c_j} (j <= t)
    S_L = S_0 (diag(e^{c_L}) + W^T B^) + (U0^T B^ + V^T K^),            B^, K^ rows b_j, k_j * e^{c_L - c_j}.

Everything but the chain S_L = S_0 M + X is computed for all chunks at once; the chain is a short loop
of [N, N] matmuls (T / L steps), then all outputs are one batched matmul with the chunk-start states.

Numerics (fp32). The pairwise decays e^{c_i - c_j} (i >= j) are <= 1, but are computed as a product
e^{c_i - c_ref} * e^{c_ref - c_j} so the intra-chunk products are matmuls. With c_ref the cumulative
decay at the middle of the chunk each factor is at most e^{|log_w|_max * L / 2}: for RWKV-7
(log_w >= -0.607) and L = 32 that is e^{9.7}, far from overflow, and since the factors are multiplied
(never subtracted) the relative error of each term stays ~1e-7 * |c| (cumsum rounding), as with the
exact difference. Entries with i < j are large but finite and are zeroed by the triangular masks before
use (also in backward). For arbitrary log_w the chunk is shrunk so that the half-span stays < 60 (one log_w.min(), a
host sync on GPUs).
The triangular solve is well conditioned for RWKV-7 inputs (a = -kk, b = kk * gate, so |M_ab| <= 1
and nearly orthogonal keys make it small); for larger a, b the recurrence itself grows like the same
products and errors stay relative to the output scale.

Masked positions (mask False) are made the identity step: k = v = a = b = 0 and log_w = 0 (r too:
outputs there are meaningless). T is padded to a multiple of L with identity steps.

Cost per token and head ~ 9 L N + 4 N^2 multiply-adds, all in batched matmuls; the loop over chunks
is T / L steps of one [N, N] matmul. At B=1, T=512, H=12, N=64 on 2 CPU cores this is ~3x faster than
the per-token loop (see tests/test_ops_chunk7.py's module docstring for the measured table).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .rwkv_helpers import RWKV7_LOG_W_MIN

Tensor = torch.Tensor

# 32 is fastest at the model's shapes on CPU (B=1..8, T=512..4096, H=12, N=64; 16 pays more per-chunk
# overhead, 64 more intra-chunk work) and keeps the exponent factors <= e^{9.7} for RWKV-7 decays.
DEFAULT_CHUNK = 32
_SEGMENT = 12 * 256  # rows of B * H * T per pass (256 tokens at B=1, H=12)
_MAX_HALF_SPAN = 60.0  # e^60 ~ 1e26: safe in fp32 (max ~e^88), with headroom for the products


def _safe_chunk(log_w: Tensor, chunk_size: int, lower_bound: Optional[float] = None) -> int:
    """Largest chunk <= chunk_size whose half-span of cumulative decay stays below _MAX_HALF_SPAN.
    `lower_bound` (<= every log_w) spares reading the decays' minimum: a device sync, and a graph
    break under torch.compile."""
    if lower_bound is not None:
        worst = -lower_bound
    else:
        worst = float(-log_w.min()) if log_w.numel() else 0.0
    if worst * chunk_size / 2 <= _MAX_HALF_SPAN:
        return chunk_size
    return max(1, int(2 * _MAX_HALF_SPAN / worst))


def wkv7_chunk(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Tensor,
    mask: Optional[Tensor] = None,
    chunk_size: int = DEFAULT_CHUNK,
    lower_bound: Optional[float] = RWKV7_LOG_W_MIN,
) -> Tuple[Tensor, Tensor]:
    """Chunked RWKV-7 WKV; same contract as ``wkv7_recurrent``.

    r, log_w, k, v, a, b: [B, T, H, N] (any float dtype; computed in fp32); state [B, H, N, N] as
    S[value, key]; mask [B, T] bool or None. Returns (out [B, T, H, N] fp32, new state [B, H, N, N] fp32).
    `lower_bound`: a number <= every log_w (RWKV-7's decay guarantees the default, see rwkv_helpers);
    None reads the decays' minimum to pick a chunk size that keeps the exponent factors finite.
    """
    B, T, H, N = r.shape
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=torch.float32), state.float().clone()
    L = min(_safe_chunk(log_w.detach(), chunk_size, lower_bound), T)
    # long inputs go through in segments of ~_SEGMENT rows of B*H*T: the temporaries stay cache-sized
    # (one pass over T=4096 is slower per token than eight passes over 512) and memory stays bounded
    seg = max(1, _SEGMENT // (B * H * L)) * L
    if T <= seg:
        return _wkv7_chunk(r, log_w, k, v, a, b, state, mask, L)
    outs, S = [], state
    for t in range(0, T, seg):
        part = slice(t, t + seg)
        m = None if mask is None else mask[:, part]
        o, S = _wkv7_chunk(r[:, part], log_w[:, part], k[:, part], v[:, part], a[:, part], b[:, part], S, m, L)
        outs.append(o)
    return torch.cat(outs, 1), S


def _wkv7_chunk(r, log_w, k, v, a, b, state, mask, L):
    B, T, H, N = r.shape
    L = min(L, T)
    S = state.float().reshape(B * H, N, N)
    nc = -(-T // L)
    pad = nc * L - T

    # 1. one fp32 buffer [nc, B*H, 6, L, N] holding (a, r, b, k, v, log_w) chunk by chunk; pairs that are
    #    multiplied together ([a; r], [b; k]) are adjacent so each pair is a [2L, N] view. Masked and
    #    padded positions become identity steps (everything 0, log_w = 0).
    xs = [x.float() for x in (a, r, b, k, v, log_w)]
    if pad:
        xs = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in xs]
    buf = torch.stack([x.view(B, nc, L, H, N).permute(1, 0, 3, 2, 4) for x in xs], 3)  # [nc, B, H, 6, L, N]
    if mask is not None:
        m = torch.nn.functional.pad(mask.to(device=buf.device, dtype=buf.dtype), (0, pad))
        buf = buf * m.view(B, nc, L).transpose(0, 1)[:, :, None, None, :, None]
    buf = buf.view(nc, B * H, 6, L, N)
    ar, bk, v, log_w = buf[:, :, 0:2], buf[:, :, 2:4], buf[:, :, 4], buf[:, :, 5]

    # 2. cumulative log-decays: c_{t-1} and c_t, relative to c_ref mid-chunk; c_L the chunk total
    cum = log_w.cumsum(-2)
    ref = cum[..., L // 2 : L // 2 + 1, :]
    total = cum[..., -1:, :]
    e_left = torch.exp(torch.stack((cum - log_w, cum), 2) - ref.unsqueeze(2))  # [.., 2, L, N]
    e_right = torch.exp(ref - cum)

    # 3. all intra-chunk pairs in one matmul: rows [a e^{c_{i-1}}; r e^{c_t}] against [b; k] e^{-c_j}
    left = (ar * e_left).flatten(2, 3)  # [.., 2L, N]
    right = (bk * e_right.unsqueeze(2)).flatten(2, 3)  # [.., 2L, N]
    P = (left @ right.transpose(-1, -2)) * _pair_mask(L, P_like=left)  # [.., 2L, 2L]
    M_ab, M_ak, Q_b, Q = P[..., :L, :L], P[..., :L, L:], P[..., L:, :L], P[..., L:, :]

    # 4. UT transform: U = (I - M_ab)^{-1} (A~ S_0^T + M_ak V) = W S_0^T + U0
    left_abs = left * torch.exp(ref)  # [a e^{c_{i-1}}; r e^{c_t}]
    rhs = torch.cat((left_abs[..., :L, :], M_ak @ v), -1)  # [.., L, 2N]
    WU0 = torch.linalg.solve_triangular(-M_ab, rhs, upper=False, unitriangular=True)
    W = WU0[..., :N]
    UV = torch.cat((WU0[..., N:], v), -2)  # [U0; V]  [.., 2L, N]

    # 5. outputs O = R_c S_0^T + O0 and the chunk transition S_L = S_0 M + X
    R_c = torch.baddbmm(left_abs[..., L:, :].flatten(0, 1), Q_b.flatten(0, 1), W.flatten(0, 1))
    O0 = Q @ UV
    BK_hat = right * torch.exp(total - ref)  # [b; k] e^{c_L - c_j}
    M = W.transpose(-1, -2) @ BK_hat[..., :L, :]
    M.diagonal(dim1=-2, dim2=-1).add_(torch.exp(total.squeeze(-2)))
    X = UV.transpose(-1, -2) @ BK_hat

    # 6. the only sequential part: carry the state across chunks
    starts = []
    for c in range(nc):
        starts.append(S)
        S = torch.baddbmm(X[c], S, M[c])
    S0 = torch.stack(starts)  # [nc, B*H, N, N]
    out = torch.baddbmm(O0.flatten(0, 1), R_c, S0.flatten(0, 1).transpose(-1, -2))  # [nc*B*H, L, N]

    out = out.view(nc, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, nc * L, H, N)[:, :T]
    return out, S.view(B, H, N, N)


_MASKS = {}


def _pair_mask(L: int, P_like: Tensor) -> Tensor:
    """[2L, 2L] 0/1 mask: the a-rows see strictly earlier steps, the r-rows see earlier and current ones."""
    key = (L, P_like.device, P_like.dtype)
    if key not in _MASKS:
        strict = torch.ones(L, L, dtype=P_like.dtype, device=P_like.device).tril(-1)
        incl = torch.ones(L, L, dtype=P_like.dtype, device=P_like.device).tril()
        _MASKS[key] = torch.cat((torch.cat((strict, strict), 1), torch.cat((incl, incl), 1)), 0)
    return _MASKS[key]
