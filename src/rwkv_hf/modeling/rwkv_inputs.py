"""What the model bodies check and derive from their inputs: ids in range, the padding mask, and
where packed documents begin. A leaf: it imports only torch and `rwkv_helpers`."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .rwkv_helpers import exporting

Tensor = torch.Tensor


def check_ids(input_ids: Tensor, vocab_size: int) -> None:
    """A clear error for ids outside the vocabulary (else: an index error deep inside the embedding).
    Not in an exported graph, which cannot raise."""
    if not exporting() and input_ids.numel() and bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        raise ValueError(
            f"input_ids must be in [0, {vocab_size}); got values in [{int(input_ids.min())}, {int(input_ids.max())}]"
        )


def normalize_mask(attention_mask: Optional[Tensor], shape: Tuple[int, int], device) -> Optional[Tensor]:
    """A [B, T] bool mask, or None when every position is real (the fast path)."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask must be [batch, seq_len] = {list(shape)} with 1 for real tokens and 0 for padding; "
            f"got shape {list(attention_mask.shape)}"
        )
    mask = attention_mask.to(device=device, dtype=torch.bool)
    return None if not exporting() and bool(mask.all()) else mask  # (an exported graph keeps the mask)


def document_starts(
    position_ids: Optional[Tensor], cu_seq_lens: Optional[Tensor], shape: Tuple[int, int], mask: Optional[Tensor]
) -> Optional[Tensor]:
    """Packed sequences (transformers' `DataCollatorWithFlattening`): a [B, T] bool tensor, True where a
    new document begins inside a row, or None when no row holds more than one.

    A document begins where `position_ids` restart at 0, or at the offsets of `cu_seq_lens` (the
    flash-attention form, one flattened row), after a real token of its row (so left padding, where the
    first real token has position 0, starts nothing). There the state starts afresh: each document's
    outputs are those of the document run alone; a row's first document continues from the row's state.
    """
    B, T = shape
    if cu_seq_lens is not None:
        if B != 1:
            raise ValueError(f"cu_seq_lens describes one flattened row; the input has {B} rows")
        offsets = cu_seq_lens.to(dtype=torch.long)
        if offsets.dim() != 1 or int(offsets[0]) != 0 or int(offsets[-1]) != T or bool((offsets[1:] < offsets[:-1]).any()):
            raise ValueError(f"cu_seq_lens must rise from 0 to the sequence length {T}; got {offsets.tolist()}")
        starts = torch.zeros(1, T, dtype=torch.bool, device=offsets.device)
        starts[0, offsets[(offsets > 0) & (offsets < T)]] = True
        return starts if bool(starts.any()) else None
    if position_ids is None or T < 2:
        return None
    if tuple(position_ids.shape[-2:]) != (B, T) and tuple(position_ids.shape) != (T,):
        raise ValueError(f"position_ids must be [batch, seq_len] = {[B, T]}; got shape {list(position_ids.shape)}")
    starts = position_ids.expand(B, T) == 0
    real = torch.ones(B, T, dtype=torch.bool, device=starts.device) if mask is None else mask.to(starts.device)
    starts = starts & (F.pad(real.long().cumsum(1)[:, :-1], (1, 0)) > 0)  # a real token before it
    return starts if bool(starts.any()) else None
