"""Exporting a model to ONNX (onnxruntime) with a plain-tensor signature.

`torch.onnx.export` needs a forward of tensors in, tensors out. `OnnxLM` gives a causal LM one:

- ``OnnxLM(model)``: ``(input_ids [B, T], attention_mask [B, T]) -> logits [B, T, V]``, from an empty
  state; padding (mask 0, on either side) changes nothing, as in the model.
- ``OnnxLM(model, with_state=True)``: ``(input_ids, attention_mask, *state) -> (logits, *new_state)``:
  the recurrent state goes in and comes out as tensors, so one graph runs a prompt and then the decode
  steps one token at a time (`zero_state` gives the state to start from).

Batch and length are free in the exported graph: while exporting, the model runs the plain recurrence
with its time loop in the graph (see `rwkv_hf.modeling.rwkv_ops.exporting`). `export_onnx` names the
inputs and outputs and marks those dimensions dynamic.
"""

from __future__ import annotations

import warnings

from typing import List, Tuple

import torch
import torch.nn as nn

from .modeling.rwkv_cache import RwkvCache

Tensor = torch.Tensor
STATE_PARTS = {3: ("att_shift", "wkv", "ffn_shift"), 5: ("att_shift", "wkv_aa", "wkv_bb", "wkv_pp", "ffn_shift")}


def _flat(layer_state: tuple) -> List[Tensor]:
    att, wkv, ffn = layer_state
    return [att, *(wkv if isinstance(wkv, tuple) else (wkv,)), ffn]


class OnnxLM(nn.Module):
    """A causal LM's forward with plain tensors in and out, for `torch.onnx.export` (see the module doc)."""

    def __init__(self, model: nn.Module, with_state: bool = False):
        super().__init__()
        self.model = model
        self.with_state = with_state
        self.num_layers = model.config.num_hidden_layers
        self.per_layer = len(_flat(self.model.model.blocks[0].zero_state(1, "cpu", torch.float32)))

    def zero_state(self, batch_size: int) -> Tuple[Tensor, ...]:
        """The state before any token, flat: per layer the time mix's token shift, the WKV state (v4: its
        aa, bb, pp) and the channel mix's token shift."""
        p = next(self.model.parameters())
        return tuple(t for b in self.model.model.blocks for t in _flat(b.zero_state(batch_size, p.device, p.dtype)))

    def state_names(self, prefix: str = "state") -> List[str]:
        """`state.<layer>.<part>` for each state tensor, in order."""
        parts = STATE_PARTS[self.per_layer]
        return [f"{prefix}.{i}.{part}" for i in range(self.num_layers) for part in parts]

    @staticmethod
    def state_tensors(cache: RwkvCache) -> Tuple[Tensor, ...]:
        """A model's returned cache as the flat tuple of state tensors that the graph takes and returns."""
        return tuple(t for s in cache.layers_state for t in _flat(s))

    def forward(self, input_ids: Tensor, attention_mask: Tensor, *state: Tensor):
        cache = None
        if self.with_state:
            cache = RwkvCache(self.num_layers)
            for i in range(self.num_layers):
                att, *wkv, ffn = state[i * self.per_layer : (i + 1) * self.per_layer]
                cache.layers_state[i] = (att, wkv[0] if len(wkv) == 1 else tuple(wkv), ffn)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, cache=cache, use_cache=self.with_state)
        if not self.with_state:
            return out.logits
        return (out.logits, *self.state_tensors(cache))


def export_onnx(model: nn.Module, path, with_state: bool = False, dynamo: bool = True, example_length: int = 4):
    """Write `OnnxLM(model, with_state)` to `path` as ONNX, with free batch and length.

    Inputs `input_ids`, `attention_mask` (int64 [batch, length]) and, with_state, `state.<layer>.<part>`;
    outputs `logits` (fp32 [batch, length, vocab]) and, with_state, `new_state.<layer>.<part>`.
    `dynamo`: torch.onnx's default exporter (torch.export) or, False, the TorchScript one.
    """
    lm = OnnxLM(model, with_state).eval()
    ids = torch.zeros(2, example_length, dtype=torch.long, device=next(model.parameters()).device)
    state = lm.zero_state(2) if with_state else ()
    names_in = ["input_ids", "attention_mask"] + (lm.state_names() if with_state else [])
    names_out = ["logits"] + (lm.state_names("new_state") if with_state else [])
    if dynamo:
        batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
        shapes = ({0: batch, 1: length}, {0: batch, 1: length})
        if with_state:
            shapes += (tuple({0: batch} for _ in state),)  # (*state: one tuple)
        dyn = {"dynamic_shapes": shapes}
    else:
        axes = {n: {0: "batch", 1: "length"} for n in ("input_ids", "attention_mask", "logits")}
        axes.update({n: {0: "batch"} for n in names_in[2:] + names_out[1:]})
        dyn = {"dynamic_axes": axes}
    with torch.no_grad():
        torch.onnx.export(
            lm, (ids, torch.ones_like(ids), *state), str(path), input_names=names_in, output_names=names_out,
            dynamo=dynamo, **dyn,
        )
    _check_graph(lm, path, names_in, dynamo)
    return path


def _check_graph(lm: OnnxLM, path, names_in: List[str], dynamo: bool, tol: float = 1e-4) -> None:
    """Run the written graph on onnxruntime (when installed) against the model: a left-padded batch of 2
    from the zero state and, with state, 2 more tokens from the state it returned. An exporter that
    records a wrong graph (seen: torch 2.11's torch.export on the state signature) is an error here,
    never a file that silently computes something else."""
    try:
        import onnxruntime
    except ImportError:
        warnings.warn("onnxruntime is not installed: the exported graph was not run against the model")
        return
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    p = next(lm.parameters())
    ids = torch.randint(0, lm.model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)).to(p.device)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    state = lm.zero_state(2) if lm.with_state else ()
    for part in (slice(0, 5), slice(5, 7)) if lm.with_state else (slice(None),):
        args = (ids[:, part], mask[:, part], *state)
        with torch.no_grad():
            want = lm(*args)
        want = want if isinstance(want, tuple) else (want,)
        got = session.run(None, {n: a.cpu().numpy() for n, a in zip(names_in, args)})
        real = mask[:, part].bool().cpu()
        for i, (g, w) in enumerate(zip(got, want)):
            g, w = torch.from_numpy(g), w.float().cpu()
            if i == 0:  # logits: the real positions only
                g, w = g[real], w[real]
            err = float((g - w).abs().max() / w.abs().max().clamp_min(1e-30))
            if not err <= tol:
                raise RuntimeError(
                    f"torch.onnx.export (dynamo={dynamo}, torch {torch.__version__}) wrote a graph whose output "
                    f"{i} differs from the model's by {err:.3g} of its range; export with dynamo={not dynamo}"
                )
        state = want[1:]
