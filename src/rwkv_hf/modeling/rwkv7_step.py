"""RWKV-7's one-token step as one pure function per layer, written for torch.compile (CUDA decoding).

The eager one-token forward of `modeling_rwkv7` is ~70 kernels per layer; replayed from a CUDA graph
that is still ~4.7 ms per step for a 1.5B model, of which the weights take ~1 ms to read. This file
writes the same step (the same equations, see `modeling_rwkv7`'s docstring) as one function of plain
tensors, so that inductor can fuse each chain of elementwise work into the kernel around it:

- the token-shift mixes go into the matrix-vector products that consume them;
- at small batch, each product `x W^T` is a multiply-and-sum over K, which inductor turns into a
  reduction kernel that reads W once at close to the memory bandwidth (cuBLAS's batch-1 GEMV reaches
  about half of it at these sizes); at larger batch it stays a matmul (tensor cores);
- the one-token WKV update, the per-head GroupNorm, the bonus and the gate are a few kernels.

The function is compiled once for layer 0 and once for the other layers (the weights are arguments, so
all layers share the compiled code) and `rwkv_decode.RwkvGraphDecoder` captures the whole step in a
CUDA graph. It is tested against the recurrent path (`tests/test_gpu.py`).
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
DECAY_SCALE = 0.606531
# batches up to this size compute x W^T as a reduction (memory bound); larger ones as a matmul
REDUCTION_MAX_BATCH = 4


def _lin(x: Tensor, w: Tensor, reduce: bool) -> Tensor:
    """x [B, K] @ w[N, K]^T -> [B, N] in x's dtype, accumulated in fp32."""
    if reduce:
        return (x.float().unsqueeze(1) * w.float()).sum(-1).to(x.dtype)
    return x @ w.t()


def _lora_in(x: Tensor, w: Tensor, reduce: bool) -> Tensor:
    """x [B, C] @ w [C, D] -> [B, D] (LoRA matrices are stored input-major)."""
    if reduce:
        return (x.float().unsqueeze(-1) * w.float()).sum(-2).to(x.dtype)
    return x @ w


LAYER_PARAMS = (
    "ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
    "att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g",
    "att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "att.r_k",
    "att.w1", "att.w2", "att.a1", "att.a2", "att.v1", "att.v2", "att.g1", "att.g2",
    "att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
    "att.ln_x.weight", "att.ln_x.bias", "ffn.x_k", "ffn.key.weight", "ffn.value.weight",
)


def layer_params(block) -> List[Tensor]:
    """The tensors `layer_step` takes, in order, from one of our `RwkvBlock`s of RWKV-7 (no copies)."""
    params = dict(block.named_parameters())
    return [params[name].view(-1) if name.startswith(("att.x_", "att.w0", "att.a0", "att.v0", "att.k_k", "att.k_a", "ffn.x_"))
            else params[name] for name in LAYER_PARAMS]


def layer_step(
    x: Tensor, v_first: Tensor, att_shift: Tensor, S: Tensor, ffn_shift: Tensor, params: List[Tensor],
    first: bool, reduce: bool, eps: float, eps_x: float,
) -> Tuple[Tensor, Tensor]:
    """One layer, one token: x [B, C] -> (x, v_first). Updates att_shift [B, C], S [B, H, N, N] (fp32,
    [value, key]) and ffn_shift [B, C] in place. `first`: layer 0 (v_first is made here)."""
    (ln1_w, ln1_b, ln2_w, ln2_b, x_r, x_w, x_k, x_v, x_a, x_g, w0, a0, v0, k_k, k_a, r_k,
     w1, w2, a1, a2, v1, v2, g1, g2, R, K, V, O, lnx_w, lnx_b, fx_k, FK, FV) = params
    B, C = x.shape
    H, N = r_k.shape
    h = F.layer_norm(x, (C,), ln1_w, ln1_b, eps)
    xx = att_shift - h
    att_shift.copy_(h)
    r = _lin(torch.addcmul(h, xx, x_r), R, reduce)
    k = _lin(torch.addcmul(h, xx, x_k), K, reduce)
    xv = torch.addcmul(h, xx, x_v)
    v = _lin(xv, V, reduce)
    w = _lora_in(torch.tanh(_lora_in(torch.addcmul(h, xx, x_w), w1, reduce)), w2, reduce)
    a = torch.sigmoid(a0 + _lora_in(_lora_in(torch.addcmul(h, xx, x_a), a1, reduce), a2, reduce))
    g = _lora_in(torch.sigmoid(_lora_in(torch.addcmul(h, xx, x_g), g1, reduce)), g2, reduce)

    kk = F.normalize((k * k_k).view(B, H, N), dim=-1, p=2.0).view(B, C)
    k = k * (1 + (a - 1) * k_a)
    if first:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(v0 + _lora_in(_lora_in(xv, v1, reduce), v2, reduce))
    decay = torch.exp(-DECAY_SCALE * torch.sigmoid((w0 + w).float())).view(B, H, 1, N)

    # S <- S diag(w) + (S a) b^T + v k^T with a = -kk, b = kk * a;  y = S r   (fp32)
    rf, kf, vf = r.float().view(B, H, N), k.float().view(B, H, N), v.float().view(B, H, N)
    kkf = kk.float().view(B, H, N)
    sa = (S * (-kkf).unsqueeze(2)).sum(-1, keepdim=True)  # [B, H, N(value), 1]
    new = S * decay + sa * (kkf * a.float().view(B, H, N)).unsqueeze(2) + vf.unsqueeze(-1) * kf.unsqueeze(2)
    S.copy_(new)
    y = (new * rf.unsqueeze(2)).sum(-1)  # [B, H, N]
    y = F.group_norm(y.to(x.dtype).view(B, C), H, lnx_w, lnx_b, eps_x)
    y = y + ((r * k).view(B, H, N) * r_k).sum(-1, keepdim=True).mul(v.view(B, H, N)).view(B, C)
    x = x + _lin(y * g, O, reduce)

    h = F.layer_norm(x, (C,), ln2_w, ln2_b, eps)
    xk = torch.addcmul(h, ffn_shift - h, fx_k)
    ffn_shift.copy_(h)
    x = x + _lin(torch.square(torch.relu(_lin(xk, FK, reduce))), FV, reduce)
    return x, v_first


def model_step(model, ids: Tensor, layers_state, layer_fn=layer_step, params=None, reduce=None) -> Tensor:
    """One token per row (ids [B, 1]) through a whole `Rwkv7ForCausalLM`: logits [B, V]. Updates the
    state tensors of `layers_state` (an RwkvCache's) in place. `layer_fn`: `layer_step`, compiled or not."""
    body = model.model
    ln0 = body.blocks[0].ln0
    x = body.emb(ids[:, 0])
    # block 0 normalises the embedding in fp32, as the reference does
    x = F.layer_norm(x.float(), ln0.normalized_shape, ln0.weight.float(), ln0.bias.float(), ln0.eps).to(x.dtype)
    if reduce is None:
        reduce = x.shape[0] <= REDUCTION_MAX_BATCH
    if params is None:
        params = [layer_params(blk) for blk in body.blocks]
    eps, eps_x = body.blocks[0].ln1.eps, body.blocks[0].att.ln_x.eps
    v_first = x  # made by layer 0
    for i, (p, (att_shift, S, ffn_shift)) in enumerate(zip(params, layers_state)):
        x, v_first = layer_fn(x, v_first, att_shift, S, ffn_shift, p, i == 0, reduce, eps, eps_x)
    return model.lm_head(body.ln_out(x))
