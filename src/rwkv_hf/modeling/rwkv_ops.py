"""The WKV recurrences of every RWKV version, as plain per-token loops, and the dispatch to faster forms.

The loops here are the truth: each is a line-by-line transcription of the reference package's
`rwkv/model.py` one-token update (one `_wkvN_token` function per version, run by `_wkvN_loop`, or, when
the model is being exported, by a loop recorded in the graph: see `exporting` and `_over_time`).
The chunked matrix forms (`rwkv_chunk.py`, `rwkv7_chunk.py`) and the flash-linear-attention kernels
(`rwkv_fla.py`) are tested against them.

Conventions shared by every op:
- inputs are batch-first, ``[B, T, H, N]`` (v4: ``[B, T, C]``), computed in fp32, outputs fp32;
- the decay is given as its logarithm ``log_w <= 0`` (so chunked forms can take cumulative sums);
- ``mask`` is ``[B, T]`` bool or None: where it is False the position does not exist, the state is
  neither updated nor decayed and the output there is meaningless (callers ignore it);
- the state is fp32 and is returned new, never modified in place.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

# top-level imports: transformers' remote-code loader copies only the files it sees imported
from .rwkv7_chunk import wkv7_chunk
from .rwkv_chunk import wkv4_chunk, wkv5_chunk
from .rwkv_fla import HAVE_FLA, wkv5_fla, wkv5_fla_step, wkv7_fla, wkv7_fla_step

Tensor = torch.Tensor
MODES = ("auto", "recurrent", "chunk", "fla")


def exporting() -> bool:
    """True while torch.onnx.export, torch.export or torch.jit.trace record the model.

    A recorded graph must hold for every input, not only for the example it was recorded with, so
    then: the WKV runs as the plain recurrence with its time loop kept in the graph (`_over_time`),
    and nothing branches on tensor values (see rwkv_common's `check_ids`, `normalize_mask`)."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


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
    return torch.stack(outs, 1), state


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
    a = kt.unsqueeze(-1) @ vt.unsqueeze(-2)  # [B, H, N, N]
    out = (rt.unsqueeze(-2) @ (u * a + S)).squeeze(-2)
    return _keep(mt, a + wt.unsqueeze(-1) * S, S), out


def _wkv5_loop(u, r, k, v, w, S, mask):
    outs: List[Tensor] = []
    for t in range(k.shape[1]):
        S, out = _wkv5_token(u, S, r[:, t], k[:, t], v[:, t], w[:, t], None if mask is None else mask[:, t])
        outs.append(out)
    return torch.stack(outs, 1), S


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
    new = S * wt.unsqueeze(-2) + (S @ at.unsqueeze(-1)) @ bt.unsqueeze(-2) + vt.unsqueeze(-1) @ kt.unsqueeze(-2)
    return _keep(mt, new, S), (new @ rt.unsqueeze(-1)).squeeze(-1)


def _wkv7_loop(r, w, k, v, a, b, S, mask):
    outs: List[Tensor] = []
    for t in range(k.shape[1]):
        m = None if mask is None else mask[:, t]
        S, out = _wkv7_token(S, r[:, t], w[:, t], k[:, t], v[:, t], a[:, t], b[:, t], m)
        outs.append(out)
    return torch.stack(outs, 1), S


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
