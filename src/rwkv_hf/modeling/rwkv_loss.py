"""The causal-LM loss without a [tokens, vocab] logits tensor.

`linear_cross_entropy(hidden, weight, targets)` is `cross_entropy((hidden @ weight.T).float(), targets)`
(the LM head, the fp32 upcast and the loss, as transformers' `ForCausalLMLoss` computes them) in chunks
of tokens, each chunk's gradients computed while its logits exist, so neither the logits nor their
fp32 copy nor their gradient is ever held for the whole batch: at 4 x 2048 tokens and a 65,536-token
vocabulary that is about 5 GiB less at the peak of a training step. (The same idea as fla's
`FusedLinearCrossEntropyLoss` and Liger's kernel, in plain PyTorch.)
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk


def shifted_targets(labels: Optional[Tensor], shift_labels: Optional[Tensor], ignore_index: int = -100) -> Tensor:
    """Position t predicts token t + 1: `labels` shifted left (the last position predicts nothing), or
    `shift_labels` as given. Flattened to [B * T]."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, divisor, ignore_index: int, chunk: int):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s : s + chunk], targets[s : s + chunk]
            valid = t != ignore_index
            t = torch.where(valid, t, torch.zeros_like(t))
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, -1)
            total += ((lse - logits.gather(1, t[:, None])[:, 0]) * valid).sum()
            if grad_h is None and grad_w is None:
                continue
            # d(sum of losses)/d logits = softmax - one-hot, zero where the target is ignored
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), t] -= 1
            g = (g * valid[:, None]).to(hidden.dtype)
            if grad_h is not None:
                grad_h[s : s + chunk] = g @ weight
            if grad_w is not None:
                grad_w.addmm_(g.T.float(), h.float()) if hidden.dtype == torch.float32 else grad_w.add_(g.T @ h)
        divisor = divisor.to(total.device) if torch.is_tensor(divisor) else divisor
        ctx.divisor = divisor
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / divisor

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.divisor
        gh = None if grad_h is None else grad_h * scale.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * scale).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    num_items_in_batch: Optional[Union[int, Tensor]] = None,
    ignore_index: int = -100,
    chunk: Optional[int] = None,
) -> Tensor:
    """Mean cross-entropy of `hidden [N, C] @ weight.T` against `targets [N]` (ignoring `ignore_index`),
    or the sum divided by `num_items_in_batch` when given (transformers' Trainer under gradient
    accumulation). `chunk`: tokens per chunk (default: 256 MiB of fp32 logits)."""
    chunk = chunk or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    targets = targets.to(hidden.device)
    divisor = num_items_in_batch if num_items_in_batch is not None else (targets != ignore_index).sum()
    return _LinearCrossEntropy.apply(hidden, weight, targets, divisor, ignore_index, chunk)
