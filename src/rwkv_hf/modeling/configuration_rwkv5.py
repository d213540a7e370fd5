from .configuration_rwkv_base import RwkvWorldConfigBase

RWKV5_VERSIONS = ("5.0", "5.1", "5.2")


class Rwkv5Config(RwkvWorldConfigBase):
    """RWKV-5 "Eagle" World. `rwkv_version`: "5.0" (no gate, one decay per head), "5.1" (gate),
    "5.2" (gate, one decay and one bonus per channel)."""

    model_type = "rwkv5_world"

    def __init__(self, rwkv_version: str = "5.2", **kwargs):
        if str(rwkv_version) not in RWKV5_VERSIONS:
            raise ValueError(f"rwkv_version must be one of {RWKV5_VERSIONS}, got {rwkv_version!r}")
        self.rwkv_version = str(rwkv_version)
        super().__init__(**kwargs)
