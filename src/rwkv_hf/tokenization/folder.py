"""Write the World tokenizer as a standalone folder (or into a model folder) that loads with
``AutoTokenizer.from_pretrained(folder, trust_remote_code=True)`` where rwkv_hf is not installed."""

import json
import shutil
from pathlib import Path

from .tokenization_rwkv_world import CHAT_TEMPLATE, EOS_TOKEN, VOCAB_FILES_NAMES
from .tokenization_rwkv_world_fast import TOKENIZER_FILE, tokenizer_json_text

HERE = Path(__file__).resolve().parent

# The flat remote-code set: each imports only its siblings, the standard library, tokenizers, transformers.
TOKENIZER_SOURCE_FILES = (
    "tokenization_rwkv_world.py",
    "tokenization_rwkv_world_fast.py",
    "tokenizer_json_rwkv_world.py",
)

AUTO_MAP = {
    "AutoTokenizer": [
        "tokenization_rwkv_world.RwkvWorldTokenizer",
        "tokenization_rwkv_world_fast.RwkvWorldTokenizerFast",
    ]
}


def tokenizer_files():
    """Paths of the files a folder needs copied as they are: the three .py files and the vocab."""
    return [HERE / name for name in TOKENIZER_SOURCE_FILES] + [HERE / VOCAB_FILES_NAMES["vocab_file"]]


def tokenizer_config(model_max_length=None):
    """The ``tokenizer_config.json`` content (with ``auto_map`` for the slow and fast classes)."""
    config = {
        "tokenizer_class": "RwkvWorldTokenizer",
        "auto_map": AUTO_MAP,
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "padding_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    return config


def save_tokenizer_files(out_dir, model_max_length=None):
    """Write every tokenizer file into the existing folder ``out_dir``; return the written paths.

    For the model converter: a model folder gets the same files as a standalone tokenizer folder.
    """
    out = Path(out_dir)
    written = []
    for src in tokenizer_files():
        dst = out / src.name
        shutil.copyfile(src, dst)
        written.append(dst)
    path = out / TOKENIZER_FILE
    path.write_text(tokenizer_json_text(str(HERE / VOCAB_FILES_NAMES["vocab_file"])), encoding="utf-8")
    written.append(path)
    path = out / "tokenizer_config.json"
    path.write_text(json.dumps(tokenizer_config(model_max_length), indent=2, ensure_ascii=False) + "\n", "utf-8")
    written.append(path)
    path = out / "special_tokens_map.json"
    special = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}
    path.write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    written.append(path)
    return written


def write_tokenizer_folder(out_dir, force=False, model_max_length=None, log=print):
    """Create ``out_dir`` holding the tokenizer alone. Refuses a non-empty folder unless ``force``, and
    even then one rwkv-hf did not write (the rules of ``rwkv_hf.safe_write``).

    Files go to a temporary sibling folder that is renamed into place when complete, so a crash never
    leaves a half-written folder behind.
    """
    from ..safe_write import atomic_folder

    with atomic_folder(out_dir, force=force, log=log) as tmp:
        save_tokenizer_files(tmp, model_max_length)
    return Path(out_dir)


def register_tokenizers(config_class):
    """Register both classes with ``AutoTokenizer`` for ``config_class`` (transformers 4.57 and 5.x)."""
    from transformers import AutoTokenizer

    from .tokenization_rwkv_world import RwkvWorldTokenizer
    from .tokenization_rwkv_world_fast import RwkvWorldTokenizerFast

    AutoTokenizer.register(
        config_class,
        slow_tokenizer_class=RwkvWorldTokenizer,
        fast_tokenizer_class=RwkvWorldTokenizerFast,
        exist_ok=True,
    )
