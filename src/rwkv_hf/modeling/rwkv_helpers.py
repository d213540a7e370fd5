"""The small pieces every version's equations are built from, and the three ways to run a layer's
matrix products. A leaf: it imports only torch.

`ModuleCalls`, `DirectCalls` and `ReduceCalls` let one statement of a version's math (the `time_mix`
and `channel_mix` functions of each `modeling_rwkvN.py`) serve every path (`rwkv_paths` picks one):

- `ModuleCalls` calls the `nn.Linear`/`nn.LayerNorm` modules themselves, so that forward hooks, PEFT
  adapters and quantized layers take part (training, prefill, anything unusual);
- `DirectCalls` applies the same functions to the modules' weights without `nn.Module.__call__`
  (decode steps: the same ops, without the per-module overhead, also inside a captured CUDA graph);
- `ReduceCalls` computes each `x W^T` of a small batch as a multiply-and-sum in fp32, which
  torch.compile turns into one reduction kernel reading W once near the memory bandwidth (cuBLAS's
  batch-1 GEMV reaches about half of it at these sizes); for the compiled decode step on CUDA.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor

# RWKV-7's decay: BlinkDL writes log w = -exp(-softplus(-z) - 0.5). Since softplus(-z) = -log(sigmoid(z)),
# exp(-softplus(-z)) = sigmoid(z), so log w = -exp(-0.5) * sigmoid(z) = -0.606531 * sigmoid(z): every
# decay w lies in (exp(-0.606531), 1) = (0.545, 1).
DECAY_SCALE = 0.606531
RWKV7_LOG_W_MIN = -DECAY_SCALE  # <= every RWKV-7 log w: the bound the chunked forms are told (rwkv7_chunk, rwkv_fla)


def exporting() -> bool:
    """True while torch.onnx.export, torch.export or torch.jit.trace record the model.

    A recorded graph must hold for every input, not only for the example it was recorded with, so
    then the WKV runs as the plain recurrence with its time loop kept in the graph (`rwkv_ops`), and
    nothing branches on tensor values (see `rwkv_inputs`).

    torch.export's flag is read itself, not through `torch.compiler.is_exporting()`: up to torch 2.12,
    torch.compile's tracer answers that call True in every compiled function, which put a compiled
    decode step's one-token WKV in an exported graph's loop (torch 2.11, H200, 1.5B RWKV-7: 623
    kernels a step instead of 557)."""
    flag = getattr(torch.compiler, "_is_exporting_flag", None)
    export = torch.compiler.is_exporting() if flag is None else flag
    return export or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def token_shift(x: Tensor, prev: Tensor, mask: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The token shift: for each position, the vector of the previous *real* token.

    x [B, T, C]; prev [B, C] is the last real token before this chunk (from the state).
    Returns (shifted [B, T, C], the new prev [B, C]). Masked positions are skipped: the shift
    carries the last real token's vector across them, so they change nothing.
    """
    if mask is None:
        if x.shape[1] == 1:  # decoding: the previous token is the state's vector
            return prev.unsqueeze(1), x[:, 0]
        return torch.cat([prev.unsqueeze(1), x[:, :-1]], dim=1), x[:, -1]
    B, T, C = x.shape
    pos = torch.arange(1, T + 1, device=x.device).expand(B, T)
    if exporting():  # ONNX has no cummax: the position of the n-th real token, n = real tokens up to t
        real = mask.long()
        n = real.cumsum(1)
        nth = torch.zeros(B, T + 1, dtype=pos.dtype, device=x.device).scatter(1, n * real, pos * real)
        last_incl, last_excl = torch.gather(nth, 1, n), torch.gather(nth, 1, n - real)
    else:
        last_incl = torch.cummax(torch.where(mask, pos, torch.zeros_like(pos)), dim=1).values  # 0 = from state
        last_excl = F.pad(last_incl[:, :-1], (1, 0))
    ext = torch.cat([prev.unsqueeze(1), x], dim=1)  # index 0 is the state's vector
    shifted = torch.gather(ext, 1, last_excl.unsqueeze(-1).expand(B, T, C))
    new_prev = torch.gather(ext, 1, last_incl[:, -1:].unsqueeze(-1).expand(B, 1, C)).squeeze(1)
    return shifted, new_prev


def mix(x: Tensor, prev: Tensor, coeff: Tensor) -> Tensor:
    """The v4/v5 token-shift interpolation: x * coeff + x_prev * (1 - coeff)."""
    return torch.addcmul(x * coeff, prev, 1 - coeff)


def relu_square(x: Tensor) -> Tensor:
    """relu(x)^2 of the channel mixes (relu in place on a fresh matmul output; square is x * x, faster than
    pow). Where a gradient is wanted, `_ReluSquare`: the same numbers, less kept for the backward pass."""
    if x.requires_grad and torch.is_grad_enabled() and not exporting():
        return _ReluSquare.apply(x)
    return torch.square(torch.relu_(x))


class _ReluSquare(torch.autograd.Function):
    """relu(x)^2, whose backward needs only its output y: d/dx = 2 relu(x) = 2 sqrt(y). The channel
    mix's next product keeps y as its input anyway, so this keeps nothing more; autograd's own form
    also keeps relu(x), [tokens, 4C] a layer (8 x C bytes a token in bf16: `benchmarks/activations.py`).
    (sqrt(y) is relu(x) up to y's rounding and the root's, so the gradient can move by an ulp or two.)"""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        y = torch.square(torch.relu(x))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (y,) = ctx.saved_tensors
        return grad * y.sqrt() * 2


def rescale(x: Tensor, scale: float) -> Tensor:
    """x * scale, skipped when the scale is 1 (always, except v4-v6 in fp16)."""
    return x if scale == 1.0 else x * scale


def group_norm_fp32(norm: nn.GroupNorm, y: Tensor) -> Tensor:
    """v5/v6 `ln_x` of y [B, T, C]: the reference keeps its parameters and the WKV output in fp32 for it."""
    B, T, C = y.shape
    out = F.group_norm(y.reshape(B * T, C).float(), norm.num_groups, norm.weight.float(), norm.bias.float(), norm.eps)
    return out.view(B, T, C)


def layer_norm_fp32(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """Block 0's ln0 of the embedding: the reference normalises it in fp32 before casting it back."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)


# --------------------------------------------------------------------------- how products are run
class ModuleCalls:
    """Through the modules (hooks, adapters and quantized layers take part)."""

    @staticmethod
    def linear(layer: nn.Module, x: Tensor) -> Tensor:
        return layer(x)

    @staticmethod
    def lora(x: Tensor, w: Tensor) -> Tensor:
        """x [..., C] @ w [C, D] (LoRA matrices are stored input-major); w [K, C, D] with x [K, N, C]: a
        batched product."""
        return x @ w

    @staticmethod
    def norm(layer: nn.Module, x: Tensor) -> Tensor:
        return layer(x)


class DirectCalls(ModuleCalls):
    """The same functions on the modules' weights, without `nn.Module.__call__` (plain modules only)."""

    @staticmethod
    def linear(layer: nn.Linear, x: Tensor) -> Tensor:
        return F.linear(x, layer.weight)

    @staticmethod
    def norm(layer: nn.Module, x: Tensor) -> Tensor:
        if isinstance(layer, nn.GroupNorm):
            return F.group_norm(x, layer.num_groups, layer.weight, layer.bias, layer.eps)
        return F.layer_norm(x, layer.normalized_shape, layer.weight, layer.bias, layer.eps)


class ReduceCalls(DirectCalls):
    """Products as multiply-and-sum in fp32 (under torch.compile: GEMV-like reduction kernels)."""

    @staticmethod
    def linear(layer: nn.Linear, x: Tensor) -> Tensor:
        return (x.float().unsqueeze(-2) * layer.weight.float()).sum(-1).to(x.dtype)

    @staticmethod
    def lora(x: Tensor, w: Tensor) -> Tensor:
        """x [..., C] @ w [..., C, D], batch dimensions of w (RWKV-6's five stacked LoRAs) included."""
        return (x.float().unsqueeze(-1) * w.float().unsqueeze(-3)).sum(-2).to(x.dtype)
