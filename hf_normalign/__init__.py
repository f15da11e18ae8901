"""hf-normalign: fix and measure the modality gap in multimodal LLMs.

Example:
    >>> import hf_normalign as normalign
    >>> model = normalign.testing.tiny_model("llava")       # or any supported VLM from the Hub
    >>> model = normalign.patch(model, methods=["projector_norm", "moca", "pre"])
    >>> normalign.get_config(model).methods
    ['projector_norm', 'moca', 'pre']
    >>> model = normalign.unpatch(model)                    # exact restore
"""

from . import testing
from .config import MoCaConfig, NormAlignConfig, PReConfig, ProjectorNormConfig
from .patching import get_config, is_patched, patch, unpatch
from .registry import ArchitectureSpec, register_architecture, supported_architectures
from .trainer import NormAlignCallback

__version__ = "0.1.0"

__all__ = [
    "ArchitectureSpec",
    "MoCaConfig",
    "NormAlignCallback",
    "NormAlignConfig",
    "PReConfig",
    "ProjectorNormConfig",
    "__version__",
    "get_config",
    "is_patched",
    "patch",
    "register_architecture",
    "supported_architectures",
    "testing",
    "unpatch",
]
