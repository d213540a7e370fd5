"""RWKV-4 World, in the reference package's words (`rwkv/model.py`, att_seq/ffn_seq, version 4).

Time mix, for each token (x_prev: the previous token's ln1 output):
    xk = x * time_mix_k + x_prev * (1 - time_mix_k)   (same for v, r)
    r = sigmoid(xr R);  k = xk K;  v = xv V
    wkv_t = (sum_{i<t} e^{-(t-1-i) e^{time_decay} + k_i} v_i + e^{time_first + k_t} v_t)
          / (the same with v = 1)                       per channel, kept overflow-free as (aa, bb, pp)
    out = (r * wkv) O
Channel mix: r = sigmoid(xr R);  out = r * (relu(xk K)^2 V).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import GenerationMixin

from .configuration_rwkv4 import Rwkv4Config
from .rwkv_common import FP32_PARAMS, RwkvForCausalLMBase, RwkvModelBase, mix, relu_square, rescale, token_shift
from .rwkv_ops import wkv4

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
from .rwkv7_deepembed import deep_embed_gate  # noqa: F401,E402


class Rwkv4TimeMix(nn.Module):
    def __init__(self, config: Rwkv4Config, layer_id: int):
        super().__init__()
        C, A = config.hidden_size, config.attention_hidden_size
        self.attention_size = A
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.time_decay = nn.Parameter(torch.empty(A))
        self.time_first = nn.Parameter(torch.empty(A))
        self.key = nn.Linear(C, A, bias=False)
        self.value = nn.Linear(C, A, bias=False)
        self.receptance = nn.Linear(C, A, bias=False)
        self.output = nn.Linear(A, C, bias=False)

    def init_parameters(self):
        with torch.no_grad():
            for p in (self.time_mix_k, self.time_mix_v, self.time_mix_r):
                p.fill_(0.5)
            self.time_decay.copy_(torch.linspace(-5, 1, self.attention_size))
            self.time_first.fill_(0.3)

    def zero_wkv(self, batch_size: int, device):
        zeros = torch.zeros(batch_size, self.attention_size, device=device, dtype=torch.float32)
        return (zeros, zeros.clone(), torch.full_like(zeros, -1e30))  # aa, bb, pp

    def forward(self, x, shift, wkv, mask, v_first, mode, scale=1.0):
        prev, shift = token_shift(x, shift, mask)
        r = torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_r)))
        k = self.key(mix(x, prev, self.time_mix_k)).float()
        v = self.value(mix(x, prev, self.time_mix_v)).float()
        log_w = -torch.exp(self.time_decay.float())
        y, wkv = wkv4(log_w, self.time_first.float(), k, v, wkv, mask, mode)
        return self.output(rescale(r * y.to(x.dtype), scale)), shift, wkv, v_first


class Rwkv4ChannelMix(nn.Module):
    """The channel mix of v4 and v5."""

    def __init__(self, config, layer_id: int):
        super().__init__()
        C = config.hidden_size
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        self.key = nn.Linear(C, config.intermediate_size, bias=False)
        self.receptance = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(config.intermediate_size, C, bias=False)

    def init_parameters(self):
        with torch.no_grad():
            self.time_mix_k.fill_(0.5)
            self.time_mix_r.fill_(0.5)

    def forward(self, x, shift, mask, scale=1.0):
        prev, shift = token_shift(x, shift, mask)
        r = torch.sigmoid(self.receptance(mix(x, prev, self.time_mix_r)))
        k = relu_square(self.key(mix(x, prev, self.time_mix_k)))
        return r * self.value(rescale(k, scale)), shift


class Rwkv4Model(RwkvModelBase):
    config_class = Rwkv4Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    time_mix_cls = Rwkv4TimeMix
    channel_mix_cls = Rwkv4ChannelMix


class Rwkv4ForCausalLM(RwkvForCausalLMBase, GenerationMixin):
    config_class = Rwkv4Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    model_cls = Rwkv4Model
