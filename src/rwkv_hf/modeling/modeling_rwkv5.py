"""RWKV-5 "Eagle" World (5.0, 5.1, 5.2), in the reference package's words (`rwkv/model.py`, att_*_v5*).

Time mix, for each token (x_prev: the previous token's ln1 output), per head of size N:
    xk = x * time_mix_k + x_prev * (1 - time_mix_k)   (same for v, r, and g from 5.1)
    r = xr R;  k = xk K;  v = xv V;  g = silu(xg G) (5.1+)
    w = exp(-exp(time_decay))      one per head (5.0, 5.1) or per channel (5.2)
    u = exp(time_first) (5.0, 5.1) or time_faaaa (5.2)
    y = r (S + diag(u) k^T v);  S = diag(w) S + k^T v         (S is [key, value])
    out = (GroupNorm_H(y) [* g]) O
Channel mix: as RWKV-4.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import GenerationMixin
import torch.nn.functional as F

from .configuration_rwkv5 import Rwkv5Config
from .modeling_rwkv4 import Rwkv4ChannelMix
from .rwkv_common import FP32_PARAMS, RwkvForCausalLMBase, RwkvModelBase, group_norm_fp32, mix, rescale, token_shift
from .rwkv_ops import wkv5

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
from .configuration_rwkv4 import Rwkv4Config  # noqa: F401,E402


class Rwkv5TimeMix(nn.Module):
    def __init__(self, config: Rwkv5Config, layer_id: int):
        super().__init__()
        C, N = config.hidden_size, config.head_size
        H = C // N
        self.n_head, self.head_size = H, N
        self.version = config.rwkv_version
        self.gated = self.version in ("5.1", "5.2")
        self.time_mix_k = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_v = nn.Parameter(torch.empty(1, 1, C))
        self.time_mix_r = nn.Parameter(torch.empty(1, 1, C))
        if self.version == "5.2":
            self.time_decay = nn.Parameter(torch.empty(H, N))
            self.time_faaaa = nn.Parameter(torch.empty(H, N))
        else:
            self.time_decay = nn.Parameter(torch.empty(H))
            self.time_first = nn.Parameter(torch.empty(H))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        if self.gated:
            self.time_mix_g = nn.Parameter(torch.empty(1, 1, C))
            self.gate = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=64e-5)

    def init_parameters(self):
        with torch.no_grad():
            for name in ("time_mix_k", "time_mix_v", "time_mix_r", "time_mix_g"):
                if hasattr(self, name):
                    getattr(self, name).fill_(0.5)
            self.time_decay.copy_(torch.linspace(-5, 1, self.time_decay.numel()).view_as(self.time_decay))
            (self.time_faaaa if self.version == "5.2" else self.time_first).fill_(0.3)

    def zero_wkv(self, batch_size: int, device):
        return torch.zeros(batch_size, self.n_head, self.head_size, self.head_size, device=device, dtype=torch.float32)

    def decay_and_bonus(self):
        """log w and u, both broadcastable to [H, N]."""
        H = self.n_head
        log_w = -torch.exp(self.time_decay.float())
        if self.version == "5.2":
            return log_w, self.time_faaaa.float()
        u = torch.exp(self.time_first.float()).view(H, 1).expand(H, self.head_size)
        return log_w.view(H, 1), u

    def forward(self, x, shift, wkv, mask, v_first, mode, scale=1.0):
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        prev, shift = token_shift(x, shift, mask)
        r = self.receptance(mix(x, prev, self.time_mix_r))
        k = self.key(mix(x, prev, self.time_mix_k))
        v = self.value(mix(x, prev, self.time_mix_v))
        log_w, u = self.decay_and_bonus()
        heads = lambda t: t.view(B, T, H, N)  # noqa: E731
        y, wkv = wkv5(heads(r), heads(k), heads(v), log_w, u, wkv, mask, mode)
        y = group_norm_fp32(self.ln_x, y.reshape(B * T, C)).view(B, T, C).to(x.dtype)
        if self.gated:
            y = y * F.silu(self.gate(mix(x, prev, self.time_mix_g)))
        return self.output(rescale(y, scale)), shift, wkv, v_first


class Rwkv5Model(RwkvModelBase):
    config_class = Rwkv5Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    time_mix_cls = Rwkv5TimeMix
    channel_mix_cls = Rwkv4ChannelMix


class Rwkv5ForCausalLM(RwkvForCausalLMBase, GenerationMixin):
    config_class = Rwkv5Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    model_cls = Rwkv5Model
