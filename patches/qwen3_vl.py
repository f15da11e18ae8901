"""Qwen3-VL: besides the merger, the deepstack mergers' outputs are added to the vision positions
after the first decoder layers; `ProjectorNormConfig(deepstack=...)` decides whether they are
normalised too."""

from hf_normalign.spec import ArchitectureSpec

from ._layouts import QWEN_STYLE

SPEC = ArchitectureSpec(model_type="qwen3_vl", extra_projectors=("model.visual.deepstack_merger_list",), **QWEN_STYLE)
