"""One module per method: its maths (torch modules and functions) and its wiring into a patched model.

The module ``methods/<name>.py`` of each name in ``hf_normalign.config.METHODS`` defines:

- ``build(plugin, target, *, init_weights)``: check the method's config against the model and add the method's
  modules to ``plugin`` (the model's :class:`~hf_normalign.patching.NormAlignModules`); ``target`` is the model
  seen through its spec (:class:`~hf_normalign.model_view.ModelView`); ``init_weights=False`` when saved plugin
  weights are loaded next (skip measuring the model). Nothing is attached to the model yet, so an error leaves
  it untouched. A method keeps its own run state on the plugin (PRe: ``plugin.pre_run``).
- optionally ``attach(plugin, target)``: register the method's hooks with ``plugin.add_hook``;
- optionally ``layer_indices(plugin, target)`` and ``at_layer(plugin, layer_idx, hidden, vision_mask, kwargs)``:
  the decoder layers the method acts at and what it does to their output. ``hf_normalign.hooks`` registers one
  hook per decoder layer, which runs the methods' ``at_layer`` in ``METHODS`` order.

So a new method is a config class in ``config.py`` and a module here; ``patching`` finds the module by name.
``moca.py`` and ``projector_norm.py`` import nothing from hf_normalign: the vLLM plugin loads them by path.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def load(name: str) -> ModuleType:
    """The module of method `name` (a name of ``hf_normalign.config.METHODS``).

    Example:
        >>> load("moca").moca_key(3)
        'layer_3_norm'
    """
    return importlib.import_module(f"{__name__}.{name}")
