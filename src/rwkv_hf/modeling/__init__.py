"""Configuration and model classes of every RWKV World version (flat: these files travel as remote code)."""

from .configuration_rwkv4 import Rwkv4Config
from .configuration_rwkv5 import Rwkv5Config
from .configuration_rwkv6 import Rwkv6Config
from .configuration_rwkv7 import Rwkv7Config
from .modeling_rwkv4 import Rwkv4ForCausalLM, Rwkv4Model
from .modeling_rwkv5 import Rwkv5ForCausalLM, Rwkv5Model
from .modeling_rwkv6 import Rwkv6ForCausalLM, Rwkv6Model
from .modeling_rwkv7 import Rwkv7ForCausalLM, Rwkv7Model
from .rwkv_cache import RwkvCache

FAMILIES = {
    4: (Rwkv4Config, Rwkv4Model, Rwkv4ForCausalLM),
    5: (Rwkv5Config, Rwkv5Model, Rwkv5ForCausalLM),
    6: (Rwkv6Config, Rwkv6Model, Rwkv6ForCausalLM),
    7: (Rwkv7Config, Rwkv7Model, Rwkv7ForCausalLM),
}

__all__ = [
    "FAMILIES",
    "RwkvCache",
    "Rwkv4Config",
    "Rwkv4Model",
    "Rwkv4ForCausalLM",
    "Rwkv5Config",
    "Rwkv5Model",
    "Rwkv5ForCausalLM",
    "Rwkv6Config",
    "Rwkv6Model",
    "Rwkv6ForCausalLM",
    "Rwkv7Config",
    "Rwkv7Model",
    "Rwkv7ForCausalLM",
]
