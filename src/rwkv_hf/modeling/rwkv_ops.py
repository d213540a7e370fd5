"""The WKV recurrences of every RWKV version, as plain per-token loops, and the dispatch to faster forms.

The loops here are the truth: each is a line-by-line transcription of the reference package's
`rwkv/model.py` one-token update. The chunked matrix forms (`rwkv_chunk.py`, `rwkv7_chunk.py`) and the
flash-linear-attention kernels (`rwkv_fla.py`) are tested against them.

Conventions shared by every op:
- inputs are batch-first, ``[B, T, H, N]`` (v4: ``[B, T, C]``), computed in fp32, outputs fp32;
- the decay is given as its logarithm ``log_w <= 0`` (so chunked forms can take cumulative sums);
- ``mask`` is ``[B, T]`` bool or None: where it is False the position does not exist, the state is
  neither updated nor decayed and the output there is meaningless (callers ignore it);
- the state is fp32 and is returned new, never modified in place.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

# top-level imports: transformers' remote-code loader copies only the files it sees imported
from .rwkv7_chunk import wkv7_chunk
from .rwkv_chunk import wkv4_chunk, wkv5_chunk
from .rwkv_fla import HAVE_FLA, wkv5_fla, wkv5_fla_step, wkv7_fla, wkv7_fla_step

Tensor = torch.Tensor
MODES = ("auto", "recurrent", "chunk", "fla")


def _keep(mask: Optional[Tensor], t: int, new: Tensor, old: Tensor) -> Tensor:
    """The new state where position t exists, else the old one."""
    if mask is None:
        return new
    m = mask[:, t].view(-1, *([1] * (new.dim() - 1)))
    return torch.where(m, new, old)


# ----------------------------------------------------------------------------------------------- v4
def wkv4_recurrent(
    log_w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tuple[Tensor, Tensor, Tensor], mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """RWKV-4 with the reference's overflow-free (aa, bb, pp) form.

    log_w = -exp(time_decay) [C]; u = time_first [C]; k, v [B, T, C]; state = (aa, bb, pp), each [B, C].
    wkv_t = (e^{pp} aa + e^{u+k_t} v_t) / (e^{pp} bb + e^{u+k_t}), all divided by the largest exponent.
    """
    aa, bb, pp = state
    k, v = k.float(), v.float()
    out = torch.empty_like(k)
    for t in range(k.shape[1]):
        kt, vt = k[:, t], v[:, t]
        ww = u + kt
        p = torch.maximum(pp, ww)
        e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
        out[:, t] = (e1 * aa + e2 * vt) / (e1 * bb + e2)
        ww = log_w + pp
        p = torch.maximum(ww, kt)
        e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
        aa = _keep(mask, t, e1 * aa + e2 * vt, aa)
        bb = _keep(mask, t, e1 * bb + e2, bb)
        pp = _keep(mask, t, p, pp)
    return out, (aa, bb, pp)


# ------------------------------------------------------------------------------------- v5.x and v6
def wkv5_recurrent(
    r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """RWKV-5/6: a matrix state per head, S[key, value].

    r, k, v [B, T, H, N]; log_w [B, T, H, N] (v6, data dependent) or broadcastable to it (v5: [H, N]);
    u [H, N] the bonus of the current token; state [B, H, N, N].
        out_t = r_t (S + diag(u) k_t^T v_t);   S <- diag(w_t) S + k_t^T v_t
    """
    r, k, v = r.float(), k.float(), v.float()
    w = torch.exp(log_w.float()).expand_as(k)
    u = u.float().unsqueeze(-1)  # [H, N, 1]
    S = state
    out = torch.empty_like(v)
    for t in range(k.shape[1]):
        a = k[:, t].unsqueeze(-1) @ v[:, t].unsqueeze(-2)  # [B, H, N, N]
        out[:, t] = (r[:, t].unsqueeze(-2) @ (u * a + S)).squeeze(-2)
        S = _keep(mask, t, a + w[:, t].unsqueeze(-1) * S, S)
    return out, S


# ----------------------------------------------------------------------------------------------- v7
def wkv7_recurrent(
    r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """RWKV-7: a matrix state per head, S[value, key], with a rank-one in-context update.

    All inputs [B, T, H, N]; state [B, H, N, N]. In the reference, a = -kk and b = kk * a.
        S <- S diag(w_t) + (S a_t) b_t^T + v_t k_t^T;   out_t = S r_t
    """
    r, k, v, a, b = r.float(), k.float(), v.float(), a.float(), b.float()
    w = torch.exp(log_w.float())
    S = state
    out = torch.empty_like(v)
    for t in range(k.shape[1]):
        new = (
            S * w[:, t].unsqueeze(-2)
            + (S @ a[:, t].unsqueeze(-1)) @ b[:, t].unsqueeze(-2)
            + v[:, t].unsqueeze(-1) @ k[:, t].unsqueeze(-2)
        )
        S = _keep(mask, t, new, S)
        out[:, t] = (new @ r[:, t].unsqueeze(-1)).squeeze(-1)
    return out, S


# ------------------------------------------------------------------------------------------ dispatch
def fla_available(x: Tensor) -> bool:
    if not x.is_cuda:
        return False
    return HAVE_FLA


def pick_mode(mode: Optional[str], x: Tensor, seq_len: int, has_fla: bool = True) -> str:
    """'auto' picks: one token -> recurrent; CUDA with fla installed -> fla; else the chunked form."""
    mode = mode or "auto"
    if mode not in MODES:
        raise ValueError(f"unknown WKV mode {mode!r}; expected one of {MODES}")
    if mode != "auto":
        return mode
    if seq_len == 1:
        return "recurrent"
    if has_fla and fla_available(x):
        return "fla"
    return "chunk"


def wkv4(log_w, u, k, v, state, mask=None, mode=None):
    mode = pick_mode(mode, k, k.shape[1], has_fla=False)
    if mode == "chunk":
        return wkv4_chunk(log_w, u, k, v, state, mask)
    if mode == "fla":
        raise ValueError("flash-linear-attention has no RWKV-4 kernel; use mode 'chunk' or 'recurrent'")
    return wkv4_recurrent(log_w, u, k, v, state, mask)


def _fla_one_token(mode, x: Tensor, mask, state) -> bool:
    """Decoding on CUDA with fla: one token, no mask, no gradients (fla's fused one-token kernels have no backward)."""
    return (mode in (None, "auto") and x.shape[1] == 1 and mask is None and state is not None
            and not torch.is_grad_enabled() and fla_available(x))


def wkv5(r, k, v, log_w, u, state, mask=None, mode=None):
    if _fla_one_token(mode, r, mask, state):
        return wkv5_fla_step(r, k, v, log_w, u, state)
    mode = pick_mode(mode, r, r.shape[1])
    if mode == "chunk":
        return wkv5_chunk(r, k, v, log_w, u, state, mask)
    if mode == "fla":
        return wkv5_fla(r, k, v, log_w, u, state, mask)
    return wkv5_recurrent(r, k, v, log_w, u, state, mask)


def wkv7(r, log_w, k, v, a, b, state, mask=None, mode=None):
    if _fla_one_token(mode, r, mask, state):
        return wkv7_fla_step(r, log_w, k, v, a, b, state)
    mode = pick_mode(mode, r, r.shape[1])
    if mode == "chunk":
        return wkv7_chunk(r, log_w, k, v, a, b, state, mask)
    if mode == "fla":
        return wkv7_fla(r, log_w, k, v, a, b, state, mask)
    return wkv7_recurrent(r, log_w, k, v, a, b, state, mask)
