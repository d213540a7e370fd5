"""The RWKV World tokenizer: slow (pure Python) and fast (``tokenizers``), both exact.

The three source files below are flat and import only each other, the standard library, tokenizers
and transformers, so they can be copied into a model folder and run there as remote code.
"""

from .folder import (
    TOKENIZER_SOURCE_FILES,
    register_tokenizers,
    save_tokenizer_files,
    tokenizer_config,
    tokenizer_files,
    write_tokenizer_folder,
)
from .tokenization_rwkv_world import RwkvWorldTokenizer, load_vocab
from .tokenization_rwkv_world_fast import RwkvWorldTokenizerFast, build_backend, tokenizer_json_text

__all__ = [
    "RwkvWorldTokenizer",
    "RwkvWorldTokenizerFast",
    "TOKENIZER_SOURCE_FILES",
    "build_backend",
    "load_vocab",
    "register_tokenizers",
    "save_tokenizer_files",
    "tokenizer_config",
    "tokenizer_files",
    "tokenizer_json_text",
    "write_tokenizer_folder",
]
