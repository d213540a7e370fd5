"""Checkpoints in any published RWKV layout -> Hugging Face folder, and back to BlinkDL's `.pth`."""

from .blinkdl import SPECS, CheckpointError, config_from_state_dict, detect_version
from .hf_folder import (
    Conversion,
    build_hf_state_dict,
    convert_checkpoint,
    export_checkpoint,
    load_checkpoint,
    read_source,
    remote_code_files,
)
from .layouts import LAYOUTS, detect_layout, to_blinkdl

__all__ = [
    "LAYOUTS",
    "SPECS",
    "CheckpointError",
    "Conversion",
    "build_hf_state_dict",
    "config_from_state_dict",
    "convert_checkpoint",
    "detect_layout",
    "detect_version",
    "export_checkpoint",
    "load_checkpoint",
    "read_source",
    "remote_code_files",
    "to_blinkdl",
]
