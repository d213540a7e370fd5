"""The WKV recurrences of every RWKV version, as plain per-token loops: the truth the faster forms are
tested against.

Each `_wkvN_token` is the reference package's one-token update (`rwkv/model.py`), written once: the
prefill loops (`_wkvN_loop`), every decode step (T = 1, through the version's `time_mix`) and an
exported graph's loop (see `exporting` and `_over_time`) all run it. The chunked matrix forms
(`rwkv_chunk.py`, `rwkv7_chunk.py`) and the flash-linear-attention kernels (`rwkv_fla.py`) compute the
same function; each version's file names its forms in one table (`WKV_FORMS`) and `rwkv_paths`
picks one.

Conventions shared by every form:
- inputs are batch-first, ``[B, T, H, N]`` (v4: ``[B, T, C]``), computed in fp32, outputs fp32;
- the decay is given as its logarithm ``log_w <= 0`` (so chunked forms can take cumulative sums);
- ``mask`` is ``[B, T]`` bool or None: where it is False the position does not exist, the state is
  neither updated nor decayed and the output there is meaningless (callers ignore it);
- the state is fp32 and is returned new, never modified in place.
The products inside a token are written as broadcast multiply-and-sum (not matmuls), so that
torch.compile fuses a whole decode step's update into one kernel.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .rwkv_helpers import exporting

Tensor = torch.Tensor
def _keep(exists: Optional[Tensor], new: Tensor, old: Tensor) -> Tensor:
    """The new state where the position exists (exists: the mask's column, shaped to broadcast against
    the state; None: everywhere), else the old one."""
    return new if exists is None else torch.where(exists, new, old)


def _over_time(loop, step, consts: tuple, xs: tuple, state, mask: Optional[Tensor]):
    """Run a version's recurrence over the time axis (dim 1 of xs and of mask [B, T, 1, ...]).

    `step(*consts, state, *x_t, mask_t) -> (state, out_t)` is one token; `loop(*consts, *xs, state, mask)`
    runs it over every position. Eager, the loop runs as Python. When exporting, a Python loop would be
    unrolled for the example's length, so the graph gets a loop of its own, with a mask of ones when
    none is given: torch.export (torch.onnx's default exporter) records `step` in torch's `scan`
    (an ONNX Scan); torch.jit.trace (torch.onnx's TorchScript exporter) records `loop` scripted (an
    ONNX Loop)."""
    if not exporting():
        return loop(*consts, *xs, state, mask)
    if mask is None:
        like = state[0] if isinstance(state, tuple) else state
        mask = torch.ones(*xs[0].shape[:2], *[1] * (like.dim() - 1), dtype=torch.bool, device=like.device)
    if torch.jit.is_tracing():
        return _scripted(loop)(*consts, *xs, state, mask)
    from torch._higher_order_ops import scan  # (imported here: only exporting needs it)

    # (detached: torch 2.13 fails to decompose for ONNX a scan whose inputs require gradients)
    consts, xs = tuple(c.detach() for c in consts), tuple(x.detach() for x in xs)
    state = tuple(s.detach() for s in state) if isinstance(state, tuple) else state.detach()
    state, out = scan(lambda s, x: step(*consts, s, *x), state, (*xs, mask), dim=1)
    return out, state


_SCRIPTED = {}


def _scripted(fn):
    if fn not in _SCRIPTED:
        _SCRIPTED[fn] = torch.jit.script(fn)
    return _SCRIPTED[fn]


def _exists(mask: Optional[Tensor], state_dims: int) -> Optional[Tensor]:
    """mask [B, T] as [B, T, 1, ...], to broadcast against a state of `state_dims` dims at each position."""
    return None if mask is None else mask.view(*mask.shape, *[1] * (state_dims - 1))


def _stacked(outs: List[Tensor]) -> Tensor:
    """The per-token outputs along a new time axis; one token (a decode step) as a view, not a copy:
    one kernel less per layer in an eager decode step (compiled, inductor folds the copy either way)."""
    return outs[0].unsqueeze(1) if len(outs) == 1 else torch.stack(outs, 1)


# The loops below are scripted when exporting with torch.jit.trace, where an argument without a type is
# a Tensor: their mask is a tensor there (eager it is None when every position exists).

# ----------------------------------------------------------------------------------------------- v4
def wkv4_recurrent(
    log_w: Tensor, u: Tensor, k: Tensor, v: Tensor, state: Tuple[Tensor, Tensor, Tensor], mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor]]:
    """RWKV-4 with the reference's overflow-free (aa, bb, pp) form.

    log_w = -exp(time_decay) [C]; u = time_first [C]; k, v [B, T, C]; state = (aa, bb, pp), each [B, C].
    wkv_t = (e^{pp} aa + e^{u+k_t} v_t) / (e^{pp} bb + e^{u+k_t}), all divided by the largest exponent.
    """
    return _over_time(_wkv4_loop, _wkv4_token, (log_w, u), (k.float(), v.float()), state, _exists(mask, 2))


def _wkv4_token(
    log_w: Tensor, u: Tensor, state: Tuple[Tensor, Tensor, Tensor], kt: Tensor, vt: Tensor, mt: Optional[Tensor]
) -> Tuple[Tuple[Tensor, Tensor, Tensor], Tensor]:
    aa, bb, pp = state
    ww = u + kt
    p = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - p), torch.exp(ww - p)
    out = (e1 * aa + e2 * vt) / (e1 * bb + e2)
    ww = log_w + pp
    p = torch.maximum(ww, kt)
    e1, e2 = torch.exp(ww - p), torch.exp(kt - p)
    return (_keep(mt, e1 * aa + e2 * vt, aa), _keep(mt, e1 * bb + e2, bb), _keep(mt, p, pp)), out


def _wkv4_loop(log_w, u, k, v, state: Tuple[Tensor, Tensor, Tensor], mask):
    outs: List[Tensor] = []
    for t in range(k.shape[1]):
        state, out = _wkv4_token(log_w, u, state, k[:, t], v[:, t], None if mask is None else mask[:, t])
        outs.append(out)
    return _stacked(outs), state


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
    return _over_time(_wkv5_loop, _wkv5_token, (u,), (r, k, v, w), state, _exists(mask, 4))


def _wkv5_token(
    u: Tensor, S: Tensor, rt: Tensor, kt: Tensor, vt: Tensor, wt: Tensor, mt: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    a = kt.unsqueeze(-1) * vt.unsqueeze(-2)  # k^T v, [B, H, key, value]
    out = (rt.unsqueeze(-1) * (u * a + S)).sum(-2)  # r (S + diag(u) k^T v)
    return _keep(mt, a + wt.unsqueeze(-1) * S, S), out


def _wkv5_loop(u, r, k, v, w, S, mask):
    outs: List[Tensor] = []
    for t in range(k.shape[1]):
        S, out = _wkv5_token(u, S, r[:, t], k[:, t], v[:, t], w[:, t], None if mask is None else mask[:, t])
        outs.append(out)
    return _stacked(outs), S


# ----------------------------------------------------------------------------------------------- v7
def wkv7_recurrent(
    r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """RWKV-7: a matrix state per head, S[value, key], with a rank-one in-context update.

    All inputs [B, T, H, N]; state [B, H, N, N]. In the reference, a = -kk and b = kk * a.
        S <- S diag(w_t) + (S a_t) b_t^T + v_t k_t^T;   out_t = S r_t
    """
    xs = (r.float(), torch.exp(log_w.float()), k.float(), v.float(), a.float(), b.float())
    return _over_time(_wkv7_loop, _wkv7_token, (), xs, state, _exists(mask, 4))


def _wkv7_token(
    S: Tensor, rt: Tensor, wt: Tensor, kt: Tensor, vt: Tensor, at: Tensor, bt: Tensor, mt: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
    sa = (S * at.unsqueeze(-2)).sum(-1, keepdim=True)  # S a, [B, H, value, 1]
    new = S * wt.unsqueeze(-2) + sa * bt.unsqueeze(-2) + vt.unsqueeze(-1) * kt.unsqueeze(-2)
    return _keep(mt, new, S), (new * rt.unsqueeze(-2)).sum(-1)  # S r


def _wkv7_loop(r, w, k, v, a, b, S, mask):
    outs: List[Tensor] = []
    for t in range(k.shape[1]):
        m = None if mask is None else mask[:, t]
        S, out = _wkv7_token(S, r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], m)
        outs.append(out)
    return _stacked(outs), S
