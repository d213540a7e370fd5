"""`.pth` -> Hugging Face folder and back."""

from .blinkdl import SPECS, CheckpointError, config_from_state_dict, detect_version
from .hf_folder import build_hf_state_dict, convert_checkpoint, export_checkpoint, load_checkpoint, remote_code_files

__all__ = [
    "SPECS",
    "CheckpointError",
    "build_hf_state_dict",
    "config_from_state_dict",
    "convert_checkpoint",
    "detect_version",
    "export_checkpoint",
    "load_checkpoint",
    "remote_code_files",
]
