"""hf-normalign: fix and measure the modality gap in multimodal LLMs.

Example:
    >>> import hf_normalign as normalign
    >>> model = normalign.testing.tiny_model("llava")       # or any supported VLM from the Hub
    >>> model = normalign.patch(model, methods=["projector_norm", "moca", "pre"])
    >>> normalign.get_config(model).methods
    ['projector_norm', 'moca', 'pre']
    >>> model = normalign.unpatch(model)                    # exact restore
"""

from . import diagnostics, persistence, testing
from .build import build_vlm
from .callbacks import MIRCallback
from .config import MoCaConfig, NormAlignConfig, PReConfig, ProjectorNormConfig
from .hub import push_to_hub
from .patching import get_config, is_patched, patch, unpatch
from .peft_utils import mark_plugin_trainable, plugin_lora_exclude_modules
from .persistence import (
    AutoNormAlignModelForImageTextToText,
    CheckpointInfo,
    NormAlignCheckpointError,
    autoload,
    from_pretrained,
    load_plugin_weights,
    read_checkpoint_info,
    save_pretrained,
)
from .quantization import bnb_config, prepare_for_kbit_training, quantization_skip_modules
from .registry import ArchitectureSpec, register_architecture, supported_architectures
from .trainer import NormAlignCallback

__version__ = "0.1.0"

# Load-time patching: transformers' own from_pretrained returns the patched model for a directory or
# repo that holds normalign_config.json (switch off with autoload(False) or HF_NORMALIGN_AUTOLOAD=0).
persistence.install()

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
    "supported_architectures",
    "testing",
    "unpatch",
]
