from .configuration_rwkv_base import RwkvWorldConfigBase


class Rwkv7Config(RwkvWorldConfigBase):
    """RWKV-7 "Goose" World. The four LoRA widths are the columns of `w1` (decay), `a1` (in-context
    learning rate), `v1` (value residual) and `g1` (gate). `deep_embed_size`: the DeepEmbed rank D of
    checkpoints whose channel mixes have `s_emb`/`s_emb_x`/`s0`/`s1`/`s2` (columns of `ffn.s1`), 0 without."""

    model_type = "rwkv7_world"

    def __init__(self, decay_lora: int = 64, a_lora: int = 64, v_lora: int = 32, gate_lora: int = 128, deep_embed_size: int = 0, **kwargs):
        self.decay_lora = decay_lora
        self.a_lora = a_lora
        self.v_lora = v_lora
        self.gate_lora = gate_lora
        self.deep_embed_size = deep_embed_size
        kwargs.setdefault("rescale_every", 0)
        super().__init__(**kwargs)
