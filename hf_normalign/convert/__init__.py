"""Converting published checkpoints of other formats into aligned checkpoints (``normalign convert``).

One module per source format: ``llava_original`` (the LLaVA-1.5 training repository's
``LlavaLlamaForCausalLM``, with or without MoCa, as released for the MIR paper) and ``detect`` (recognising such
a folder cheaply, for the loaders' error message); the CLI runner is :mod:`hf_normalign.commands.convert`.
Nothing is imported here, so the loaders can use ``detect`` without importing torch-heavy conversion code.
"""
