"""What `save_pretrained` writes beside transformers' own files, so that a saved folder loads with
`trust_remote_code=True` where rwkv-hf is not installed: `auto_map`, the model code (this flat folder),
the World tokenizer files and a model card. A leaf: it imports only the standard library (and, when
rwkv-hf is installed, its tokenizer files through `TOKENIZER_WRITER`)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import List

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "special_tokens_map.json", "rwkv_vocab_v20230424.txt",
                    "tokenization_rwkv_world.py", "tokenization_rwkv_world_fast.py", "tokenizer_json_rwkv_world.py")


# rwkv-hf, when installed, puts its tokenizer writer here (`rwkv_hf/__init__.py`): this folder also runs
# as remote code without rwkv-hf, so it does not import the package
TOKENIZER_WRITER: list = []


def auto_map(model) -> dict:
    """`auto_map` for this model's version: its config, base model and causal-LM classes."""
    cls = next(c for c in type(model).__mro__ if c.__module__.rsplit(".", 1)[-1].startswith("modeling_rwkv"))
    if getattr(cls, "model_cls", None):
        lm_cls = cls
    else:
        lm_cls = next(c for c in vars(sys.modules[cls.__module__]).values() if getattr(c, "model_cls", None) is cls)

    def name(c: type) -> str:
        return f"{c.__module__.rsplit('.', 1)[-1]}.{c.__name__}"

    return {"AutoConfig": name(type(model.config)), "AutoModel": name(lm_cls.model_cls), "AutoModelForCausalLM": name(lm_cls)}


def remote_code_files() -> List[Path]:
    """Every file a model needs to run as remote code: this flat folder, minus the package init (as
    remote code: the files copied with it)."""
    return sorted(p for p in Path(__file__).resolve().parent.glob("*.py") if p.name != "__init__.py")


def write_self_contained(model, out: Path) -> None:
    """What `save_pretrained` adds to transformers' files: the model code, the tokenizer, a model card."""
    for f in remote_code_files():
        if f.resolve() != (out / f.name).resolve():
            shutil.copyfile(f, out / f.name)
    if not (out / "tokenizer_config.json").exists():
        if TOKENIZER_WRITER:  # rwkv-hf installed: its tokenizer files
            TOKENIZER_WRITER[0](out)
        else:  # running as remote code: the tokenizer of the folder the model came from, if local
            src = Path(str(model.name_or_path))
            if (src / "tokenizer_config.json").is_file() and src.resolve() != out.resolve():
                for name in _TOKENIZER_FILES:
                    if (src / name).is_file():
                        shutil.copyfile(src / name, out / name)
    if not (out / "README.md").exists():
        (out / "README.md").write_text(_model_card(model, out.name), encoding="utf-8")


def _model_card(model, name: str) -> str:
    version = getattr(model.config, "rwkv_version", model.config.model_type.replace("rwkv", "").replace("_world", ""))
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags:
- rwkv
---

# {name}

An RWKV-{version} World model ({model.config.num_hidden_layers} layers, width {model.config.hidden_size}), saved with
`save_pretrained`. The model code is in this folder:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
```

With rwkv-hf installed, `import rwkv_hf` first and leave out `trust_remote_code`.
"""
