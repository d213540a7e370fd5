"""DeepEmbed RWKV-7: a per-token embedding that gates each layer's channel mix.

In the reference package's words (`rwkv/model.py` with RWKV_DE_VERSION=1, RWKV_x070_CMix_*), for a
layer's channel mix with input x (the ln2 output) at a token `tok`, D the DeepEmbed rank (32):
    e = s_emb[tok] + ln0(emb[tok]) s_emb_x^T        [D*D], one D x D matrix per token and layer
    k = relu(xk K)^2 * ((x s1) e.view(D, D) s2 + s0)
    out = k V
Checkpoint tensors per layer: `ffn.s_emb.weight` [V, D*D], `ffn.s_emb_x.weight` [D*D, C],
`ffn.s0` [1, 1, F], `ffn.s1` [C, D], `ffn.s2` [D, F] (F = the channel-mix width). The token's
embedding `ln0(emb[tok])` is block 0's normalised input.

This file is a leaf: it imports only torch (the RWKV-7 channel mix and the model body call it).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn as nn

Tensor = torch.Tensor


def add_deep_embed_params(ffn: nn.Module, config) -> None:
    """Give an RWKV-7 channel mix its DeepEmbed tensors when the config has a DeepEmbed rank."""
    D = getattr(config, "deep_embed_size", 0)
    if not D:
        return
    C, Fw = config.hidden_size, config.intermediate_size
    ffn.s_emb = nn.Embedding(config.vocab_size, D * D)
    ffn.s_emb_x = nn.Linear(C, D * D, bias=False)
    ffn.s0 = nn.Parameter(torch.empty(1, 1, Fw))
    ffn.s1 = nn.Parameter(torch.empty(C, D))
    ffn.s2 = nn.Parameter(torch.empty(D, Fw))


def init_deep_embed_params(ffn: nn.Module) -> None:
    """For a model built from a config: a gate of 1 (s0 = 1, the rest small)."""
    if getattr(ffn, "s0", None) is None:
        return
    with torch.no_grad():
        ffn.s0.fill_(1.0)
        for p in (ffn.s1, ffn.s2):
            nn.init.normal_(p, std=0.02)


def deep_embed_inputs(input_ids: Optional[Tensor], norm_embedding: Callable[[], Tensor]) -> Tuple[Tensor, Tensor]:
    """What every layer's DeepEmbed needs: (token ids [B, T], ln0(embedding) [B, T, C]), the latter
    from `norm_embedding()` (block 0's normalised input)."""
    if input_ids is None:
        raise ValueError("a DeepEmbed RWKV-7 looks up a per-token embedding in every layer: pass input_ids, not inputs_embeds")
    return input_ids, norm_embedding()


def deep_embed_gate(ffn: nn.Module, x: Tensor, deep: Tuple[Tensor, Tensor]) -> Tensor:
    """The channel mix's gate (x s1) e s2 + s0, [B, T, F], for input x [B, T, C]."""
    ids, tok = deep
    B, T, _ = x.shape
    D = ffn.s1.shape[1]
    e = (ffn.s_emb(ids) + ffn.s_emb_x(tok)).view(B, T, D, D)
    ss = ((x @ ffn.s1).unsqueeze(-2) @ e).squeeze(-2)  # [B, T, D]
    return ss @ ffn.s2 + ffn.s0
