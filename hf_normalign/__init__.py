"""hf-normalign: fix and measure the modality gap in multimodal LLMs.

Example:
    >>> import hf_normalign as normalign
    >>> model = normalign.testing.tiny_model("llava")       # or any supported VLM from the Hub
    >>> model = normalign.patch(model, methods=["projector_norm", "moca", "pre"])
    >>> normalign.get_config(model).methods
    ['projector_norm', 'moca', 'pre']
    >>> model = normalign.unpatch(model)                    # exact restore
"""

from __future__ import annotations

import importlib
from typing import Any

import wrapt

__version__ = "0.1.0"

# Public names -> the module defining them, imported on first use: `import hf_normalign` (and so the CLI's
# --help) imports neither torch nor transformers.
_EXPORTS = {
    "MIRCallback": "callbacks.mir",
    "build_vlm": "build",
    **dict.fromkeys(("MoCaConfig", "NormAlignConfig", "PReConfig", "ProjectorNormConfig"), "config"),
    "push_to_hub": "hub",
    **dict.fromkeys(("get_config", "is_patched", "patch", "set_loss_scaler", "unpatch"), "patching"),
    **dict.fromkeys(("mark_plugin_trainable", "plugin_lora_exclude_modules"), "peft_utils"),
    **dict.fromkeys(
        (
            "AutoNormAlignModelForImageTextToText",
            "CheckpointInfo",
            "NormAlignCheckpointError",
            "autoload",
            "from_pretrained",
            "load_plugin_weights",
            "read_checkpoint_info",
            "save_pretrained",
        ),
        "persistence",
    ),
    **dict.fromkeys(("bnb_config", "prepare_for_kbit_training", "quantization_skip_modules"), "quantization"),
    **dict.fromkeys(
        ("get_spec", "register_architecture", "supported_architectures", "unregister_architecture"), "registry"
    ),
    "ArchitectureSpec": "spec",
    "NormAlignCallback": "callbacks.pre",
}
_SUBMODULES = ("diagnostics", "persistence", "testing")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def _install_on_transformers_import(_transformers: Any) -> None:
    from .integrations.transformers import install  # imports no other hf_normalign module at once: safe mid-import

    install()


# The transformers integration: transformers' own from_pretrained returns the patched model for a directory or
# repo that holds normalign_config.json (switch off with autoload(False) or HF_NORMALIGN_AUTOLOAD=0), and patched
# models get their own save_pretrained / push_to_hub. Installed as soon as transformers is imported (now, if it
# already is).
wrapt.register_post_import_hook(_install_on_transformers_import, "transformers")

__all__ = [
    "ArchitectureSpec",
    "AutoNormAlignModelForImageTextToText",
    "CheckpointInfo",
    "MIRCallback",
    "MoCaConfig",
    "NormAlignCallback",
    "NormAlignCheckpointError",
    "NormAlignConfig",
    "PReConfig",
    "ProjectorNormConfig",
    "__version__",
    "autoload",
    "bnb_config",
    "build_vlm",
    "diagnostics",
    "from_pretrained",
    "get_config",
    "get_spec",
    "is_patched",
    "load_plugin_weights",
    "mark_plugin_trainable",
    "patch",
    "plugin_lora_exclude_modules",
    "prepare_for_kbit_training",
    "push_to_hub",
    "quantization_skip_modules",
    "read_checkpoint_info",
    "register_architecture",
    "save_pretrained",
    "set_loss_scaler",
    "supported_architectures",
    "testing",
    "unpatch",
    "unregister_architecture",
]
