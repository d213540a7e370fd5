"""State files and state tuning: each layer's initial WKV state as a small file that RWKV-PEFT writes
and RWKV-Runner / ChatRWKV read, usable here as the initial state of `forward` and `generate`.

The file (`.pth`, a plain dict of tensors) holds exactly one fp32 tensor per layer,
`blocks.{i}.att.time_state` of shape [heads, head_size, head_size], and nothing else: the token-shift
states are not part of it, and every loader starts them at zero. Its matrix is S[value, key] in every
version (the layout of RWKV-PEFT's state-tuning kernels). Loaders turn it into the `rwkv` package's
state, whose layout depends on the version:

- RWKV-5, RWKV-6: the package's state is S[key, value], so loaders take `time_state.transpose(1, 2)`
  (ChatRWKV's chat demo, RWKV-Runner's `load_rwkv_state`, and the package itself when the tensors are
  merged into a v5/v6 checkpoint);
- RWKV-7: the package's state is S[value, key]: loaded as is (RWKV-Runner's `load_rwkv_state`).

Our WKV states have the package's layouts (see `rwkv_ops`), so the same rule converts a file to ours
and back. RWKV-4's state is not a matrix: it has no state files. A file carries no version tag, so a
file made for another version with the same layer count and head shape cannot be told apart (as in
RWKV-Runner); every other mismatch is refused with a one-line error.

Inside a model the loaded (or tuned) state is a `time_state` parameter of each layer's time mix, in
the file's layout; a layer whose state is not in the cache yet starts from it (`initial_wkv`).

This file is a leaf: it imports only torch (the model classes import it).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn as nn

Tensor = torch.Tensor

STATE_KEY = "blocks.{}.att.time_state"
_STATE_KEY_RE = re.compile(r"^blocks\.(\d+)\.att\.time_state$")
# the versions whose WKV state the file stores as the transpose of ours (S[key, value] here)
_TRANSPOSED = {"rwkv5_world": True, "rwkv6_world": True, "rwkv7_world": False}


class StateFileError(ValueError):
    """A state file that cannot be used with this model; the message says why, in one line."""


def _transposed(config) -> bool:
    model_type = getattr(config, "model_type", None)
    if model_type not in _TRANSPOSED:
        raise StateFileError(
            f"state files hold a matrix WKV state (RWKV-5, -6, -7); this model ({model_type}) has none"
        )
    return _TRANSPOSED[model_type]


def _swap(state: Tensor, transposed: bool) -> Tensor:
    return state.transpose(-1, -2) if transposed else state


def file_to_wkv(time_state: Tensor, config) -> Tensor:
    """A file's [..., H, N, N] S[value, key] -> our WKV layout for this model's version (a view)."""
    return _swap(time_state, _transposed(config))


wkv_to_file = file_to_wkv  # the conversion is its own inverse (a transpose or nothing)


def initial_wkv(att: nn.Module, batch_size: int, device) -> Optional[Tensor]:
    """The initial WKV state [B, H, N, N] fp32 of a time mix holding a `time_state`, else None.

    Every row gets the same state; the result is a fresh tensor (a decoder may overwrite it in place)
    that keeps the gradient to `time_state` when it is being tuned."""
    time_state = getattr(att, "time_state", None)
    if time_state is None:
        return None
    wkv = _swap(time_state, att.time_state_transposed).to(device=device, dtype=torch.float32)
    return wkv.unsqueeze(0).expand(batch_size, *wkv.shape).clone(memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------------------- files
def error_line(e: BaseException) -> str:
    """An exception as one line, e.g. why torch.load (weights only) or safetensors could not read a file
    (their messages run to many lines; the weights-only refusal's first line names no cause a user can
    act on)."""
    text = str(e).strip()
    if text.startswith("Weights only load failed"):
        return "the safe weights-only loader refused it: not a plain dict of tensors, or damaged"
    return text.splitlines()[0] if text else type(e).__name__


def read_state_file(path) -> Dict[str, Tensor]:
    """The tensors of a state file (`.pth`, or `.safetensors` with the same keys), on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such state file: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: one line, not the loader's traceback
        raise StateFileError(f"{path} is not a readable state file: {error_line(e)}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise StateFileError(f"{path} is not a state file: expected a dict of tensors")
    return sd


def check_state_dict(sd: Dict[str, Tensor], config, name: str = "the state file") -> list:
    """The per-layer time_state tensors of `sd` (layer order, fp32), after checking that they fit a
    model of this config; else a `StateFileError` naming the mismatch."""
    _transposed(config)
    if "emb.weight" in sd or any(k.endswith(".weight") for k in sd):
        raise StateFileError(f"{name} is a model checkpoint, not a state file (it has weights; a state file has only blocks.N.att.time_state)")
    layers = {}
    for key in sd:
        m = _STATE_KEY_RE.match(key)
        if m is None:
            raise StateFileError(f"{name} has {key!r}: a state file holds only blocks.N.att.time_state tensors")
        layers[int(m.group(1))] = sd[key]
    L = config.num_hidden_layers
    if sorted(layers) != list(range(len(layers))) or not layers:
        raise StateFileError(f"{name} has the states of layers {sorted(layers)}, not of layers 0..{len(layers) - 1}")
    if len(layers) != L:
        raise StateFileError(f"{name} has {len(layers)} layers, the model {L}")
    H, N = config.hidden_size // config.head_size, config.head_size
    out = []
    for i in range(L):
        t = layers[i]
        if tuple(t.shape) != (H, N, N):
            shape = list(t.shape)
            got = f"{shape[0]} heads of size {shape[1]}" if len(shape) == 3 and shape[1] == shape[2] else "not [heads, size, size]"
            raise StateFileError(f"{name}: layer {i} is {shape} ({got}); the model has {H} heads of size {N}: [{H}, {N}, {N}]")
        if not t.is_floating_point():
            raise StateFileError(f"{name}: layer {i} is {t.dtype}, not a floating-point state")
        out.append(t.float())
    return out


def write_state_file(sd: Dict[str, Tensor], path, force: bool = False) -> Path:
    """Write a state dict as a `.pth` that RWKV-Runner and ChatRWKV load; never a half-written file
    (written beside it, then renamed), and an existing file only with `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists (use force=True / --force to replace it)")
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"no such folder: {path.parent}")
    clean = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(clean, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


# ----------------------------------------------------------------------------- the model's methods
class RwkvStateMixin:
    """State files and state tuning on an RWKV causal LM (RWKV-5, -6, -7).

    - `load_state_file(path)`: every later `forward` / `generate` that starts without a state starts
      from the file's (each row of a batch from the same state; padding changes nothing, as always);
      `load_state_file(None)` goes back to the zero state.
    - `save_state_file(path, cache=None)`: the initial state the model holds (loaded or tuned), or with
      `cache` the WKV state a forward pass left in it (`row` picks the batch row), or with
      `input_ids` the state after reading that prompt (prompt caching).
    - `enable_state_tuning()`: freeze every weight; the initial state of every layer becomes the only
      trainable parameter (from the loaded state, else zeros). Train as usual (`labels`, `Trainer`),
      then `save_state_file`.
    """

    def _time_mixes(self):
        return [block.att for block in self.model.blocks]

    def _set_time_states(self, states, trainable: bool) -> None:
        device = self.get_input_embeddings().weight.device
        for att, state in zip(self._time_mixes(), states):
            if state is None:
                if "time_state" in att._parameters:
                    del att._parameters["time_state"]
                continue
            att.time_state_transposed = _transposed(self.config)
            att.time_state = nn.Parameter(state.to(device=device, dtype=torch.float32).clone(), requires_grad=trainable)

    def load_state_file(self, path, trainable: bool = False):
        """Start every sequence from the state in `path` (a state file), or from zeros if `path` is None."""
        if path is None:
            self._set_time_states([None] * len(self._time_mixes()), False)
            return self
        states = check_state_dict(read_state_file(path), self.config, name=str(path))
        self._set_time_states(states, trainable)
        return self

    def state_file_dict(self, cache=None, row: int = 0) -> Dict[str, Tensor]:
        """The state file's tensors: the model's initial state, or the WKV state in `cache` (row `row`)."""
        _transposed(self.config)
        if cache is not None:
            if any(s is None for s in cache.layers_state):
                raise ValueError("the cache holds no state yet: run the prompt through the model first")
            return {STATE_KEY.format(i): wkv_to_file(s[1][row], self.config).float() for i, s in enumerate(cache.layers_state)}
        states = [getattr(att, "time_state", None) for att in self._time_mixes()]
        if any(s is None for s in states):
            raise ValueError("the model holds no initial state: load a state file, tune one, or pass cache=")
        return {STATE_KEY.format(i): s.detach().float() for i, s in enumerate(states)}

    def save_state_file(self, path, cache=None, row: int = 0, input_ids=None, force: bool = False) -> Path:
        """Write `state_file_dict(cache, row)` to `path` (a `.pth` RWKV-Runner and ChatRWKV load).

        `input_ids` (prompt caching): the state after reading these ids (one row, [T] or [1, T]) from
        the model's initial state. The file keeps the WKV state only: a model started from it sees
        the prompt's last token through the WKV state but not through the token shift (zero)."""
        if input_ids is not None:
            if cache is not None:
                raise ValueError("pass cache= or input_ids=, not both")
            ids = torch.as_tensor(input_ids).view(1, -1).to(self.get_input_embeddings().weight.device)
            with torch.no_grad():
                out = self(input_ids=ids, use_cache=True, logits_to_keep=1, return_dict=False)
            cache, row = out[1], 0
        return write_state_file(self.state_file_dict(cache, row), path, force=force)

    def enable_state_tuning(self):
        """Freeze every weight and make each layer's initial WKV state the only trainable parameter."""
        _transposed(self.config)
        for p in self.parameters():
            p.requires_grad_(False)
        atts = self._time_mixes()
        states = [getattr(att, "time_state", None) for att in atts]
        H, N = self.config.hidden_size // self.config.head_size, self.config.head_size
        zeros = torch.zeros(H, N, N)
        self._set_time_states([zeros if s is None else s.detach() for s in states], trainable=True)
        return self
