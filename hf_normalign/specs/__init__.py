"""Built-in architecture specs, one module per VLM family.

Each public module holds `SPEC`, the `ArchitectureSpec` of its family; `hf_normalign.registry` registers
`SPECS` on its first lookup. To add a family, copy the closest module and point the paths at the new model's
modules: every module here (except `_`-prefixed helpers) is found. From your own code, call
`hf_normalign.register_architecture` instead.
"""

import importlib
import pkgutil

SPECS = tuple(
    importlib.import_module(f".{module.name}", __name__).SPEC
    for module in pkgutil.iter_modules(__path__)
    if not module.name.startswith("_")
)

__all__ = ["SPECS"]
