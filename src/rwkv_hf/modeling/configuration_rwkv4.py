from .configuration_rwkv_base import RwkvWorldConfigBase


class Rwkv4Config(RwkvWorldConfigBase):
    """RWKV-4 World. `attention_hidden_size` is the width of the time-mix (rows of `att.key.weight`)."""

    model_type = "rwkv4_world"

    def __init__(self, attention_hidden_size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.attention_hidden_size = attention_hidden_size or self.hidden_size
