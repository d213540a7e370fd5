"""Default LoRA targets of each RWKV World model type, made known to PEFT.

PEFT picks the modules of `LoraConfig(target_modules=None)` from its table
`peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, keyed by
`config.model_type`; it knows transformers' "rwkv" and "rwkv7" but not our types. `register_lora_targets`
adds ours to that table: at once if PEFT is imported already, else right after PEFT imports it (an
import hook that runs PEFT's own module, then adds the entries). Entries PEFT has for these types win.

The targets are the block's linear layers by their last name: the time mix's receptance, key, value,
output (and gate in v5.1+/v6) and the channel mix's key, value (and receptance in v4-v6), as PEFT's
own "rwkv" entry does for transformers' RWKV-4.

This file is part of the flat remote-code folder: standard library only.
"""

import importlib.abc
import importlib.machinery
import sys

LORA_TARGET_MODULES = {
    "rwkv4_world": ("receptance", "key", "value", "output"),
    "rwkv5_world": ("receptance", "key", "value", "gate", "output"),
    "rwkv6_world": ("receptance", "key", "value", "gate", "output"),
    "rwkv7_world": ("receptance", "key", "value", "output"),
}
_PEFT_TABLE_MODULE = "peft.utils.constants"
_PEFT_TABLE = "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"


def _add_entries(module) -> None:
    table = getattr(module, _PEFT_TABLE, None)
    if isinstance(table, dict):
        for model_type, targets in LORA_TARGET_MODULES.items():
            table.setdefault(model_type, list(targets))


class _AfterPeftTable(importlib.abc.MetaPathFinder):
    """Finds PEFT's constants module as the normal path finder does; its loader then adds our entries."""

    rwkv_lora_targets = True  # marks the one instance, whichever copy of this file installed it

    def find_spec(self, name, path=None, target=None):
        if name != _PEFT_TABLE_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        run = loader.exec_module

        def exec_module(module):
            run(module)
            _add_entries(module)

        loader.exec_module = exec_module
        return spec


def register_lora_targets() -> None:
    """Make `LoraConfig()` without `target_modules` work for our model types (see the module docstring)."""
    module = sys.modules.get(_PEFT_TABLE_MODULE)
    if module is not None:
        _add_entries(module)
    elif not any(getattr(f, "rwkv_lora_targets", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftTable())
