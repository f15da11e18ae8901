"""Aligned checkpoints: saving, loading, load-time patching and the adapter-only form.

An aligned checkpoint is a vanilla transformers checkpoint plus two files::

    config.json, generation_config.json, model.safetensors   # exactly what transformers writes for the base
    normalign_config.json                                     # method settings, format version, base model
    normalign.safetensors                                     # plugin weights, plugin-local names

The adapter-only form drops the base files: ``normalign_config.json`` names the base
(``base_model_name_or_path``), and ``normalign_modules.safetensors`` optionally carries modules trained
alongside the plugin (the projector after stage-1 alignment) under the base model's parameter names.

After ``import hf_normalign`` (the hooks are in :mod:`hf_normalign.integrations.transformers`):

- ``model.save_pretrained(path)`` on a patched model (its own method, bound by ``patch``) writes the layout above,
  atomically;
- ``normalign.from_pretrained(path_or_repo_id)``, ``AutoNormAlignModelForImageTextToText.from_pretrained``
  and transformers' own ``AutoModelForImageTextToText`` / ``LlavaForConditionalGeneration`` (...)
  ``from_pretrained`` return the patched model when the checkpoint holds ``normalign_config.json``.
  Switch load-time patching off with ``HF_NORMALIGN_AUTOLOAD=0`` or ``normalign.autoload(False)``.

Example:
    >>> import hf_normalign as normalign
    >>> model = normalign.patch(normalign.testing.tiny_model("llava"), methods="moca")
    >>> model.save_pretrained("aligned")                                   # doctest: +SKIP
    >>> model = normalign.from_pretrained("aligned")                       # doctest: +SKIP
    >>> normalign.save_pretrained(model, "adapter", adapter_only=True)     # doctest: +SKIP

Nothing here writes or reads pickle: weights go through ``safetensors.torch`` only.

One job per module: ``format`` (file names, version, fields, checksums, errors; standard library only, shared
with the vLLM plugin), ``info`` (``CheckpointInfo``), ``staging`` (crash-safe directory writes), ``save``,
``checks`` and ``load``, ``switch`` (the ``autoload`` switch). The hooks into transformers that call these are in
:mod:`hf_normalign.integrations.transformers`.
"""

from __future__ import annotations

import warnings

from .format import CONFIG_NAME, FORMAT_VERSION, MODULES_NAME, WEIGHTS_NAME, NormAlignCheckpointError
from .info import CheckpointInfo
from .load import AutoNormAlignModelForImageTextToText, from_pretrained, load_plugin_weights, read_checkpoint_info
from .save import save_pretrained
from .staging import COMMIT_NAME, recover
from .switch import AUTOLOAD_ENV, autoload, autoload_enabled


def install() -> None:
    """Deprecated, and a no-op: ``import hf_normalign`` installs the transformers integration
    (``hf_normalign.integrations.transformers.install``) as soon as transformers is imported, which importing this
    package has done."""
    warnings.warn(
        "hf_normalign.persistence.install() is deprecated and does nothing: `import hf_normalign` installs the "
        "transformers integration (hf_normalign.integrations.transformers.install) when transformers is imported.",
        FutureWarning,
        stacklevel=2,
    )


__all__ = [
    "AUTOLOAD_ENV",
    "COMMIT_NAME",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "MODULES_NAME",
    "WEIGHTS_NAME",
    "AutoNormAlignModelForImageTextToText",
    "CheckpointInfo",
    "NormAlignCheckpointError",
    "autoload",
    "autoload_enabled",
    "from_pretrained",
    "install",
    "load_plugin_weights",
    "read_checkpoint_info",
    "recover",
    "save_pretrained",
]
