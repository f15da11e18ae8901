"""Two-stage training recipes for aligned VLMs (installed as ``hf_normalign.recipes``).

- ``stage1``: alignment. Vision tower and LLM frozen; the projector (+ Qwen3-VL deepstack mergers) and the
  hf-normalign plugin are trained.
- ``stage2``: instruction tuning. Projector, LLM (full, ``--lora`` or ``--qlora``) and plugin are trained.
- ``make_tiny_data``: a tiny LLaVA-style data set (and optionally a tiny model) for trying the recipes offline.

Each runs as ``python -m hf_normalign.recipes.stage1 --config CONFIG.yaml [--key value ...]`` (or the
``normalign-stage1`` / ``normalign-stage2`` console scripts), single-process or under ``accelerate launch``.
The machinery, one job a module: ``arguments`` (options, light ``--help``), ``config`` (``parse_args``: a
validated ``RecipeConfig``), ``dataset``, ``model_setup`` (build, load, patch, freeze per stage, LoRA),
``callbacks``, ``train`` (``build_trainer``, ``run``, ``main``). See docs/recipes.md.
"""
