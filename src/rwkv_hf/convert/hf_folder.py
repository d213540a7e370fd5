"""Write a Hugging Face model folder from a BlinkDL checkpoint, and read one back.

The folder holds config.json (with `architectures` and `auto_map`), generation_config.json,
safetensors weights, the tokenizer files and the remote-code `.py` files, so it loads with
`AutoModelForCausalLM.from_pretrained(folder)` after `import rwkv_hf`, and with
`trust_remote_code=True` on a machine that never installed rwkv-hf. Everything is written into a
temporary folder that is renamed into place only once complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple

import torch
from transformers import GenerationConfig

from ..modeling import FAMILIES
from .blinkdl import SPECS, CheckpointError, config_from_state_dict, to_blinkdl_key, to_hf_key

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def remote_code_files() -> list:
    """Every file a model needs to run as remote code: the flat `modeling/` folder, minus the package init."""
    return sorted(p for p in MODELING_DIR.glob("*.py") if p.name != "__init__.py")


def load_checkpoint(path: os.PathLike) -> Dict[str, torch.Tensor]:
    """Load a BlinkDL `.pth` safely (`weights_only=True`), with one clear error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many kinds for truncated/corrupt/unsafe files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read as a PyTorch checkpoint ({first})") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: is not a state dict of tensors")
    return dict(sd)


def build_hf_state_dict(sd: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype] = None):
    """Detect, validate every tensor against the model's own parameters, and rename to our keys.

    Returns (spec, config, hf_state_dict). Missing, unexpected or mis-shaped tensors raise CheckpointError.
    """
    spec, config = config_from_state_dict(sd)
    lm_cls = FAMILIES[spec.family][2]
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in lm_cls(config).state_dict().items()}
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


@contextlib.contextmanager
def atomic_folder(out_dir: os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir` that replaces it only if the block finishes."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise FileExistsError(f"{out_dir} exists and is not empty (use --force to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_hf_folder(
    out_dir: Path, spec, config, hf_sd: Mapping[str, torch.Tensor], max_shard_size="5GB", source: str = ""
) -> None:
    """Write config, generation config, weights, tokenizer and remote code into `out_dir`."""
    from huggingface_hub import save_torch_state_dict

    config_cls, model_cls, lm_cls = FAMILIES[spec.family]
    config.architectures = [lm_cls.__name__]
    config.auto_map = {
        "AutoConfig": f"configuration_rwkv{spec.family}.{config_cls.__name__}",
        "AutoModel": f"modeling_rwkv{spec.family}.{model_cls.__name__}",
        "AutoModelForCausalLM": f"modeling_rwkv{spec.family}.{lm_cls.__name__}",
    }
    dtypes = {v.dtype for v in hf_sd.values()}
    if len(dtypes) == 1:  # transformers 5 calls it `dtype`, 4.57 `torch_dtype`
        name = "dtype" if "dtype" in type(config)().to_dict() else "torch_dtype"
        setattr(config, name, str(next(iter(dtypes))).replace("torch.", ""))
    config.save_pretrained(out_dir)
    GenerationConfig(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=True, temperature=1.0, top_p=0.3, max_new_tokens=256
    ).save_pretrained(out_dir)
    save_torch_state_dict(dict(hf_sd), out_dir, max_shard_size=max_shard_size, safe_serialization=True)
    for f in remote_code_files():
        shutil.copy2(f, out_dir / f.name)
    _save_tokenizer(out_dir)


def _save_tokenizer(out_dir: Path) -> None:
    try:
        from ..tokenization import save_tokenizer_files
    except ImportError:  # pragma: no cover - the tokenizer lands alongside
        return
    save_tokenizer_files(out_dir)


def convert_checkpoint(
    src: os.PathLike,
    out_dir: os.PathLike,
    dtype: Optional[str] = None,
    force: bool = False,
    max_shard_size="5GB",
    log=print,
) -> Tuple[object, object]:
    """`.pth` -> HF folder. Returns (spec, config)."""
    sd = load_checkpoint(src)
    spec, config, hf_sd = build_hf_state_dict(sd, DTYPES[dtype] if dtype else None)
    log(f"detected {describe(spec, config, sum(v.numel() for v in hf_sd.values()))}")
    with atomic_folder(out_dir, force=force) as tmp:
        write_hf_folder(tmp, spec, config, hf_sd, max_shard_size=max_shard_size, source=str(src))
    return spec, config


def export_checkpoint(model_dir: os.PathLike, out_path: os.PathLike) -> None:
    """HF folder -> BlinkDL `.pth` with the original keys and shapes."""
    from safetensors.torch import load_file

    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no .safetensors weights")
    sd = {}
    for f in files:
        sd.update(load_file(f))
    torch.save({to_blinkdl_key(k): v for k, v in sd.items()}, out_path)


__all__ = ["SPECS", "convert_checkpoint", "export_checkpoint", "load_checkpoint", "build_hf_state_dict"]
