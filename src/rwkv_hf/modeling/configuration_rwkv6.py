from .configuration_rwkv_base import RwkvWorldConfigBase


class Rwkv6Config(RwkvWorldConfigBase):
    """RWKV-6 "Finch" World. `mix_lora`: width of the data-dependent token-shift LoRA (`time_maa_w1` has
    5 x that many columns); `decay_lora`: width of the data-dependent decay LoRA (`time_decay_w1`)."""

    model_type = "rwkv6_world"

    def __init__(self, mix_lora: int = 32, decay_lora: int = 64, **kwargs):
        self.mix_lora = mix_lora
        self.decay_lora = decay_lora
        super().__init__(**kwargs)
