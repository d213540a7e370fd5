"""Every version's one-token step as one pure function per layer: for decoding, on CPU and compiled on CUDA.

The eager one-token forward goes through ~15 modules and ~70 small ops per layer. This file writes the
same step (each version's equations, see the docstring of its `modeling_rwkvN.py`) as one function of
plain tensors per layer:

- off CUDA, decode steps call it as it is: the same ops without the per-module overhead;
- with config `compile_decode`, it runs under torch.compile, so that inductor fuses each chain of
  elementwise work into the kernel around it: the token-shift mixes go into the matrix-vector
  products that consume them; at small batch each product `x W^T` is a multiply-and-sum over K, which
  inductor turns into a reduction kernel reading W once near the memory bandwidth (cuBLAS's batch-1
  GEMV reaches about half of it at these sizes); at larger batch it stays a matmul (tensor cores).
  On CUDA `rwkv_decode.RwkvGraphDecoder` then captures the whole step in one CUDA graph.

A layer step takes (x [B, C], v_first, state, params, first, reduce, consts) and returns (x, v_first):
`state` is the layer's (att_shift, wkv, ffn_shift) from an RwkvCache, updated in place; `params` a dict
of the block's tensors (views, no copies: a captured graph reads the parameters' own memory);
`first`: layer 0; `consts`: Python numbers (eps...) and the v5 sub-version. v_first is RWKV-7's.
Each is tested against the recurrent path (`tests/test_models.py`, `tests/test_gpu.py`).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F

from .rwkv_common import DECAY_SCALE, mix, relu_square

Tensor = torch.Tensor
# on CUDA, batches up to this size compute x W^T as a reduction (memory bound); larger ones, and CPU, a matmul
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


def _wkv5_step(r, k, v, decay, u, S):
    """RWKV-5/6, one token, fp32: r, k, v [B, H, N]; decay (w), u broadcastable to [B, H, N]; S [B, H, key, value].
    y = r (S + diag(u) k^T v);  S <- diag(w) S + k^T v (in place). Returns y [B, H, N]."""
    a = k.unsqueeze(-1) * v.unsqueeze(-2)
    y = (r.unsqueeze(-1) * (u.unsqueeze(-1) * a + S)).sum(-2)
    S.copy_(a + decay.unsqueeze(-1) * S)
    return y


def _group_norm_fp32(y: Tensor, H: int, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return F.group_norm(y.float(), H, w.float(), b.float(), eps)


def _ffn_v4(h2, ffn_shift, p, reduce):
    """The channel mix of v4 and v5: sigmoid(xr R) * (relu(xk K)^2 V)."""
    r = torch.sigmoid(_lin(mix(h2, ffn_shift, p["ffn.time_mix_r"]), p["ffn.receptance.weight"], reduce))
    k = relu_square(_lin(mix(h2, ffn_shift, p["ffn.time_mix_k"]), p["ffn.key.weight"], reduce))
    return r * _lin(k, p["ffn.value.weight"], reduce)


# ----------------------------------------------------------------------------------------------- v4
def layer_step_v4(x, v_first, state, p, first: bool, reduce: bool, consts) -> Tuple[Tensor, Tensor]:
    eps = consts[0]
    att_shift, (aa, bb, pp), ffn_shift = state
    C = x.shape[1]
    h = F.layer_norm(x, (C,), p["ln1.weight"], p["ln1.bias"], eps)
    r = torch.sigmoid(_lin(mix(h, att_shift, p["att.time_mix_r"]), p["att.receptance.weight"], reduce))
    k = _lin(mix(h, att_shift, p["att.time_mix_k"]), p["att.key.weight"], reduce).float()
    v = _lin(mix(h, att_shift, p["att.time_mix_v"]), p["att.value.weight"], reduce).float()
    att_shift.copy_(h)
    log_w, u = -torch.exp(p["att.time_decay"].float()), p["att.time_first"].float()
    # the reference's overflow-free form (see rwkv_ops.wkv4_recurrent)
    ww = u + k
    q = torch.maximum(pp, ww)
    e1, e2 = torch.exp(pp - q), torch.exp(ww - q)
    y = (e1 * aa + e2 * v) / (e1 * bb + e2)
    ww = log_w + pp
    q = torch.maximum(ww, k)
    e1, e2 = torch.exp(ww - q), torch.exp(k - q)
    aa.copy_(e1 * aa + e2 * v)
    bb.copy_(e1 * bb + e2)
    pp.copy_(q)
    x = x + _lin(r * y.to(x.dtype), p["att.output.weight"], reduce)
    h2 = F.layer_norm(x, (C,), p["ln2.weight"], p["ln2.bias"], eps)
    out = _ffn_v4(h2, ffn_shift, p, reduce)
    ffn_shift.copy_(h2)
    return x + out, v_first


# ----------------------------------------------------------------------------------------------- v5
def layer_step_v5(x, v_first, state, p, first: bool, reduce: bool, consts) -> Tuple[Tensor, Tensor]:
    eps, eps_x, version = consts
    att_shift, S, ffn_shift = state
    B, C = x.shape
    H, N = S.shape[1], S.shape[2]
    h = F.layer_norm(x, (C,), p["ln1.weight"], p["ln1.bias"], eps)
    r = _lin(mix(h, att_shift, p["att.time_mix_r"]), p["att.receptance.weight"], reduce)
    k = _lin(mix(h, att_shift, p["att.time_mix_k"]), p["att.key.weight"], reduce)
    v = _lin(mix(h, att_shift, p["att.time_mix_v"]), p["att.value.weight"], reduce)
    g = None
    if version != "5.0":
        g = F.silu(_lin(mix(h, att_shift, p["att.time_mix_g"]), p["att.gate.weight"], reduce))
    att_shift.copy_(h)
    if version == "5.2":
        decay, u = torch.exp(-torch.exp(p["att.time_decay"].float())), p["att.time_faaaa"].float()
    else:  # one decay per head; u = exp(time_first)
        decay = torch.exp(-torch.exp(p["att.time_decay"].float())).view(H, 1).expand(H, N)
        u = torch.exp(p["att.time_first"].float()).view(H, 1).expand(H, N)
    heads = lambda t: t.float().view(B, H, N)  # noqa: E731
    y = _wkv5_step(heads(r), heads(k), heads(v), decay, u, S)
    y = _group_norm_fp32(y.view(B, C), H, p["att.ln_x.weight"], p["att.ln_x.bias"], eps_x).to(x.dtype)
    if g is not None:
        y = y * g
    x = x + _lin(y, p["att.output.weight"], reduce)
    h2 = F.layer_norm(x, (C,), p["ln2.weight"], p["ln2.bias"], eps)
    out = _ffn_v4(h2, ffn_shift, p, reduce)
    ffn_shift.copy_(h2)
    return x + out, v_first


# ----------------------------------------------------------------------------------------------- v6
def layer_step_v6(x, v_first, state, p, first: bool, reduce: bool, consts) -> Tuple[Tensor, Tensor]:
    eps, eps_x = consts[0], consts[1]
    att_shift, S, ffn_shift = state
    B, C = x.shape
    H, N = S.shape[1], S.shape[2]
    h = F.layer_norm(x, (C,), p["ln1.weight"], p["ln1.bias"], eps)
    sx = att_shift - h
    att_shift.copy_(h)
    w1, w2 = p["att.time_maa_w1"], p["att.time_maa_w2"]  # [C, 5D], [5, D, C]
    lora = torch.tanh(_lora_in(torch.addcmul(h, sx, p["att.time_maa_x"]), w1, reduce)).view(B, 5, -1)
    mw, mk, mv, mr, mg = (_lora_in(lora[:, i], w2[i], reduce) for i in range(5))
    xw = torch.addcmul(h, sx, p["att.time_maa_w"] + mw)
    r = _lin(torch.addcmul(h, sx, p["att.time_maa_r"] + mr), p["att.receptance.weight"], reduce)
    k = _lin(torch.addcmul(h, sx, p["att.time_maa_k"] + mk), p["att.key.weight"], reduce)
    v = _lin(torch.addcmul(h, sx, p["att.time_maa_v"] + mv), p["att.value.weight"], reduce)
    g = F.silu(_lin(torch.addcmul(h, sx, p["att.time_maa_g"] + mg), p["att.gate.weight"], reduce))
    dw1 = p["att.time_decay_w1"]  # kept in fp32 with time_decay where the model keeps it so
    w = p["att.time_decay"] + _lora_in(torch.tanh(_lora_in(xw.to(dw1.dtype), dw1, reduce)), p["att.time_decay_w2"], reduce)
    decay = torch.exp(-torch.exp(w.float()))
    heads = lambda t: t.float().view(B, H, N)  # noqa: E731
    y = _wkv5_step(heads(r), heads(k), heads(v), heads(decay), p["att.time_faaaa"].float(), S)
    y = _group_norm_fp32(y.view(B, C), H, p["att.ln_x.weight"], p["att.ln_x.bias"], eps_x).to(x.dtype)
    x = x + _lin(y * g, p["att.output.weight"], reduce)
    h2 = F.layer_norm(x, (C,), p["ln2.weight"], p["ln2.bias"], eps)
    sx = ffn_shift - h2
    ffn_shift.copy_(h2)
    r = torch.sigmoid(_lin(torch.addcmul(h2, sx, p["ffn.time_maa_r"]), p["ffn.receptance.weight"], reduce))
    k = relu_square(_lin(torch.addcmul(h2, sx, p["ffn.time_maa_k"]), p["ffn.key.weight"], reduce))
    return x + r * _lin(k, p["ffn.value.weight"], reduce), v_first


# ----------------------------------------------------------------------------------------------- v7
def layer_step_v7(x, v_first, state, p, first: bool, reduce: bool, consts) -> Tuple[Tensor, Tensor]:
    eps, eps_x = consts[0], consts[1]
    att_shift, S, ffn_shift = state
    B, C = x.shape
    H, N = p["att.r_k"].shape
    h = F.layer_norm(x, (C,), p["ln1.weight"], p["ln1.bias"], eps)
    xx = att_shift - h
    att_shift.copy_(h)
    r = _lin(torch.addcmul(h, xx, p["att.x_r"]), p["att.receptance.weight"], reduce)
    k = _lin(torch.addcmul(h, xx, p["att.x_k"]), p["att.key.weight"], reduce)
    xv = torch.addcmul(h, xx, p["att.x_v"])
    v = _lin(xv, p["att.value.weight"], reduce)
    w = _lora_in(torch.tanh(_lora_in(torch.addcmul(h, xx, p["att.x_w"]), p["att.w1"], reduce)), p["att.w2"], reduce)
    a = torch.sigmoid(p["att.a0"] + _lora_in(_lora_in(torch.addcmul(h, xx, p["att.x_a"]), p["att.a1"], reduce), p["att.a2"], reduce))
    g = _lora_in(torch.sigmoid(_lora_in(torch.addcmul(h, xx, p["att.x_g"]), p["att.g1"], reduce)), p["att.g2"], reduce)

    kk = F.normalize((k * p["att.k_k"]).view(B, H, N), dim=-1, p=2.0).view(B, C)
    k = k * (1 + (a - 1) * p["att.k_a"])
    if first:
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(p["att.v0"] + _lora_in(_lora_in(xv, p["att.v1"], reduce), p["att.v2"], reduce))
    decay = torch.exp(-DECAY_SCALE * torch.sigmoid((p["att.w0"] + w).float())).view(B, H, 1, N)

    # S <- S diag(w) + (S a) b^T + v k^T with a = -kk, b = kk * a;  y = S r   (fp32, S is [value, key])
    rf, kf, vf = r.float().view(B, H, N), k.float().view(B, H, N), v.float().view(B, H, N)
    kkf = kk.float().view(B, H, N)
    sa = (S * (-kkf).unsqueeze(2)).sum(-1, keepdim=True)
    new = S * decay + sa * (kkf * a.float().view(B, H, N)).unsqueeze(2) + vf.unsqueeze(-1) * kf.unsqueeze(2)
    S.copy_(new)
    y = (new * rf.unsqueeze(2)).sum(-1)
    y = F.group_norm(y.to(x.dtype).view(B, C), H, p["att.ln_x.weight"], p["att.ln_x.bias"], eps_x)
    y = y + ((r * k).view(B, H, N) * p["att.r_k"]).sum(-1, keepdim=True).mul(v.view(B, H, N)).view(B, C)
    x = x + _lin(y * g, p["att.output.weight"], reduce)

    h2 = F.layer_norm(x, (C,), p["ln2.weight"], p["ln2.bias"], eps)
    xk = torch.addcmul(h2, ffn_shift - h2, p["ffn.x_k"])
    ffn_shift.copy_(h2)
    return x + _lin(relu_square(_lin(xk, p["ffn.key.weight"], reduce)), p["ffn.value.weight"], reduce), v_first


# ------------------------------------------------------------------------------------------ a model
LAYER_STEPS = {"Rwkv4Model": layer_step_v4, "Rwkv5Model": layer_step_v5, "Rwkv6Model": layer_step_v6, "Rwkv7Model": layer_step_v7}


def layer_step_for(model):
    """The layer step of a causal LM's version, or None where the step cannot run: v4-v6 in fp16 scale
    their branches on the fly (`rescale_every`), which the step functions leave out."""
    body = model.model
    fn = LAYER_STEPS.get(type(body).__name__)
    if fn is None:
        return None
    if fn is not layer_step_v7 and getattr(model.config, "rescale_every", 0) > 0 and body.emb.weight.dtype == torch.float16:
        return None
    return fn


def layer_params(block) -> Dict[str, Tensor]:
    """The tensors of one of our `RwkvBlock`s by name ([1, 1, C] mix vectors as [C] views; no copies)."""
    return {name: (t.view(-1) if t.dim() == 3 and t.shape[:2] == (1, 1) else t)
            for name, t in block.named_parameters() if not name.startswith("ln0.")}


def step_consts(model) -> tuple:
    blk = model.model.blocks[0]
    eps_x = blk.att.ln_x.eps if hasattr(blk.att, "ln_x") else 0.0
    return (blk.ln1.eps, eps_x, getattr(model.config, "rwkv_version", None))


def model_step(model, ids: Tensor, layers_state, layer_fn=None, params=None, reduce=None) -> Tensor:
    """One token per row (ids [B, 1]) through a whole causal LM of ours: logits [B, V]. Updates the
    state tensors of `layers_state` (an RwkvCache's) in place. `layer_fn`: the version's layer step,
    compiled or not (default: the plain one)."""
    body = model.model
    if layer_fn is None:
        layer_fn = LAYER_STEPS[type(body).__name__]
    ln0 = body.blocks[0].ln0
    x = body.emb(ids[:, 0])
    # block 0 normalises the embedding in fp32, as the reference does
    x = F.layer_norm(x.float(), ln0.normalized_shape, ln0.weight.float(), ln0.bias.float(), ln0.eps).to(x.dtype)
    if reduce is None:  # (on CPU, eager or compiled, the matmul is faster: the weights stay in cache-sized tiles)
        reduce = x.is_cuda and x.shape[0] <= REDUCTION_MAX_BATCH
    if params is None:
        params = [layer_params(blk) for blk in body.blocks]
    consts = step_consts(model)
    v_first = x  # RWKV-7: made by layer 0
    for i, (p, state) in enumerate(zip(params, layers_state)):
        x, v_first = layer_fn(x, v_first, state, p, i == 0, reduce, consts)
    return model.lm_head(body.ln_out(x))
