"""rwkv-hf: RWKV World models as first-class Hugging Face transformers models."""

__version__ = "0.1.0"
