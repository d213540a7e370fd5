"""RWKV-6 "Finch" World (x060), in the reference package's words (`rwkv/model.py`, att_*_v6_0, ffn_*_v6).

Time mix, for each token, with sx = x_prev - x and a data-dependent token shift:
    m_w, m_k, m_v, m_r, m_g = tanh((x + sx * time_maa_x) W1) W2          (five LoRAs, width mix_lora)
    x* = x + sx * (time_maa_* + m_*)                                      for * in w, k, v, r, g
    r = xr R;  k = xk K;  v = xv V;  g = silu(xg G)
    w = exp(-exp(time_decay + tanh(xw D1) D2))                           per channel, per token
    y = r (S + diag(u) k^T v);  S = diag(w) S + k^T v;   u = time_faaaa   (S is [key, value])
    out = (GroupNorm_H(y) * g) O
Channel mix: xk = x + sx * time_maa_k, xr likewise;  out = sigmoid(xr R) * (relu(xk K)^2 V).

`time_mix` and `channel_mix` below are these equations, written once: the modules' forward, every
decode step and the compiled/captured step call them (`rwkv_paths` says which products and which WKV
form they use).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin

from .configuration_rwkv6 import Rwkv6Config
from .rwkv_chunk import wkv5_chunk
from .rwkv_common import FP32_PARAMS, RwkvForCausalLMBase, RwkvModelBase
from .rwkv_fla import wkv5_fla
from .rwkv_helpers import ModuleCalls, group_norm_fp32, relu_square, rescale, token_shift
from .rwkv_ops import wkv5_recurrent
# transformers 4.57 copies into its module cache only the siblings that a local folder's model file
# imports itself (5.x follows every import): the ones this file needs only through others, by name
from .rwkv7_deepembed import deep_embed_gate  # noqa: F401
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

WKV_FORMS = {"recurrent": wkv5_recurrent, "chunk": wkv5_chunk, "fla": wkv5_fla}


def time_mix(p, x, shift, S, v_first, mask, form: str, calls=ModuleCalls, scale: float = 1.0):
    """x [B, T, C] (ln1's output); shift [B, C] the previous real token's x; S [B, H, N, N] the WKV
    state. `p` holds the layer's parameters (`Rwkv6TimeMix`). Returns (out, shift, S, v_first)."""
    B, T, C = x.shape
    H, N = p.time_faaaa.shape
    prev, shift = token_shift(x, shift, mask)
    sx = prev - x
    lora = torch.tanh(calls.lora(torch.addcmul(x, sx, p.time_maa_x), p.time_maa_w1))
    # the five second stages in one batched product, as the reference does: [5, B*T, D] @ [5, D, C]
    lora = calls.lora(lora.view(B * T, 5, -1).transpose(0, 1), p.time_maa_w2)
    mw, mk, mv, mr, mg = lora.view(5, B, T, C).unbind(0)
    xw = torch.addcmul(x, sx, p.time_maa_w + mw)  # x + sx * (time_maa_w + mw), in one pass
    xk = torch.addcmul(x, sx, p.time_maa_k + mk)
    xv = torch.addcmul(x, sx, p.time_maa_v + mv)
    xr = torch.addcmul(x, sx, p.time_maa_r + mr)
    xg = torch.addcmul(x, sx, p.time_maa_g + mg)

    r, k, v = calls.linear(p.receptance, xr), calls.linear(p.key, xk), calls.linear(p.value, xv)
    g = F.silu(calls.linear(p.gate, xg))
    # the decay LoRA is in the model's dtype, as in the reference (FP32_PARAMS takes whole names only);
    # the cast keeps a LoRA that a user upcast working
    lora_w = p.time_decay_w1
    w = p.time_decay + calls.lora(torch.tanh(calls.lora(xw.to(lora_w.dtype), lora_w)), p.time_decay_w2)
    log_w = -torch.exp(w.float())

    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    y, S = WKV_FORMS[form](heads(r), heads(k), heads(v), heads(log_w), p.time_faaaa.float(), S, mask)
    y = group_norm_fp32(p.ln_x, y.reshape(B, T, C)).to(x.dtype)
    return calls.linear(p.output, rescale(y * g, scale)), shift, S, v_first


def channel_mix(p, x, shift, mask, calls=ModuleCalls, scale: float = 1.0, deep=None):
    """x [B, T, C] (ln2's output); shift [B, C]. `p`: `Rwkv6ChannelMix`. Returns (out, shift)."""
    prev, shift = token_shift(x, shift, mask)
    sx = prev - x
    r = torch.sigmoid(calls.linear(p.receptance, torch.addcmul(x, sx, p.time_maa_r)))
    k = relu_square(calls.linear(p.key, torch.addcmul(x, sx, p.time_maa_k)))
    return r * calls.linear(p.value, rescale(k, scale)), shift


class Rwkv6TimeMix(nn.Module):
    def __init__(self, config: Rwkv6Config, layer_id: int):
        super().__init__()
        C, N = config.hidden_size, config.head_size
        H = C // N
        self.n_head, self.head_size = H, N
        for name in ("x", "w", "k", "v", "r", "g"):
            setattr(self, "time_maa_" + name, nn.Parameter(torch.empty(1, 1, C)))
        self.time_maa_w1 = nn.Parameter(torch.empty(C, 5 * config.mix_lora))
        self.time_maa_w2 = nn.Parameter(torch.empty(5, config.mix_lora, C))
        self.time_decay = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay_w1 = nn.Parameter(torch.empty(C, config.decay_lora))
        self.time_decay_w2 = nn.Parameter(torch.empty(config.decay_lora, C))
        self.time_faaaa = nn.Parameter(torch.empty(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def init_parameters(self):
        with torch.no_grad():
            for name in ("x", "w", "k", "v", "r", "g"):
                getattr(self, "time_maa_" + name).fill_(0.5)
            self.time_decay.copy_(torch.linspace(-5, 1, self.time_decay.numel()).view_as(self.time_decay))
            self.time_faaaa.fill_(0.3)
            for p in (self.time_maa_w1, self.time_maa_w2, self.time_decay_w1, self.time_decay_w2):
                nn.init.normal_(p, std=0.02)

    def zero_wkv(self, batch_size: int, device):
        return torch.zeros(batch_size, self.n_head, self.head_size, self.head_size, device=device, dtype=torch.float32)

    def forward(self, x, shift, wkv, mask, v_first, form, scale=1.0, calls=ModuleCalls):
        return time_mix(self, x, shift, wkv, v_first, mask, form, calls, scale)


class Rwkv6ChannelMix(nn.Module):
    def __init__(self, config: Rwkv6Config, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.time_maa_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_maa_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, config.intermediate_size, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.intermediate_size, C, bias=False)

    def init_parameters(self):
        with torch.no_grad():
            self.time_maa_k.fill_(0.5)
            self.time_maa_r.fill_(0.5)

    def forward(self, x, shift, mask, scale=1.0, deep=None, calls=ModuleCalls):
        return channel_mix(self, x, shift, mask, calls, scale)


class Rwkv6Model(RwkvModelBase):
    config_class = Rwkv6Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    time_mix_cls = Rwkv6TimeMix
    channel_mix_cls = Rwkv6ChannelMix


class Rwkv6ForCausalLM(RwkvForCausalLMBase, GenerationMixin):
    config_class = Rwkv6Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    model_cls = Rwkv6Model
