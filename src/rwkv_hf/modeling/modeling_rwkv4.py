"""RWKV-4 World, in the reference package's words (`rwkv/model.py`, att_seq/ffn_seq, version 4).

Time mix, for each token (x_prev: the previous token's ln1 output):
    xk = x * time_mix_k + x_prev * (1 - time_mix_k)   (same for v, r)
    r = sigmoid(xr R);  k = xk K;  v = xv V
    wkv_t = (sum_{i<t} e^{-(t-1-i) e^{time_decay} + k_i} v_i + e^{time_first + k_t} v_t)
          / (the same with v = 1)                       per channel, kept overflow-free as (aa, bb, pp)
    out = (r * wkv) O
Channel mix: r = sigmoid(xr R);  out = r * (relu(xk K)^2 V).

`time_mix` and `channel_mix` below are these equations, written once: the modules' forward, every
decode step and the compiled/captured step call them (`rwkv_paths` says which products and which WKV
form they use). RWKV-5 uses this channel mix too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import GenerationMixin

from .configuration_rwkv4 import Rwkv4Config
from .rwkv_chunk import wkv4_chunk
from .rwkv_common import FP32_PARAMS, RwkvForCausalLMBase, RwkvModelBase
from .rwkv_helpers import ModuleCalls, mix, relu_square, rescale, token_shift
from .rwkv_ops import wkv4_recurrent
# transformers 4.57 copies into its module cache only the siblings that a local folder's model file
# imports itself (5.x follows every import): the ones this file needs only through others, by name
from .rwkv7_deepembed import deep_embed_gate  # noqa: F401
from .rwkv_cache import RwkvCache  # noqa: F401
from .rwkv_decode import RwkvGraphDecoder  # noqa: F401
from .rwkv_fla import HAVE_FLA  # noqa: F401
from .rwkv_generate import decode_loop  # noqa: F401
from .rwkv_inputs import check_ids  # noqa: F401
from .rwkv_loss import linear_cross_entropy  # noqa: F401
from .rwkv_paths import pick_path  # noqa: F401
from .rwkv_peft import register_lora_targets  # noqa: F401
from .rwkv_saving import auto_map  # noqa: F401
from .rwkv_state import RwkvStateMixin  # noqa: F401
from .rwkv_triton import HAVE_TRITON  # noqa: F401  (the Triton decode step, which rwkv_decode runs)

WKV_FORMS = {"recurrent": wkv4_recurrent, "chunk": wkv4_chunk}  # (fla has no RWKV-4 kernel)


def time_mix(p, x, shift, wkv, v_first, mask, form: str, calls=ModuleCalls, scale: float = 1.0):
    """x [B, T, C] (ln1's output); shift [B, C] the previous real token's x; wkv the (aa, bb, pp)
    state. `p` holds the layer's parameters (`Rwkv4TimeMix`). Returns (out, shift, wkv, v_first)."""
    prev, shift = token_shift(x, shift, mask)
    r = torch.sigmoid(calls.linear(p.receptance, mix(x, prev, p.time_mix_r)))
    k = calls.linear(p.key, mix(x, prev, p.time_mix_k)).float()
    v = calls.linear(p.value, mix(x, prev, p.time_mix_v)).float()
    log_w = -torch.exp(p.time_decay.float())
    y, wkv = WKV_FORMS[form](log_w, p.time_first.float(), k, v, wkv, mask)
    return calls.linear(p.output, rescale(r * y.to(x.dtype), scale)), shift, wkv, v_first


def channel_mix(p, x, shift, mask, calls=ModuleCalls, scale: float = 1.0, deep=None):
    """The channel mix of v4 and v5. x [B, T, C] (ln2's output); shift [B, C]. Returns (out, shift)."""
    prev, shift = token_shift(x, shift, mask)
    r = torch.sigmoid(calls.linear(p.receptance, mix(x, prev, p.time_mix_r)))
    k = relu_square(calls.linear(p.key, mix(x, prev, p.time_mix_k)))
    return r * calls.linear(p.value, rescale(k, scale)), shift


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

    def forward(self, x, shift, wkv, mask, v_first, form, scale=1.0, calls=ModuleCalls):
        return time_mix(self, x, shift, wkv, v_first, mask, form, calls, scale)


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

    def forward(self, x, shift, mask, scale=1.0, deep=None, calls=ModuleCalls):
        return channel_mix(self, x, shift, mask, calls, scale)


class Rwkv4Model(RwkvModelBase):
    config_class = Rwkv4Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    time_mix_cls = Rwkv4TimeMix
    channel_mix_cls = Rwkv4ChannelMix


class Rwkv4ForCausalLM(RwkvForCausalLMBase, GenerationMixin):
    config_class = Rwkv4Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    model_cls = Rwkv4Model
