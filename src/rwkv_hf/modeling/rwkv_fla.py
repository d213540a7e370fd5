"""The WKV ops through flash-linear-attention's Triton kernels (CUDA only, optional).

Same conventions as `rwkv_ops.py` (batch-first ``[B, T, H, N]`` inputs, log-decay, ``mask`` [B, T] bool
with False = the position does not exist, fp32 state returned new, fp32 output), tested against the
plain recurrences there on a GPU (`tests/test_gpu.py`).

fla's conventions (read off fla 0.6.0, `fla/ops/rwkv6/chunk.py` and `fla/ops/rwkv7/chunk.py`):
- inputs are ``[B, T, H, K]`` (no head-first layout); the decay is a log-decay;
- the state is ``[B, H, K, V]``: for v5/v6 that is our S[key, value], for v7 ours is S[value, key]
  and is transposed on the way in and out;
- `chunk_rwkv6` scales r by ``1/sqrt(K)`` unless told otherwise: we pass ``scale=1``.

Masked positions: k = v = 0 (v7 also a = b = 0) and log w = 0 there make the update the identity, so
the state is neither updated nor decayed, which is what the recurrences do.

This file must import on a machine without fla (transformers copies it as remote code and checks the
imports outside try blocks): the fla import sits in a try block and `HAVE_FLA` says whether it worked.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch

from .rwkv_helpers import RWKV7_LOG_W_MIN

Tensor = torch.Tensor

try:
    if not torch.cuda.is_available():  # fla's kernels need a GPU; importing it costs seconds on a CPU machine
        raise ImportError("flash-linear-attention runs on CUDA only")
    with warnings.catch_warnings():  # fla warns on import without Triton; HAVE_FLA says so
        warnings.simplefilter("ignore")
        from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    HAVE_FLA = True
except Exception:  # ImportError, or triton failing to initialise on a machine without a GPU
    chunk_rwkv6 = chunk_rwkv7 = fused_recurrent_rwkv6 = fused_recurrent_rwkv7 = None
    HAVE_FLA = False

# RWKV-7 defines log w = -0.606531 * sigmoid(.), so log w >= RWKV7_LOG_W_MIN always (rwkv_helpers). Telling
# fla this bound lets it use 64-token chunks with tensor cores (`lower_bound`), as its own RWKV-7 layer
# does; fla only decides with it (chunk size, safe gate), and -0.606531 decides as fla's -exp(-0.5) does.


def _require_fla() -> None:
    if not HAVE_FLA:
        raise ImportError(
            "WKV mode 'fla' needs flash-linear-attention (pip install flash-linear-attention) and a CUDA GPU"
        )


def _masked(mask: Optional[Tensor], *xs: Tensor) -> Tuple[Tensor, ...]:
    """Zero each tensor at positions where mask is False (mask [B, T], tensors [B, T, ...])."""
    if mask is None:
        return xs
    m = mask.view(*mask.shape, 1, 1)
    return tuple(torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)) for x in xs)


def _one_token(r: Tensor, state: Optional[Tensor], mask: Optional[Tensor]) -> bool:
    """One token per row from a state, without a mask or gradients (decoding): fla's fused one-token
    kernel, which has no backward, instead of the chunk kernel."""
    return r.shape[1] == 1 and state is not None and mask is None and not torch.is_grad_enabled()


def _common_dtype(*xs: Tensor) -> torch.dtype:
    """fla's kernels want r, k, v (and a, b) in one dtype: bf16/fp16 stay, anything else becomes fp32."""
    dts = {x.dtype for x in xs}
    if len(dts) == 1 and next(iter(dts)) in (torch.bfloat16, torch.float16, torch.float32):
        return next(iter(dts))
    return torch.float32


def wkv5_fla(
    r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Optional[Tensor], mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """RWKV-5/6 through fla's `chunk_rwkv6`. log_w [B, T, H, N] (v6) or broadcastable to it (v5)."""
    _require_fla()
    if _one_token(r, state, mask):
        return wkv5_fla_step(r, k, v, log_w, u, state)
    B, T, H, N = r.shape
    dt = _common_dtype(r, k, v)
    r, k, v = r.to(dt), k.to(dt), v.to(dt)
    log_w = log_w.float().expand(B, T, H, N)
    k, v, log_w = _masked(mask, k, v, log_w)
    h0 = None if state is None else state.float().contiguous()
    o, ht = chunk_rwkv6(
        r.contiguous(),
        k.contiguous(),
        v.contiguous(),
        log_w.contiguous(),
        u.to(dt).expand(H, N).contiguous(),
        scale=1.0,
        initial_state=h0,
        output_final_state=True,
    )
    return o.float(), ht.float()


def wkv7_fla(
    r: Tensor,
    log_w: Tensor,
    k: Tensor,
    v: Tensor,
    a: Tensor,
    b: Tensor,
    state: Optional[Tensor],
    mask: Optional[Tensor] = None,
    lower_bound: Optional[float] = RWKV7_LOG_W_MIN,
) -> Tuple[Tensor, Tensor]:
    """RWKV-7 through fla's `chunk_rwkv7`; state S[value, key] as in `wkv7_recurrent`.

    `lower_bound`: a number <= every log_w (RWKV-7's own decay guarantees the default); pass None for
    arbitrary decays, which makes fla use its slower, always-safe 16-token chunks.
    """
    _require_fla()
    if _one_token(r, state, mask):
        return wkv7_fla_step(r, log_w, k, v, a, b, state)
    dt = _common_dtype(r, k, v, a, b)
    r, k, v, a, b = (x.to(dt) for x in (r, k, v, a, b))
    log_w = log_w.float()
    k, v, a, b, log_w = _masked(mask, k, v, a, b, log_w)
    h0 = None if state is None else state.float().transpose(-1, -2).contiguous()  # -> [B, H, key, value]
    kwargs = {}
    if lower_bound is not None:
        kwargs = dict(safe_gate=True, lower_bound=lower_bound, chunk_size=64)
    o, ht = chunk_rwkv7(
        r.contiguous(),
        log_w.contiguous(),
        k.contiguous(),
        v.contiguous(),
        a.contiguous(),
        b.contiguous(),
        scale=1.0,
        initial_state=h0,
        output_final_state=True,
        **kwargs,
    )
    return o.float(), ht.float().transpose(-1, -2).contiguous()


def wkv5_fla_step(r: Tensor, k: Tensor, v: Tensor, log_w: Tensor, u: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
    """One RWKV-5/6 token per row ([B, 1, H, N] inputs, no mask) through fla's `fused_recurrent_rwkv6`
    (inference only). Same contract as `wkv5_recurrent`; fla's state layout [B, H, key, value] is ours."""
    _require_fla()
    B, T, H, N = r.shape
    dt = _common_dtype(r, k, v)
    o, ht = fused_recurrent_rwkv6(
        r.to(dt),
        k.to(dt),
        v.to(dt),
        log_w.float().expand(B, T, H, N),
        u.float().expand(H, N),  # the bonus stays fp32, as in the recurrence (the kernel reads each in its dtype)
        scale=1.0,
        initial_state=state.float(),
        output_final_state=True,
    )
    return o.float(), ht.float()


def wkv7_fla_step(r: Tensor, log_w: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
    """One RWKV-7 token per row ([B, 1, H, N] inputs, no mask) as a single fused kernel, fla's
    `fused_recurrent_rwkv7` (inference only: it has no backward). Same contract as `wkv7_recurrent`;
    the new state is returned as a transposed view of fla's [B, H, key, value] state, which the next
    step's transpose turns back into the contiguous tensor without a copy."""
    _require_fla()
    dt = _common_dtype(r, k, v, a, b)
    r, k, v, a, b = (x.to(dt) for x in (r, k, v, a, b))
    o, ht = fused_recurrent_rwkv7(
        r,
        log_w.float(),
        k,
        v,
        a,
        b,
        scale=1.0,
        initial_state=state.float().transpose(-1, -2),
        output_final_state=True,
    )
    return o.float(), ht.transpose(-1, -2)
