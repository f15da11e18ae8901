"""Offline factories for tiny vision-language models, tokenizers, processors and batches.

Everything here builds without network access (no HF Hub), so tests can exercise every supported VLM family
on CPU in milliseconds::

    from hf_normalign.testing import TINY_FAMILIES, tiny_batch, tiny_model

    for family in TINY_FAMILIES:
        model = tiny_model(family)
        out = model(**tiny_batch(model, ragged=True, padding_side="left"))
        assert out.loss.isfinite()

Token ids are shared by all families (text vocab = 256; see ``hf_normalign.specs._tiny``)::

    0 pad, 1 bos, 2 eos, 3 unk        4..199 text (trained BPE pieces, then <unused_k> fillers)
    200..235 Idefics3 / SmolVLM <row_i_col_j> tile tags
    250 image placeholder   251 video placeholder   252 image-block start   253 image-block end
    254 image separator (<global-img>, [IMG_BREAK])   255 <end_of_utterance>

``tiny_config`` and ``tiny_tokenizer`` agree on these ids, so processor output runs through ``tiny_model``.
Images are one vision tile: 32x32 pixels (56x56 for Qwen2/2.5-VL, 64x64 for Qwen3-VL).

Each family's recipe is data on its spec (``ArchitectureSpec.tiny``, in ``hf_normalign.specs``); this package
implements the layouts the recipes name (``family``) and builds models (``models``), tokenizers
(``tokenizer``), processors (``processors``) and batches (``batches``) from them.
"""

from .batches import tiny_batch, tiny_text_batch
from .family import TINY_FAMILIES
from .models import tiny_config, tiny_model
from .processors import tiny_processor
from .tokenizer import tiny_tokenizer

__all__ = [
    "TINY_FAMILIES",
    "tiny_batch",
    "tiny_config",
    "tiny_model",
    "tiny_processor",
    "tiny_text_batch",
    "tiny_tokenizer",
]
