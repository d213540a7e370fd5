"""Chunked (parallel-in-time) forms of the RWKV-4 and RWKV-5/6 WKV recurrences.

These compute exactly what the per-token loops in `rwkv_ops.py` compute (`wkv4_recurrent`,
`wkv5_recurrent`, the truth), with the same conventions: batch-first inputs, fp32 compute and outputs,
``log_w <= 0``, ``mask`` [B, T] bool where False = the position does not exist (state neither updated
nor decayed, output there meaningless), state returned new. Plain PyTorch, any device, autograd.

RWKV-5/6 (`wkv5_chunk`), per head, with S[key, value]:

    out_t = r_t (S_{t-1} + diag(u) k_t^T v_t),      S_t = diag(w_t) S_{t-1} + k_t^T v_t,   w_t = exp(log_w_t)

Cut the sequence into chunks of L positions. Inside a chunk starting from the state S0, with
``g_t = sum_{m<t} log_w_m`` (exclusive prefix sum in the chunk),

    out_t = (r_t * e^{g_t}) S0                                             (state entering the chunk)
          + sum_{j<t} [sum_n r_tn k_jn e^{sum_{m=j+1}^{t-1} log_w_mn}] v_j   (earlier tokens of the chunk)
          + (r_t . (u * k_t)) v_t                                          (bonus of the current token)
    S_end = diag(e^{sum_m log_w_m}) S0 + sum_j (k_j * e^{sum_{m>j} log_w_m})^T v_j

The chunk is further cut into blocks of s positions, so that every decay is a product of factors <= 1:
- inside a block, the weight of token j on token t is sum_n r_tn k_jn prod_{j<m<t} w_mn, built one
  diagonal t - j = d at a time from running products of w (s - 1 small steps, no exponent at all);
- block I reads an earlier block J of its chunk as (r_t e^{decay from I's start to t}) *
  e^{decay over the blocks strictly between J and I} * (k_j e^{decay from j to J's end}), a matmul;
- the chunk reads the state entering it as (r_t e^{decay from the chunk start to t}) S0, a matmul, and
  the state is carried chunk to chunk by a short sequential loop over chunks.
Every exponent is a sum of log-decays over a range that is computed directly (0/1 matrices times
log_w), never as a difference of two running sums: all exponentials are <= 1 (no overflow for any
decay, e.g. log_w = -1e3 per step) and there is no cancellation when a very strong decay is followed
by weak ones. Elementwise work is O(T N (s + L / s)) per head, the rest is matmuls.

RWKV-4 (`wkv4_chunk`), per channel, with the reference's overflow-free state (aa, bb, pp), meaning a
numerator aa*e^pp and a denominator bb*e^pp:

    wkv_t = (e^{pp} aa + e^{u+k_t} v_t) / (e^{pp} bb + e^{u+k_t});   (aa, bb, pp) <- decay by e^{w}, add e^{k_t} (v_t, 1)

There is no matrix to multiply, so the chunked form is a two-level scan: every chunk runs the same
max-subtracted recurrence from an empty state, all chunks in parallel (L steps over [B*nc, C]); a
sequential pass over the nc chunk summaries gives the state entering each chunk; and each output adds
that incoming state, decayed by the count of real positions before it, to its chunk-local state and the
bonus term, all three combined in log space (subtract the largest exponent). Safe for any k and w.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

# Defaults tuned on CPU (2 cores, B=1, T=512, H=12, N=64 and C=768): chunk 16 / block 8 for v5 was the
# fastest with 32/8 within noise and 16/4, 32/16, 64/x slower; v4 is flat between 16 and 64.
WKV5_CHUNK = 16  # positions per chunk (the state is carried chunk to chunk)
WKV5_BLOCK = 8  # positions per block inside a chunk (decays inside a block are running products)
WKV4_CHUNK = 32

_NEG = -1e38  # "log of zero" for the v4 state, as the reference initialises pp


# ------------------------------------------------------------------------------------- v5.x and v6
def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    """sum_{m<t} x_m along dim, computed as a shifted running sum (no subtraction)."""
    inc = x.cumsum(dim)
    return torch.cat([torch.zeros_like(inc.narrow(dim, 0, 1)), inc.narrow(dim, 0, x.shape[dim] - 1)], dim)


def _range_sums(n: int, pairs: bool, device) -> Tensor:
    """0/1 rows that, multiplied with n values x, give for every position i: sum_{m<i} x_m (n rows),
    sum_{m>i} x_m (n rows), if pairs, for every pair (i, j): sum_{j<m<i} x_m (n*n rows), and last
    sum_m x_m (1 row). Each is a direct sum of same-sign log-decays, never a difference of running sums."""
    i = torch.arange(n, device=device)
    before = (i.view(n, 1) > i.view(1, n)).float()  # [i, m]: m < i
    after = (i.view(n, 1) < i.view(1, n)).float()  # [i, m]: m > i
    rows = [before, after]
    if pairs:
        rows.append((before.view(n, 1, n) * after.view(1, n, n)).view(n * n, n))  # [(i, j), m]: j < m < i
    return torch.cat(rows + [torch.ones(1, n, device=device)], 0)


def wkv5_chunk(
    r: Tensor,
    k: Tensor,
    v: Tensor,
    log_w: Tensor,
    u: Tensor,
    state: Optional[Tensor],
    mask: Optional[Tensor] = None,
    chunk_size: int = WKV5_CHUNK,
    block_size: int = WKV5_BLOCK,
) -> Tuple[Tensor, Tensor]:
    """RWKV-5/6 WKV in chunks; same contract as `rwkv_ops.wkv5_recurrent`.

    r, k [B, T, H, K]; v [B, T, H, V]; log_w [B, T, H, K] or broadcastable to it ([H, K], [1, 1, H, K],
    [H, 1]); u broadcastable to [H, K]; state [B, H, K, V] or None (zeros); mask [B, T] bool or None.
    Returns (out [B, T, H, V] fp32, new state [B, H, K, V] fp32).
    """
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = state.float() if state is not None else k.new_zeros(B, H, K, V, dtype=torch.float32)
    if T == 0:
        return v.float().new_zeros(B, 0, H, V), S
    s = max(1, int(block_size))
    L = s * max(1, min(-(-int(chunk_size) // s), -(-T // s)))  # a multiple of s, no longer than needed
    nb, nc = L // s, -(-T // L)  # blocks per chunk, chunks
    pad = nc * L - T

    # 1. fp32, broadcast decay; a missing position (masked or padding) is k = v = 0 and identity decay.
    r, k, v = r.float(), k.float(), v.float()
    lw = log_w.float().expand(B, T, H, K)
    u = torch.broadcast_to(u.float(), (H, K)).reshape(H, 1, 1, 1, K)
    if mask is not None:
        m = mask.to(torch.bool).view(B, T, 1, 1)
        k, v, lw = torch.where(m, k, 0.0), torch.where(m, v, 0.0), torch.where(m, lw, 0.0)

    # 2. layout [B, H, chunk, block, position in block, *]
    def blocks(x: Tensor) -> Tensor:
        x = F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x
        return x.view(B, nc, nb, s, H, x.shape[-1]).permute(0, 4, 1, 2, 3, 5).contiguous()

    r, k, v, lw = blocks(r), blocks(k), blocks(v), blocks(lw)

    # 3. decays as direct sums of log_w: inside a block (before / after each position, whole block),
    #    then between blocks of a chunk (before / after each block, between two blocks, whole chunk)
    g = _range_sums(s, False, k.device) @ lw  # [B, H, nc, nb, 2s + 1, K]
    g_before, g_after, g_block = g[..., :s, :], g[..., s : 2 * s, :], g[..., -1, :]
    G = _range_sums(nb, True, k.device) @ g_block  # [B, H, nc, 2nb + nb*nb + 1, K]
    G_before, G_after = G[..., :nb, :].unsqueeze(-2), G[..., nb : 2 * nb, :].unsqueeze(-2)
    G_between = G[..., 2 * nb : -1, :].view(B, H, nc, nb, nb, 1, K)
    G_chunk = G[..., -1, :]

    # 4. r decayed from the block start, k decayed to the block end
    rd = r * torch.exp(g_before)
    kd = k * torch.exp(g_after)

    # 5. scores inside a block, diagonal by diagonal, with the decays as running products of w
    #    (d = 0 is the current token's bonus u)
    w = torch.exp(lw)
    A_block = torch.diag_embed((r * u * k).sum(-1))
    decay = None
    for d in range(1, s):
        decay = torch.ones_like(w[..., d:, :]) if decay is None else decay[..., 1:, :] * w[..., 1 : s - d + 1, :]
        A_block = A_block + torch.diag_embed((r[..., d:, :] * k[..., : s - d, :] * decay).sum(-1), offset=-d)

    # 6. scores between blocks of a chunk: block I reads block J < I through the blocks between them
    idx = torch.arange(nb, device=k.device)
    earlier = (idx.view(nb, 1, 1, 1) > idx.view(1, nb, 1, 1))  # [I, J, 1, 1]
    between = torch.where(earlier, torch.exp(G_between), 0.0)  # [B, H, nc, I, J, 1, K]
    A = torch.einsum("...ijtn,...jsn->...itjs", rd.unsqueeze(-3) * between, kd)
    A = A + A_block.unsqueeze(-2) * torch.eye(nb, device=k.device).view(nb, 1, nb, 1)
    out = A.reshape(B, H, nc, L, L) @ v.view(B, H, nc, L, V)

    # 7. carry the state chunk to chunk: S_end = diag(decay of the chunk) S + (k decayed to the end)^T v
    r_chunk = (rd * torch.exp(G_before)).view(B, H, nc, L, K)  # r decayed from the chunk start
    k_chunk = (kd * torch.exp(G_after)).view(B, H, nc, L, K)  # k decayed to the chunk end
    kv = k_chunk.transpose(-1, -2) @ v.view(B, H, nc, L, V)  # [B, H, nc, K, V]
    decay_chunk = torch.exp(G_chunk).unsqueeze(-1)  # [B, H, nc, K, 1]
    entering = []
    for c in range(nc):
        entering.append(S)
        S = decay_chunk[:, :, c] * S + kv[:, :, c]

    # 8. add the state entering each chunk, decayed to each position
    out = out + r_chunk @ torch.stack(entering, 2)
    out = out.permute(0, 2, 3, 1, 4).reshape(B, nc * L, H, V)[:, :T]
    return out, S


# ----------------------------------------------------------------------------------------------- v4
def _add_logs(a1: Tensor, b1: Tensor, p1: Tensor, a2: Tensor, b2: Tensor, p2: Tensor):
    """(a1, b1) e^{p1} + (a2, b2) e^{p2} as (a, b) e^{p} with p the larger exponent."""
    p = torch.maximum(p1, p2)
    e1, e2 = torch.exp(p1 - p), torch.exp(p2 - p)
    return e1 * a1 + e2 * a2, e1 * b1 + e2 * b2, p


def wkv4_chunk(
    log_w: Tensor,
    u: Tensor,
    k: Tensor,
    v: Tensor,
    state: Tuple[Tensor, Tensor, Tensor],
    mask: Optional[Tensor] = None,
    chunk_size: int = WKV4_CHUNK,
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """RWKV-4 WKV in chunks; same contract as `rwkv_ops.wkv4_recurrent`.

    log_w, u [C]; k, v [B, T, C]; state (aa, bb, pp) each [B, C]; mask [B, T] bool or None.
    Returns (wkv [B, T, C] fp32, (aa, bb, pp)): the returned state represents the same numerator aa*e^pp
    and denominator bb*e^pp as the recurrence's (up to rounding), not necessarily the same triple.
    """
    B, T, C = k.shape
    if T == 0:
        return k.float().new_zeros(B, 0, C), state
    L = max(1, min(int(chunk_size), T))
    if chunk_size <= 0:  # auto: balance the local steps against the carry steps
        L = max(1, int(math.sqrt(T)))
    nc = -(-T // L)
    pad = nc * L - T
    k, v = k.float(), v.float()
    log_w, u = log_w.float(), u.float()
    aa, bb, pp = (s.float() for s in state)

    # 1. which positions exist (padding does not); chunk layout [nc, B, L, C] -> rows [nc * B, ...]
    real = torch.ones(B, T, dtype=torch.bool, device=k.device) if mask is None else mask.to(torch.bool)
    if pad:
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        real = F.pad(real, (0, pad), value=False)

    def rows(x: Tensor) -> Tensor:  # [B, nc*L, *] -> [nc*B, L, *], chunk-major
        return x.reshape(B, nc, L, *x.shape[2:]).transpose(0, 1).reshape(nc * B, L, *x.shape[2:])

    kc, vc, rc = rows(k), rows(v), rows(real).unsqueeze(-1)  # rc [nc*B, L, 1]

    # 2. every chunk runs the recurrence from an empty state, all chunks at once;
    #    keep the local state *before* each position (what its output sees)
    a = kc.new_zeros(nc * B, C)
    b = kc.new_zeros(nc * B, C)
    p = kc.new_full((nc * B, C), _NEG)
    before = []
    for t in range(L):
        before.append((a, b, p))
        kt, vt, mt = kc[:, t], vc[:, t], rc[:, t]
        a2, b2, p2 = _add_logs(a, b, log_w + p, vt, torch.ones_like(vt), kt)
        a, b, p = (a2, b2, p2) if mask is None and not pad else (torch.where(mt, a2, a), torch.where(mt, b2, b), torch.where(mt, p2, p))
    la, lb, lp = (torch.stack(x, 1) for x in zip(*before))  # [nc*B, L, C]

    # 3. carry the state chunk to chunk: decay by the number of real positions, then add the chunk's own
    n_real = rc.squeeze(-1).to(k.dtype)  # [nc*B, L]
    n_before = _exclusive_cumsum(n_real, 1).view(nc, B, L, 1)  # real positions before t in its chunk
    n_all = n_real.sum(1).view(nc, B, 1)
    a, b, p = a.view(nc, B, C), b.view(nc, B, C), p.view(nc, B, C)
    entering = []
    for c in range(nc):
        entering.append((aa, bb, pp))
        aa, bb, pp = _add_logs(aa, bb, pp + n_all[c] * log_w, a[c], b[c], p[c])
    ea, eb, ep = (torch.stack(x, 0).unsqueeze(2) for x in zip(*entering))  # [nc, B, 1, C]

    # 4. each output: entering state decayed to t + local state before t + bonus e^{u+k_t} (v_t, 1)
    ep = ep + n_before * log_w
    la, lb, lp = la.view(nc, B, L, C), lb.view(nc, B, L, C), lp.view(nc, B, L, C)
    na, nb, npow = _add_logs(ea, eb, ep, la, lb, lp)
    kc, vc = kc.view(nc, B, L, C), vc.view(nc, B, L, C)
    na, nb, _ = _add_logs(na, nb, npow, vc, torch.ones_like(vc), u + kc)
    out = (na / nb).transpose(0, 1).reshape(B, nc * L, C)[:, :T]
    return out, (aa, bb, pp)
