"""RWKV-7 "Goose" (x070), in the reference package's words (`rwkv/model.py`, RWKV_x070_TMix/CMix).

Time mix, for each token, with xx = x_prev - x:
    xr, xw, xk, xv, xa, xg = x + xx * (x_r, x_w, x_k, x_v, x_a, x_g)
    r = xr R;  k = xk K;  v = xv V
    w = exp(-0.606531 * sigmoid(w0 + tanh(xw w1) w2))        decay, in (0.545, 1) (see DECAY_SCALE)
    a = sigmoid(a0 + (xa a1) a2)                             in-context learning rate
    g = sigmoid(xg g1) g2                                    output gate
    kk = normalize_per_head(k * k_k);  k = k * (1 + (a - 1) * k_a)
    v = v_first (layer 0), else v + (v_first - v) * sigmoid(v0 + (xv v1) v2)
    S = S diag(w) + S (-kk)^T (kk * a) + v^T k;  y = S r    (per head, S is [value, key])
    y = GroupNorm_H(y) + sum_head(r * k * r_k) * v
    out = (y * g) O
Channel mix: k = x + xx * x_k;  out = relu(k K)^2 V   (DeepEmbed checkpoints gate relu(k K)^2 with a
per-token embedding: rwkv7_deepembed).

`time_mix` and `channel_mix` below are these equations, written once: the modules' forward, every
decode step and the compiled/captured step call them (`rwkv_paths` says which products and which WKV
form they use).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin

from .configuration_rwkv7 import Rwkv7Config
from .rwkv7_chunk import wkv7_chunk
from .rwkv7_deepembed import add_deep_embed_params, deep_embed_gate, init_deep_embed_params
from .rwkv_common import RwkvForCausalLMBase, RwkvModelBase
from .rwkv_fla import wkv7_fla
from .rwkv_helpers import DECAY_SCALE, ModuleCalls, relu_square, rescale, token_shift
from .rwkv_ops import wkv7_recurrent
# transformers 4.57 copies into its module cache only the siblings that a local folder's model file
# imports itself (5.x follows every import): the ones this file needs only through others, by name
from .rwkv_cache import RwkvCache  # noqa: F401
from .rwkv_decode import RwkvGraphDecoder  # noqa: F401
from .rwkv_generate import decode_loop  # noqa: F401
from .rwkv_inputs import check_ids  # noqa: F401
from .rwkv_loss import linear_cross_entropy  # noqa: F401
from .rwkv_paths import pick_path  # noqa: F401
from .rwkv_peft import register_lora_targets  # noqa: F401
from .rwkv_saving import auto_map  # noqa: F401
from .rwkv_state import RwkvStateMixin  # noqa: F401
from .rwkv_triton import HAVE_TRITON  # noqa: F401  (the Triton decode step, which rwkv_decode runs)

WKV_FORMS = {"recurrent": wkv7_recurrent, "chunk": wkv7_chunk, "fla": wkv7_fla}


def time_mix(p, x, shift, S, v_first, mask, form: str, calls=ModuleCalls, scale: float = 1.0):
    """x [B, T, C] (ln1's output); shift [B, C] the previous real token's x; S [B, H, N, N] the WKV
    state; v_first: layer 0's v (None in layer 0, which makes it). `p` holds the layer's parameters
    (`Rwkv7TimeMix`). Returns (out, shift, S, v_first), the state new."""
    B, T, C = x.shape
    H, N = p.r_k.shape
    prev, shift = token_shift(x, shift, mask)
    xx = prev - x
    # x + xx * x_r, ...: addcmul makes one pass over memory instead of two
    xr, xw, xk = torch.addcmul(x, xx, p.x_r), torch.addcmul(x, xx, p.x_w), torch.addcmul(x, xx, p.x_k)
    xv, xa, xg = torch.addcmul(x, xx, p.x_v), torch.addcmul(x, xx, p.x_a), torch.addcmul(x, xx, p.x_g)

    # (each mix is dropped once used: with long inputs these [B, T, C] temporaries set the peak memory)
    r = calls.linear(p.receptance, xr)
    w = calls.lora(torch.tanh(calls.lora(xw, p.w1)), p.w2)
    k = calls.linear(p.key, xk)
    v = calls.linear(p.value, xv)
    a = torch.sigmoid(p.a0 + calls.lora(calls.lora(xa, p.a1), p.a2))
    g = calls.lora(torch.sigmoid(calls.lora(xg, p.g1)), p.g2)
    del xr, xw, xk, xa, xg, xx, prev

    kk = F.normalize((k * p.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
    k = k * (1 + (a - 1) * p.k_a)
    if v_first is None:  # layer 0
        v_first = v
    else:
        v = v + (v_first - v) * torch.sigmoid(p.v0 + calls.lora(calls.lora(xv, p.v1), p.v2))
    del xv
    log_w = -DECAY_SCALE * torch.sigmoid((p.w0 + w).float())
    del w

    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    y, S = WKV_FORMS[form](heads(r), heads(log_w), heads(k), heads(v), heads(-kk), heads(kk * a), S, mask)
    y = calls.norm(p.ln_x, y.to(x.dtype).reshape(B * T, C)).view(B, T, C)
    y = y + ((heads(r) * heads(k) * p.r_k).sum(dim=-1, keepdim=True) * heads(v)).view(B, T, C)
    return calls.linear(p.output, rescale(y * g, scale)), shift, S, v_first


def channel_mix(p, x, shift, mask, calls=ModuleCalls, scale: float = 1.0, deep=None):
    """x [B, T, C] (ln2's output); shift [B, C]. `p`: `Rwkv7ChannelMix`. Returns (out, shift)."""
    prev, shift = token_shift(x, shift, mask)
    k = torch.addcmul(x, prev - x, p.x_k)  # x + (x_prev - x) * x_k
    k = relu_square(calls.linear(p.key, k))
    if deep is not None:  # DeepEmbed: k * ((x s1) e s2 + s0), see rwkv7_deepembed
        k = k * deep_embed_gate(p, x, deep)
    return calls.linear(p.value, rescale(k, scale)), shift


class Rwkv7TimeMix(nn.Module):
    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        C, N = config.hidden_size, config.head_size
        self.n_head, self.head_size = C // N, N
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k", "k_a"):
            setattr(self, name, nn.Parameter(torch.empty(1, 1, C)))
        self.w1, self.w2 = nn.Parameter(torch.empty(C, config.decay_lora)), nn.Parameter(torch.empty(config.decay_lora, C))
        self.a1, self.a2 = nn.Parameter(torch.empty(C, config.a_lora)), nn.Parameter(torch.empty(config.a_lora, C))
        # layer 0 computes v_first and never uses v0/v1/v2, but checkpoints carry them: there they are
        # (saved) buffers, kept for export, not parameters that never get a gradient (DDP would need
        # find_unused_parameters=True)
        for name, shape in (("v0", (1, 1, C)), ("v1", (C, config.v_lora)), ("v2", (config.v_lora, C))):
            if layer_id == 0:
                self.register_buffer(name, torch.zeros(shape))  # (a constant start: not trained, not used)
            else:
                setattr(self, name, nn.Parameter(torch.empty(shape)))
        self.g1, self.g2 = nn.Parameter(torch.empty(C, config.gate_lora)), nn.Parameter(torch.empty(config.gate_lora, C))
        self.r_k = nn.Parameter(torch.empty(self.n_head, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(self.n_head, C, eps=64e-5)

    def init_parameters(self):
        with torch.no_grad():
            for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "k_a"):
                getattr(self, name).fill_(0.5)
            self.w0.fill_(-1.0)
            self.a0.zero_()
            self.k_k.fill_(0.85)
            for p in (self.w1, self.a1, self.g1, self.w2, self.a2, self.g2, self.r_k):
                nn.init.normal_(p, std=0.02)
            if self.layer_id > 0:
                self.v0.fill_(1.0)
                nn.init.normal_(self.v1, std=0.02)
                nn.init.normal_(self.v2, std=0.02)
            else:  # layer 0's buffers
                for t in (self.v0, self.v1, self.v2):
                    t.zero_()

    def zero_wkv(self, batch_size: int, device) -> torch.Tensor:
        return torch.zeros(batch_size, self.n_head, self.head_size, self.head_size, device=device, dtype=torch.float32)

    def forward(self, x, shift, wkv, mask, v_first, form, scale=1.0, calls=ModuleCalls):
        return time_mix(self, x, shift, wkv, v_first, mask, form, calls, scale)


class Rwkv7ChannelMix(nn.Module):
    def __init__(self, config: Rwkv7Config, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.x_k = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, config.intermediate_size, bias=False)
        self.value = nn.Linear(config.intermediate_size, C, bias=False)
        add_deep_embed_params(self, config)  # DeepEmbed checkpoints only (config deep_embed_size)

    def init_parameters(self):
        with torch.no_grad():
            self.x_k.fill_(0.5)
        init_deep_embed_params(self)

    def forward(self, x, shift, mask, scale=1.0, deep=None, calls=ModuleCalls):
        return channel_mix(self, x, shift, mask, calls, scale, deep)


class Rwkv7Model(RwkvModelBase):
    config_class = Rwkv7Config
    time_mix_cls = Rwkv7TimeMix
    channel_mix_cls = Rwkv7ChannelMix


class Rwkv7ForCausalLM(RwkvForCausalLMBase, GenerationMixin):
    config_class = Rwkv7Config
    model_cls = Rwkv7Model
