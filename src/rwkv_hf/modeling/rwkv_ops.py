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


def _keep(exists: Optional[Tensor], new: Tensor, old: Tensor) -> Tensor:
    """The new state where the position exists (exists: [B] bool, or None: everywhere), else the old one."""
    if exists is None:
        return new
    return torch.where(exists.view(-1, *([1] * (new.dim() - 1))), new, old)


def exporting() -> bool:
    """True while torch.onnx.export, torch.export or torch.jit.trace record the model.

    A recorded graph must hold for every input, not only for the example it was recorded with, so
    then: the WKV runs as the plain recurrence with its time loop kept in the graph (`_over_time`),
    and nothing branches on tensor values (see rwkv_common's `check_ids`, `normalize_mask`)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _over_time(step, state, xs: Tuple[Optional[Tensor], ...]):
    """Run `step(state, x_t) -> (state, out_t)` over the time axis (dim 1 of each tensor of xs; the last
    one is the mask, None when every position exists). Returns (out [B, T, ...], the final state).

    Eager, a Python loop; when exporting, one graph loop whose length is the input's (torch.export:
    torch's `scan`, which torch.onnx writes as an ONNX Scan), where a Python loop would be unrolled
    for the example's length."""
    if exporting():
        return _exported_loop(step, state, xs)
    outs = []
    for t in range(xs[0].shape[1]):
        state, out = step(state, tuple(None if x is None else x[:, t] for x in xs))
        outs.append(out)
    return torch.stack(outs, 1), state


def _exported_loop(step, state, xs):
    from torch._higher_order_ops import scan  # (imported here: only exporting needs it)

    *xs, mask = xs
    if mask is None:
        mask = torch.ones(xs[0].shape[:2], dtype=torch.bool, device=xs[0].device)
    state, outs = scan(lambda s, x: step(s, tuple(x)), state, (*xs, mask), dim=1)
    return outs, state


# ----------------------------------------------------------------------------------------------- v4
def wkv4_recurrent(
    log_w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tuple[Tensor, Tensor, Tensor], mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """RWKV-4 with the reference's overflow-free (aa, bb, pp) form.

    log_w = -exp(time_decay) [C]; u = time_first [C]; k, v [B, T, C]; state = (aa, bb, pp), each [B, C].
    wkv_t = (e^{pp} aa + e^{u+k_t} v_t) / (e^{pp} bb + e^{u+k_t}), all divided by the largest exponent.
    """
    k, v = k.float(), v.float()
    return _over_time(lambda s, x: _wkv4_token(log_w, u, s, x), state, (k, v, mask))


def _wkv4_token(log_w, u, state, x):
    """One step of `wkv4_recurrent`: x = (k_t, v_t [B, C], exists [B] bool or None)."""
    kt, vt, mt = x
    aa, bb, pp = state
    ww = u + kt
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    out = (e1 * aa + e2 * vt) / (e1 * bb + e2)
    ww = log_w + pp
    p = torch.maximum(ww, kt)
    e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
    return (_keep(mt, e1 * aa + e2 * vt, aa), _keep(mt, e1 * bb + e2, bb), _keep(mt, p, pp)), out


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
    return _over_time(lambda S, x: _wkv5_token(u, S, x), state, (r, k, v, w, mask))


def _wkv5_token(u, S, x):
    """One step of `wkv5_recurrent`: x = (r_t, k_t, v_t, w_t [B, H, N], exists [B] bool or None)."""
    rt, kt, vt, wt, mt = x
    a = kt.unsqueeze(-1) @ vt.unsqueeze(-2)  # [B, H, N, N]
    out = (rt.unsqueeze(-2) @ (u * a + S)).squeeze(-2)
    return _keep(mt, a + wt.unsqueeze(-1) * S, S), out


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
    return _over_time(_wkv7_token, state, (r, w, k, v, a, b, mask))


def _wkv7_token(S, x):
    """One step of `wkv7_recurrent`: x = (r_t, w_t, k_t, v_t, a_t, b_t [B, H, N], exists [B] bool or None)."""
    rt, wt, kt, vt, at, bt, mt = x
    new = S * wt.unsqueeze(-2) + (S @ at.unsqueeze(-1)) @ bt.unsqueeze(-2) + vt.unsqueeze(-1) @ kt.unsqueeze(-2)
    return _keep(mt, new, S), (new @ rt.unsqueeze(-1)).squeeze(-1)


# ------------------------------------------------------------------------------------------ dispatch
def fla_available(x: Tensor) -> bool:
    if not x.is_cuda or exporting():
        return False
    return HAVE_FLA


def pick_mode(mode: Optional[str], x: Tensor, seq_len: int, has_fla: bool = True) -> str:
    """'auto' picks: one token -> recurrent; CUDA with fla installed -> fla; else the chunked form.
    Exporting (any mode): recurrent, the one form an exported graph can hold for every length."""
    mode = mode or "auto"
    if mode not in MODES:
        raise ValueError(f"unknown WKV mode {mode!r}; expected one of {MODES}")
    if exporting():
        return "recurrent"
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
