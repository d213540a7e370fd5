"""rwkv-hf: RWKV World models (v4, v5, v6, v7) as first-class Hugging Face transformers models.

Importing the package registers every config, model and tokenizer class with the transformers Auto*
factories, so `AutoModelForCausalLM.from_pretrained(folder)` works without `trust_remote_code`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from . import modeling as _modeling
from .modeling import (
    FAMILIES,
    Rwkv4Config,
    Rwkv4ForCausalLM,
    Rwkv4Model,
    Rwkv5Config,
    Rwkv5ForCausalLM,
    Rwkv5Model,
    Rwkv6Config,
    Rwkv6ForCausalLM,
    Rwkv6Model,
    Rwkv7Config,
    Rwkv7ForCausalLM,
    Rwkv7Model,
    RwkvCache,
)
from .modeling import rwkv_saving as _saving
from .tokenization import RwkvWorldTokenizer, RwkvWorldTokenizerFast, save_tokenizer_files
from .version import __version__  # noqa: F401



def _register() -> None:
    for config_cls, model_cls, lm_cls in FAMILIES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModel.register(config_cls, model_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, lm_cls, exist_ok=True)
        AutoTokenizer.register(
            config_cls, slow_tokenizer_class=RwkvWorldTokenizer, fast_tokenizer_class=RwkvWorldTokenizerFast, exist_ok=True
        )


_register()
_saving.TOKENIZER_WRITER[:] = [save_tokenizer_files]  # save_pretrained writes our tokenizer files

# the classes of every version (modeling's own list, less its FAMILIES table) and the tokenizers
__all__ = [name for name in _modeling.__all__ if name != "FAMILIES"] + ["RwkvWorldTokenizer", "RwkvWorldTokenizerFast"]
