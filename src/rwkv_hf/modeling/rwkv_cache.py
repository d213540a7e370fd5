"""The recurrent state of an RWKV model as a transformers `Cache` (`RwkvCache`), and the helpers that
walk a state's nested tuples of tensors. A leaf: it imports only torch and transformers."""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast

Tensor = torch.Tensor

# transformers 5 renamed `past_key_values` to `cache` (in outputs, generate() and forward kwargs);
# 4.57 still uses the old name. We accept both on input and fill whichever the installed line reads.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def map_tensors(fn: Callable[[Tensor], Tensor], obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(fn, o) for o in obj)
    return obj


def flat_tensors(obj: Any) -> List[Tensor]:
    """The tensors of a state, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    return [t for o in obj for t in flat_tensors(o)] if isinstance(obj, (tuple, list)) else []


def zip_tensors(fn: Callable[[Tensor, Tensor], Tensor], a: Any, b: Any) -> Any:
    """fn over the tensors of two states of the same structure."""
    if isinstance(a, Tensor):
        return fn(a, b)
    return type(a)(zip_tensors(fn, x, y) for x, y in zip(a, b))


class RwkvCache(Cache):
    """The recurrent state of an RWKV model, as a transformers `Cache`.

    `layers_state[i]` is the state of layer i: `(att_shift [B, C], wkv, ffn_shift [B, C])`, where wkv is
    the fp32 matrix state `[B, H, N, N]` (v5-v7) or the `(aa, bb, pp)` triple `[B, C]` each (v4).
    `seen_tokens` counts the columns consumed so far (padding included), which is what `generate()`
    needs to know which input ids are new. A state cannot be cropped: it holds no per-token history.
    While CUDA-graph decoding (see rwkv_decode) the state tensors are the graph's buffers and change in
    place from step to step: take snapshots with `clone()`, not by keeping references to them.
    """

    is_compileable = False
    is_croppable = False

    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.layers_state: List[Optional[tuple]] = [None] * num_layers
        self.seen_tokens = 0

    def __repr__(self):
        return f"RwkvCache(num_layers={self.num_layers}, seen_tokens={self.seen_tokens})"

    def __len__(self):
        return self.num_layers

    def __getitem__(self, layer_idx: int) -> Tuple[Tensor, ...]:
        """Layer `layer_idx`'s state as a flat tuple of tensors (`cache[i]`, as transformers reads a cache per
        layer; empty before the layer has run)."""
        if not -self.num_layers <= layer_idx < self.num_layers:
            raise IndexError(f"the cache has {self.num_layers} layers, not a layer {layer_idx}")
        return tuple(flat_tensors(self.layers_state[layer_idx]))

    def __iter__(self):
        return (self[i] for i in range(self.num_layers))

    @property
    def is_linear(self) -> List[bool]:
        return [True] * self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_max_length(self) -> int:
        return -1

    @property
    def batch_size(self) -> Optional[int]:
        for s in self.layers_state:
            if s is not None:
                return s[0].shape[0]
        return None

    def _apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.layers_state = [map_tensors(fn, s) for s in self.layers_state]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b of the new state is row beam_idx[b] of the old one."""
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._apply(lambda t: t[indices])

    def crop(self, max_length: int) -> None:
        raise ValueError("an RWKV state holds no per-token history and cannot be cropped")

    def reset(self) -> None:
        self.layers_state = [None] * self.num_layers
        self.seen_tokens = 0

    def to(self, *args, **kwargs) -> "RwkvCache":
        self._apply(lambda t: t.to(*args, **kwargs))
        return self

    def clone(self) -> "RwkvCache":
        """An independent copy, e.g. to branch a conversation from a shared prompt state."""
        new = RwkvCache(self.num_layers)
        new.layers_state = [map_tensors(lambda t: t.clone(), s) for s in self.layers_state]
        new.seen_tokens = self.seen_tokens
        return new


def copy_into(dst: Any, src: Any) -> None:
    """Copy a state's tensors into another state of the same structure, in place (static buffers)."""
    if isinstance(dst, Tensor):
        dst.copy_(src)
    else:
        for d, s in zip(dst, src):
            copy_into(d, s)


def same_tensors(a: Any, b: Any) -> bool:
    """Whether two states hold the very same tensor objects (not just equal values)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if a is None or b is None or len(a) != len(b):
        return False
    return all(same_tensors(x, y) for x, y in zip(a, b))
