"""Read RWKV weights in any known layout, write a Hugging Face model folder, and export back.

A written folder holds config.json (with `architectures`, `auto_map`, every size and the version),
generation_config.json, safetensors weights (sharded above `max_shard_size`, with an index), the
tokenizer files, the remote-code `.py` files and a model card, so it loads with
`AutoModelForCausalLM.from_pretrained(folder)` after `import rwkv_hf`, and with
`trust_remote_code=True` on a machine that never installed rwkv-hf. Everything is written into a
temporary folder beside the target that is renamed into place only once complete, by the rules of
`rwkv_hf.safe_write` (what `--force` may replace, the manifest, leftovers of killed runs, the umask).

The key set is checked before any model is built: block numbers 0..n-1 without gaps, every tensor
the version needs present, no unknown one, every shape as the sizes read from `emb.weight` and block
0 say; the expected set comes from a two-layer meta model, so a forged layer count costs nothing.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional

import torch
from transformers import GenerationConfig

from ..modeling import FAMILIES
from ..modeling.rwkv_saving import remote_code_files
from ..modeling.rwkv_state import error_line
from ..safe_write import atomic_file, atomic_folder, guard_output
from ..version import __version__
from .blinkdl import SPECS, CheckpointError, config_from_state_dict, to_blinkdl_key, to_hf_key
from .layouts import HF_LEGACY, LAYOUTS, to_blinkdl
from .targets import TARGETS, check_target, target_state_dict, write_target_folder


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
PROGRESS_MIN_BYTES = 256 * 2**20  # show a progress bar above this much data
OUTPUT_LAYOUTS = ("rwkv-hf", "transformers", *TARGETS)


# ------------------------------------------------------------------------------------------ reading
def _load_torch_file(path: Path) -> Dict[str, torch.Tensor]:
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for truncated/corrupt/unsafe files
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({error_line(e)})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]  # a Lightning-style wrapper
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: is not a state dict of tensors")
    odd = [k for k in sd if not isinstance(k, str)]
    if odd:
        raise CheckpointError(f"{path}: has a tensor whose name is not a string ({odd[0]!r})")
    return dict(sd)


def _load_safetensors_file(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: cannot be read as safetensors ({error_line(e)})") from None
    if not sd:
        raise CheckpointError(f"{path}: holds no tensors")
    return sd


def _folder_weight_files(folder: Path) -> List[Path]:
    for index_name, suffix in (("model.safetensors.index.json", ".safetensors"), ("pytorch_model.bin.index.json", ".bin")):
        index = folder / index_name
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except Exception as e:
                raise CheckpointError(f"{index}: unreadable index ({error_line(e)})") from None
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise CheckpointError(f"{folder}: the index names {missing[0]}, which is missing")
            return [folder / n for n in names]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.pth"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{folder}: no weights (*.safetensors, pytorch_model*.bin or *.pth)")


def load_checkpoint(path: os.PathLike) -> Dict[str, torch.Tensor]:
    """Load every tensor of a `.pth`/`.bin`, a `.safetensors` file or a model folder, safely
    (`weights_only=True`), with one clear error for a bad file. Keys are left as they are."""
    path = Path(path)
    if path.is_dir():
        sd: Dict[str, torch.Tensor] = {}
        for f in _folder_weight_files(path):
            sd.update(_load_safetensors_file(f) if f.suffix == ".safetensors" else _load_torch_file(f))
        return sd
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        return _load_safetensors_file(path)
    return _load_torch_file(path)


@dataclass
class Source:
    """A checkpoint read and mapped onto BlinkDL's layout, with what was found out about it."""

    path: Path
    layout: str
    state_dict: Dict[str, torch.Tensor]  # BlinkDL keys and shapes
    notes: List[str] = field(default_factory=list)


def read_source(path: os.PathLike) -> Source:
    """Load any supported checkpoint and map it onto BlinkDL's keys and shapes."""
    raw = load_checkpoint(path)
    bad = [k for k, v in raw.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"tensor {bad[0]} has dtype {raw[bad[0]].dtype}, expected a float type")
    layout, sd, notes = to_blinkdl(raw)
    return Source(Path(path), layout.name, sd, notes)


_HF_BLOCK = re.compile(r"^model\.blocks\.(\d+)\.(.*)$")


def expected_shapes(spec, config) -> Dict[str, tuple]:
    """Every parameter of the model `config` describes, with its shape, from a meta model of at most
    two layers: blocks 1..n-1 hold the same parameters (block 0 adds ln0), so nothing scales with n."""
    n = config.num_hidden_layers
    small = copy.deepcopy(config)
    small.num_hidden_layers = min(n, 2)
    with torch.device("meta"):
        template = {k: tuple(v.shape) for k, v in FAMILIES[spec.family][2](small).state_dict().items()}
    expected = {}
    for k, shape in template.items():
        m = _HF_BLOCK.match(k)
        if m and m.group(1) == "1":
            expected.update({f"model.blocks.{i}.{m.group(2)}": shape for i in range(1, n)})
        else:
            expected[k] = shape
    return expected


def build_hf_state_dict(sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None):
    """Detect, validate every tensor against the model's own parameters, and rename to our keys.

    `sd` is in BlinkDL's layout. Returns (spec, config, hf_state_dict). Gaps in the block numbers,
    missing, unexpected or mis-shaped tensors raise CheckpointError before any model is built.
    """
    spec, config = config_from_state_dict(sd)
    expected = expected_shapes(spec, config)
    hf = {to_hf_key(k): v for k, v in sd.items()}
    missing = sorted(set(expected) - set(hf))
    unexpected = sorted(set(hf) - set(expected))
    if missing:
        raise CheckpointError(
            f"RWKV-{spec.version} checkpoint is missing {len(missing)} tensor(s): "
            + ", ".join(to_blinkdl_key(k) for k in missing[:5])
        )
    if unexpected:
        raise CheckpointError(
            f"RWKV-{spec.version} checkpoint has {len(unexpected)} unexpected tensor(s): "
            + ", ".join(to_blinkdl_key(k) for k in unexpected[:5])
        )
    for k, shape in expected.items():
        if tuple(hf[k].shape) != shape:
            raise CheckpointError(f"tensor {to_blinkdl_key(k)} has shape {list(hf[k].shape)}, expected {list(shape)}")
        if not hf[k].is_floating_point():
            raise CheckpointError(f"tensor {to_blinkdl_key(k)} has dtype {hf[k].dtype}, expected a float type")
    if dtype is not None:
        hf = {k: v.to(dtype) for k, v in hf.items()}
    return spec, config, hf


def describe(spec, config, n_params: int) -> str:
    parts = [f"RWKV-{spec.version}", f"{config.num_hidden_layers} layers", f"width {config.hidden_size}"]
    if spec.family >= 5:
        parts.append(f"{config.num_attention_heads} heads of {config.head_size}")
    if spec.family == 6:
        parts.append(f"LoRA mix {config.mix_lora} decay {config.decay_lora}")
    if spec.family == 7:
        parts.append(f"LoRA w {config.decay_lora} a {config.a_lora} v {config.v_lora} g {config.gate_lora}")
    parts += [f"ffn {config.intermediate_size}", f"vocab {config.vocab_size}", f"{n_params:,} parameters"]
    return ", ".join(parts)


def _dtype_summary(sd: Mapping[str, torch.Tensor]) -> str:
    counts: Dict[torch.dtype, int] = {}
    for v in sd.values():
        counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return "/".join(DTYPE_NAMES.get(d, str(d).replace("torch.", "")) for d, _ in sorted(counts.items(), key=lambda x: -x[1]))


def _all_finite(v: torch.Tensor, step: int = 2**24) -> bool:
    flat = v.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def _names(keys: List[str]) -> str:
    return ", ".join(to_blinkdl_key(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")


def weight_warnings(original: Mapping[str, torch.Tensor], converted: Mapping[str, torch.Tensor], config) -> List[str]:
    """What the written model would get silently wrong: NaN/Inf weights, values the chosen dtype turns
    into Inf, an embedding whose size is not the World tokenizer's. Keys are ours."""
    from ..tokenization.tokenization_rwkv_world import VOCAB_SIZE

    out = []
    bad = [k for k, v in original.items() if not _all_finite(v)]
    if bad:
        out.append(f"{len(bad)} tensor(s) hold NaN or Inf values: {_names(bad)}")
    over = [k for k, v in converted.items() if v is not original[k] and k not in bad and not _all_finite(v)]
    if over:
        dtype = DTYPE_NAMES.get(next(iter(converted.values())).dtype, "the new dtype")
        out.append(f"{dtype} cannot hold some values of {len(over)} tensor(s), which became Inf: {_names(over)} (keep fp32 or use bf16)")
    if config.vocab_size != VOCAB_SIZE:
        effect = (f"token ids {config.vocab_size}..{VOCAB_SIZE - 1} will fail" if config.vocab_size < VOCAB_SIZE
                  else f"rows {VOCAB_SIZE}..{config.vocab_size - 1} are never used")
        out.append(f"emb.weight has {config.vocab_size} rows but the World tokenizer written with it has {VOCAB_SIZE} tokens: {effect}")
    return out


# ------------------------------------------------------------------------------------------ writing
def write_failed(path: os.PathLike, e: BaseException) -> OSError:
    """A write that failed (disk full, file too large, ...) as one OSError line naming the file.
    safetensors raises its own SafetensorError and torch.save a RuntimeError for these."""
    path = Path(path)
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:,.0f} MiB free there"
    except OSError:
        free = ""
    return OSError(f"writing {path.name} in {path.parent} failed ({error_line(e)}){free}; nothing was written")


def _unshared(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Tensors sharing memory (tied or views of one another) as separate copies: safetensors stores
    each once, and refuses shared ones."""
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.device.type) if v.numel() else None
        out[k] = v.clone() if key in seen else v.contiguous()
        if key is not None:
            seen.add(key)
    return out


def _progress(total_bytes: int, desc: str, progress: Optional[bool]):
    from tqdm.auto import tqdm

    disable = (not progress) if progress is not None else (total_bytes < PROGRESS_MIN_BYTES or not sys.stderr.isatty())
    return tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, leave=False)


def save_sharded(sd: Mapping[str, torch.Tensor], out_dir: Path, max_shard_size="5GB", progress: Optional[bool] = None) -> List[str]:
    """safetensors shards of at most `max_shard_size` (one file if it fits), plus the index when sharded."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    from safetensors import SafetensorError

    sd = _unshared(sd)
    split = split_torch_state_dict_into_shards(dict(sd), max_shard_size=max_shard_size)
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with _progress(total, "writing weights", progress) as bar:
        for filename, names in split.filename_to_tensors.items():
            shard = {k: sd[k] for k in names}
            try:
                save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
            except SafetensorError as e:
                raise write_failed(out_dir / filename, e) from None
            bar.update(sum(v.numel() * v.element_size() for v in shard.values()))
    files = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_size": total}, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return files


def _save_tokenizer(out_dir: Path) -> None:
    from ..tokenization import save_tokenizer_files

    save_tokenizer_files(out_dir)


# Token 261 is "\n\n", the end of a World chat turn; generation stops there too (as llama.cpp's RWKV
# conversion makes it the end-of-turn token), so a pipeline chat ends its reply where `rwkv-hf chat` does.
# Pass `eos_token_id=0` to generate past blank lines.
TURN_END_TOKEN_ID = 261


def _generation_config() -> GenerationConfig:
    # World models end a document with token 0; sampling defaults as commonly used for RWKV World chat.
    # No length: the caller's max_length / max_new_tokens decides (a saved max_new_tokens would win
    # over a caller's max_length, as lm-eval passes it).
    return GenerationConfig(
        bos_token_id=0, eos_token_id=[0, TURN_END_TOKEN_ID], pad_token_id=0, do_sample=True, temperature=1.0, top_p=0.3, top_k=0
    )


def _set_dtype(config, sd: Mapping[str, torch.Tensor]) -> None:
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) == 1:  # transformers 5 calls it `dtype`, 4.57 `torch_dtype`
        name = "dtype" if "dtype" in type(config)().to_dict() else "torch_dtype"
        setattr(config, name, str(next(iter(dtypes))).replace("torch.", ""))


def write_hf_folder(
    out_dir: Path,
    spec,
    config,
    hf_sd: Mapping[str, torch.Tensor],
    max_shard_size="5GB",
    source: str = "",
    card: str = "",
    progress: Optional[bool] = None,
) -> List[str]:
    """Write config, generation config, weights, tokenizer, remote code and model card into `out_dir`."""
    config_cls, model_cls, lm_cls = FAMILIES[spec.family]
    config.architectures = [lm_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_rwkv{spec.family}.{config_cls.__name__}",
        "AutoModel": f"modeling_rwkv{spec.family}.{model_cls.__name__}",
        "AutoModelForCausalLM": f"modeling_rwkv{spec.family}.{lm_cls.__name__}",
    }
    config.rwkv_version = spec.version
    _set_dtype(config, hf_sd)
    config.save_pretrained(out_dir)
    _generation_config().save_pretrained(out_dir)
    files = save_sharded(hf_sd, out_dir, max_shard_size=max_shard_size, progress=progress)
    for f in remote_code_files():
        shutil.copy2(f, out_dir / f.name)
    _save_tokenizer(out_dir)
    if card:
        (out_dir / "README.md").write_text(card, encoding="utf-8")
    return files


def transformers_rwkv4_config(config):
    """transformers' own `RwkvConfig` for one of our RWKV-4 configs."""
    from transformers import RwkvConfig

    return RwkvConfig(
        vocab_size=config.vocab_size,
        context_length=4096,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        attention_hidden_size=config.attention_hidden_size,
        intermediate_size=config.intermediate_size,
        layer_norm_epsilon=config.layer_norm_epsilon,
        bos_token_id=0,
        eos_token_id=0,
        rescale_every=6,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def write_transformers_rwkv4_folder(
    out_dir: Path, config, blinkdl_sd: Mapping[str, torch.Tensor], max_shard_size="5GB", card="", progress=None
) -> List[str]:
    """The layout transformers' built-in `RwkvForCausalLM` loads without remote code."""
    tf_config = transformers_rwkv4_config(config)
    tf_config.architectures = ["RwkvForCausalLM"]
    sd = HF_LEGACY.from_blinkdl(blinkdl_sd)
    _set_dtype(tf_config, sd)
    tf_config.save_pretrained(out_dir)
    _generation_config().save_pretrained(out_dir)
    files = save_sharded(sd, out_dir, max_shard_size=max_shard_size, progress=progress)
    _save_tokenizer(out_dir)
    if card:
        (out_dir / "README.md").write_text(card, encoding="utf-8")
    return files


# --------------------------------------------------------------------------------------- model card
def _other_tools(spec) -> str:
    """Which `--layout` the tools that do not read our layout need (fla, llama.cpp)."""
    readers = {7: ("fla", "flash-linear-attention's `RWKV7ForCausalLM` and llama.cpp's `convert_hf_to_gguf.py`"),
               6: ("rwkv-world-hf", "llama.cpp's `convert_hf_to_gguf.py` and the RWKV/ HF repos' code"),
               5: ("rwkv-world-hf", "the RWKV/ HF repos' code")}
    if spec.family not in readers:
        return ""
    layout, tools = readers[spec.family]
    return (f"\n\n{tools[0].upper() + tools[1:]} do not read this folder's layout (fla would load it with random weights): "
            f"`rwkv-hf convert SOURCE OUT --layout {layout}` writes a folder they read.")


def model_card(src: Source, spec, config, n_params: int, dtype: str, layout: str, out_name: str) -> str:
    rows = [
        ("version", f"RWKV-{spec.version}"),
        ("layers", config.num_hidden_layers),
        ("width (n_embd)", config.hidden_size),
        ("channel-mix width", config.intermediate_size),
        ("vocabulary", config.vocab_size),
        ("parameters", f"{n_params:,}"),
        ("weights dtype", dtype),
    ]
    if spec.family >= 5:
        rows.insert(3, ("heads x head size", f"{config.num_attention_heads} x {config.head_size}"))
    if spec.family == 6:
        rows.insert(4, ("LoRA widths (mix, decay)", f"{config.mix_lora}, {config.decay_lora}"))
    if spec.family == 7:
        rows.insert(
            4, ("LoRA widths (decay, a, v, gate)", f"{config.decay_lora}, {config.a_lora}, {config.v_lora}, {config.gate_lora}")
        )
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    notes = "".join(f"- {n}\n" for n in src.notes)
    if layout == "transformers":
        load = f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out_name}")  # transformers' own RwkvForCausalLM, no remote code
tokenizer = AutoTokenizer.from_pretrained("{out_name}", trust_remote_code=True)  # the World tokenizer
```"""
    elif layout in TARGETS:
        load = f"""This folder is in the `{layout}` layout, for {TARGETS[layout].readers}; it carries no
model code of ours. rwkv-hf reads it back: `rwkv-hf convert {out_name} {out_name}-rwkv-hf`."""
    else:
        load = f"""With rwkv-hf installed (`pip install rwkv-hf`):

```python
import rwkv_hf  # registers the RWKV World classes with transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{out_name}")
tokenizer = AutoTokenizer.from_pretrained("{out_name}")
```

Without it, the model code in this folder runs as remote code:

```python
model = AutoModelForCausalLM.from_pretrained("{out_name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{out_name}", trust_remote_code=True)
```

From the command line: `rwkv-hf generate {out_name} "Tell me about RWKV."` or `rwkv-hf chat {out_name}`.
To get BlinkDL's `.pth` back (for the `rwkv` package, rwkv.cpp, RWKV-Runner): `rwkv-hf export {out_name} model.pth`.{_other_tools(spec)}"""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- rwkv
- rwkv{spec.family}
---

# {out_name}

RWKV-{spec.version} World model, converted to the Hugging Face format by rwkv-hf {__version__}
from `{src.path.name}` ({LAYOUTS[src.layout].description}).
Every size below was read from the tensor shapes.

| | |
|---|---|
{table}

{notes}
## Loading

{load}

The tokenizer is the RWKV World tokenizer (65536 tokens; slow and fast versions); token 0 ends a
document and is used for padding (on the left). The chat format is `User: ...\\n\\nAssistant: ...\\n\\n`
(`tokenizer.apply_chat_template`); generation stops at token 0 and at `"\\n\\n"` (token 261), where a
chat turn ends: pass `eos_token_id=0` to generate past blank lines.
"""


# ----------------------------------------------------------------------------------------- commands
@dataclass
class Conversion:
    source: Source
    spec: object
    config: object
    n_params: int
    files: List[str]
    out_dir: Path
    warnings: List[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        return describe(self.spec, self.config, self.n_params)


def convert_checkpoint(
    src: os.PathLike,
    out_dir: os.PathLike,
    dtype: Optional[str] = None,
    force: bool = False,
    max_shard_size="5GB",
    layout: str = "rwkv-hf",
    log: Callable[[str], None] = print,
    progress: Optional[bool] = None,
) -> Conversion:
    """Any supported checkpoint -> a Hugging Face folder. `layout`: "rwkv-hf" (ours, default),
    "transformers" (v4 only: transformers' built-in `RwkvForCausalLM`) or one of `targets.TARGETS`
    ("fla" for v7, "rwkv-world-hf" for v5/v6: the layouts fla and llama.cpp read)."""
    src, out_dir = Path(src), Path(out_dir)
    if layout not in OUTPUT_LAYOUTS:
        raise CheckpointError(f"unknown output layout {layout!r}; expected one of {', '.join(OUTPUT_LAYOUTS)}")
    if dtype is not None and dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    protect = [("the source", src)] if src.exists() else []
    guard_output(out_dir, force, protect)  # fail before reading gigabytes
    source = read_source(src)
    spec, config, original = build_hf_state_dict(source.state_dict)
    hf_sd = {k: v.to(DTYPES[dtype]) for k, v in original.items()} if dtype else original
    if layout == "transformers" and spec.family != 4:
        raise CheckpointError(f"--layout transformers is for RWKV-4 only (transformers has no RWKV-{spec.version}); this is RWKV-{spec.version}")
    target = check_target(layout, spec) if layout in TARGETS else None
    if target:  # refuse sizes the layout cannot hold before writing anything
        target_state_dict(target, spec, config, {})
    n_params = sum(v.numel() for v in hf_sd.values())
    log(f"read {src} ({LAYOUTS[source.layout].description})")
    log(f"detected {describe(spec, config, n_params)}; weights {_dtype_summary(hf_sd)}")
    for note in source.notes:
        log(f"note: {note}")
    warnings = weight_warnings(original, hf_sd, config)
    for warning in warnings:
        log(f"warning: {warning}")
    card = model_card(source, spec, config, n_params, _dtype_summary(hf_sd), layout, out_dir.name)
    log(f"writing {out_dir}{'' if layout == 'rwkv-hf' else f' in the {layout} layout'} ...")
    with atomic_folder(out_dir, force=force, protect=protect, log=log) as tmp:
        if target:
            blink = {to_blinkdl_key(k): v for k, v in hf_sd.items()}
            save = lambda sd, d: save_sharded(sd, d, max_shard_size=max_shard_size, progress=progress)  # noqa: E731
            files = write_target_folder(tmp, target, spec, config, blink, save, _save_tokenizer, _generation_config(), card)
        elif layout == "transformers":
            blink = {to_blinkdl_key(k): v for k, v in hf_sd.items()}
            files = write_transformers_rwkv4_folder(tmp, config, blink, max_shard_size=max_shard_size, card=card, progress=progress)
        else:
            files = write_hf_folder(tmp, spec, config, hf_sd, max_shard_size=max_shard_size, source=str(src), card=card, progress=progress)
    return Conversion(source, spec, config, n_params, files, out_dir, warnings)


def export_checkpoint(model_dir: os.PathLike, out_path: os.PathLike, force: bool = False, log: Callable[[str], None] = print):
    """A model folder (any supported layout) -> BlinkDL's `.pth`, tensors unchanged."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    sources = _folder_weight_files(model_dir) if model_dir.is_dir() else [model_dir]
    protect = [("the model's weights", f) for f in sources]
    guard_output(out_path, force, protect, folder=False)
    source = read_source(model_dir)
    spec, config, hf_sd = build_hf_state_dict(source.state_dict)  # validates: a complete model of one version
    log(f"read {model_dir} ({LAYOUTS[source.layout].description}): {describe(spec, config, sum(v.numel() for v in hf_sd.values()))}")
    with atomic_file(out_path, force=force, protect=protect, log=log) as tmp:
        try:
            torch.save({k: v.contiguous() for k, v in source.state_dict.items()}, tmp)
        except RuntimeError as e:  # torch's zip writer reports a failed write (disk full) as RuntimeError
            raise write_failed(out_path, e) from None
    log(f"wrote {out_path} (BlinkDL layout, {len(source.state_dict)} tensors)")
    return spec, config


__all__ = [
    "SPECS",
    "Conversion",
    "Source",
    "atomic_folder",
    "build_hf_state_dict",
    "convert_checkpoint",
    "export_checkpoint",
    "load_checkpoint",
    "read_source",
    "save_sharded",
]
