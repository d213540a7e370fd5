"""RWKV-7 "Goose" (x070), in the reference package's words (`rwkv/model.py`, RWKV_x070_TMix/CMix).

Time mix, for each token, with xx = x_prev - x:
    xr, xw, xk, xv, xa, xg = x + xx * (x_r, x_w, x_k, x_v, x_a, x_g)
    r = xr R;  k = xk K;  v = xv V
    w = exp(-0.606531 * sigmoid(w0 + tanh(xw w1) w2))        decay, in (0.545, 1)
    a = sigmoid(a0 + (xa a1) a2)                             in-context learning rate
    g = sigmoid(xg g1) g2                                    output gate
    kk = normalize_per_head(k * k_k);  k = k * (1 + (a - 1) * k_a)
    v = v_first (layer 0), else v + (v_first - v) * sigmoid(v0 + (xv v1) v2)
    S = S diag(w) + S (-kk)^T (kk * a) + v^T k;  y = S r    (per head, S is [value, key])
    y = GroupNorm_H(y) + sum_head(r * k * r_k) * v
    out = (y * g) O
Channel mix: k = x + xx * x_k;  out = relu(k K)^2 V   (DeepEmbed checkpoints gate relu(k K)^2 with a
per-token embedding: rwkv7_deepembed).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import GenerationMixin
import torch.nn.functional as F

from .configuration_rwkv7 import Rwkv7Config
from .rwkv_common import DECAY_SCALE, RwkvForCausalLMBase, RwkvModelBase, relu_square, rescale, token_shift
from .rwkv7_deepembed import add_deep_embed_params, deep_embed_gate, init_deep_embed_params
from .rwkv_ops import wkv7

# transformers 4.57 copies into its module cache only the files that a local folder's model file imports
# directly, so every sibling this model needs (also through rwkv_ops) is imported here by name.
from .configuration_rwkv_base import RwkvWorldConfigBase  # noqa: F401,E402
from .rwkv7_chunk import wkv7_chunk  # noqa: F401,E402
from .rwkv_chunk import wkv5_chunk  # noqa: F401,E402
from .rwkv_decode import graph_step  # noqa: F401,E402
from .rwkv_step import model_step  # noqa: F401,E402
from .rwkv_fla import HAVE_FLA  # noqa: F401,E402
from .rwkv_loss import linear_cross_entropy  # noqa: F401,E402
from .rwkv_peft import register_lora_targets  # noqa: F401,E402
from .rwkv_state import RwkvStateMixin  # noqa: F401,E402



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

    def forward(self, x, shift, wkv, mask, v_first, mode, scale=1.0):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev, shift = token_shift(x, shift, mask)
        xx = prev - x
        # x + xx * x_r, ...: addcmul makes one pass over memory instead of two
        xr, xw, xk, xv, xa, xg = (torch.addcmul(x, xx, m) for m in (self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g))

        # (each mix is dropped once used: with long inputs these [B, T, C] temporaries set the peak memory)
        r = self.receptance(xr)
        w = torch.tanh(xw @ self.w1) @ self.w2
        k = self.key(xk)
        v = self.value(xv)
        a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)
        g = torch.sigmoid(xg @ self.g1) @ self.g2
        del xr, xw, xk, xa, xg, xx, prev

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0).view(B, T, C)
        k = k * (1 + (a - 1) * self.k_a)
        if self.layer_id == 0:
            v_first = v
        else:
            v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
        del xv
        log_w = -DECAY_SCALE * torch.sigmoid((self.w0 + w).float())
        del w

        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, wkv = wkv7(heads(r), heads(log_w), heads(k), heads(v), heads(-kk), heads(kk * a), wkv, mask, mode)
        y = self.ln_x(y.to(x.dtype).reshape(B * T, C)).view(B, T, C)
        y = y + ((heads(r) * heads(k) * self.r_k).sum(dim=-1, keepdim=True) * heads(v)).view(B, T, C)
        return self.output(rescale(y * g, scale)), shift, wkv, v_first


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

    def forward(self, x, shift, mask, scale=1.0, deep=None):
        prev, shift = token_shift(x, shift, mask)
        k = torch.addcmul(x, prev - x, self.x_k)  # x + (x_prev - x) * x_k
        k = relu_square(self.key(k))
        if deep is not None:  # DeepEmbed: k * ((x s1) e s2 + s0), see rwkv7_deepembed
            k = k * deep_embed_gate(self, x, deep)
        return self.value(rescale(k, scale)), shift


class Rwkv7Model(RwkvModelBase):
    config_class = Rwkv7Config
    time_mix_cls = Rwkv7TimeMix
    channel_mix_cls = Rwkv7ChannelMix


class Rwkv7ForCausalLM(RwkvForCausalLMBase, GenerationMixin):
    config_class = Rwkv7Config
    model_cls = Rwkv7Model
