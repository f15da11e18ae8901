"""Converting published checkpoints of other formats into aligned checkpoints (``normalign convert``).

One module per source format: ``llava_original`` (the LLaVA-1.5 training repository's
``LlavaLlamaForCausalLM``, with or without MoCa, as released for the MIR paper), ``detect`` (recognising such a
folder cheaply, for the loaders' error message) and ``command`` (the CLI). Nothing is imported here, so the
loaders can use ``detect`` without importing torch-heavy conversion code.
"""
