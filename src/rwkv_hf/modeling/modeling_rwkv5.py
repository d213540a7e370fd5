"""RWKV-5 "Eagle" World (5.0, 5.1, 5.2), in the reference package's words (`rwkv/model.py`, att_*_v5*).

Time mix, for each token (x_prev: the previous token's ln1 output), per head of size N:
    xk = x * time_mix_k + x_prev * (1 - time_mix_k)   (same for v, r, and g from 5.1)
    r = xr R;  k = xk K;  v = xv V;  g = silu(xg G) (5.1+)
    w = exp(-exp(time_decay))      one per head (5.0, 5.1) or per channel (5.2)
    u = exp(time_first) (5.0, 5.1) or time_faaaa (5.2)
    y = r (S + diag(u) k^T v);  S = diag(w) S + k^T v         (S is [key, value])
    out = (GroupNorm_H(y) [* g]) O
Channel mix: as RWKV-4 (`modeling_rwkv4.channel_mix`).

`time_mix` below is these equations, written once: the modules' forward, every decode step and the
compiled/captured step call it (`rwkv_paths` says which products and which WKV form it uses).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin

from .configuration_rwkv5 import Rwkv5Config
from .modeling_rwkv4 import Rwkv4ChannelMix
from .rwkv_chunk import wkv5_chunk
from .rwkv_common import FP32_PARAMS, RwkvForCausalLMBase, RwkvModelBase
from .rwkv_fla import wkv5_fla
from .rwkv_helpers import ModuleCalls, group_norm_fp32, mix, rescale, token_shift
from .rwkv_ops import wkv5_recurrent
# transformers 4.57 copies into its module cache only the siblings that a local folder's model file
# imports itself (5.x follows every import): the ones this file needs only through others, by name
from .configuration_rwkv4 import Rwkv4Config  # noqa: F401
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
    state. `p` holds the layer's parameters (`Rwkv5TimeMix`). Returns (out, shift, S, v_first)."""
    B, T, C = x.shape
    H, N = p.n_head, p.head_size
    prev, shift = token_shift(x, shift, mask)
    r = calls.linear(p.receptance, mix(x, prev, p.time_mix_r))
    k = calls.linear(p.key, mix(x, prev, p.time_mix_k))
    v = calls.linear(p.value, mix(x, prev, p.time_mix_v))
    log_w = -torch.exp(p.time_decay.float())
    if p.version == "5.2":  # per channel; u = time_faaaa
        u = p.time_faaaa.float()
    else:  # one decay per head; u = exp(time_first)
        log_w, u = log_w.view(H, 1), torch.exp(p.time_first.float()).view(H, 1).expand(H, N)
    heads = lambda t: t.view(B, T, H, N)  # noqa: E731
    y, S = WKV_FORMS[form](heads(r), heads(k), heads(v), log_w, u, S, mask)
    y = group_norm_fp32(p.ln_x, y.reshape(B, T, C)).to(x.dtype)
    if p.gated:  # 5.1, 5.2
        y = y * F.silu(calls.linear(p.gate, mix(x, prev, p.time_mix_g)))
    return calls.linear(p.output, rescale(y, scale)), shift, S, v_first


class Rwkv5TimeMix(nn.Module):
    def __init__(self, config: Rwkv5Config, layer_id: int):
        super().__init__()
        C, N = config.hidden_size, config.head_size
        H = C // N
        self.n_head, self.head_size = H, N
        self.version = config.rwkv_version
        self.gated = self.version in ("5.1", "5.2")  # 5.0 has no gate
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

    def forward(self, x, shift, wkv, mask, v_first, form, scale=1.0, calls=ModuleCalls):
        return time_mix(self, x, shift, wkv, v_first, mask, form, calls, scale)


class Rwkv5Model(RwkvModelBase):
    config_class = Rwkv5Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    time_mix_cls = Rwkv5TimeMix
    channel_mix_cls = Rwkv4ChannelMix


class Rwkv5ForCausalLM(RwkvForCausalLMBase, GenerationMixin):
    config_class = Rwkv5Config
    _keep_in_fp32_modules_strict = FP32_PARAMS
    model_cls = Rwkv5Model
