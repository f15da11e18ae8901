"""vLLM model classes with the aligned checkpoint's projector LayerNorm and MoCa; plain vLLM without one.

Each class subclasses vLLM's own and adds ``NormAlignMixin``. Where vLLM differs from a transformers forward:

- vLLM runs all scheduled tokens of all requests as one flattened sequence (``[num_tokens, D]``) and passes no
  ``input_ids`` to the decoder. The runner calls ``embed_input_ids(..., is_multimodal=mask)`` for the same tokens
  just before ``forward``; the mask is copied into a fixed-size buffer that the layer hooks read, so they are
  branch-free and capture-safe (torch.compile, CUDA graphs) and see exactly the vision positions of this step
  (also when chunked prefill splits an image, or prefix caching skips the cached ones).
- Projector outputs are cached by image hash (encoder cache) and a chunk may take part of an image's rows: the
  LayerNorm is row-wise, so it is applied in ``embed_input_ids`` to the rows being scattered.
- Only the transformers backend (``model_impl="transformers"``) is supported: it runs transformers' own decoder
  layers, so MoCa hooks the same outputs as in training. vLLM's native classes refuse an aligned checkpoint with
  a clear error (their LLaVA loader cannot read checkpoints saved by transformers 5.x either, so nothing could be
  verified there); they serve plain checkpoints unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration
from vllm.model_executor.models.transformers import TransformersMultiModalForCausalLM

from . import checkpoint as ckpt
from .serving_modules import NormAlignServingModules

# Where the decoder layers are, by class family: native vLLM wraps the LM as `language_model.model`; the
# transformers backend keeps the transformers module tree under `model`.
_LAYER_PATHS = ("language_model.model.layers", "model.language_model.layers", "model.text_model.layers")


class NormAlignMixin:
    """Adds the checkpoint's inference methods to a vLLM multimodal model class (see the module docstring)."""

    supported = True  # False: refuse aligned checkpoints (see the module docstring)

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        model_config = vllm_config.model_config
        self.normalign_checkpoint = ckpt.find(model_config.model, model_config.revision)
        self.normalign = None
        self.normalign_dtype = model_config.dtype
        if self.normalign_checkpoint is None:
            return  # a plain checkpoint: the class behaves exactly as vLLM's own
        if not self.supported:
            raise ckpt.NormAlignServingError(
                f"{self.normalign_checkpoint.folder} is an hf-normalign aligned checkpoint; vLLM chose its native "
                f"{type(self).__mro__[2].__name__}, which hf-normalign does not support. Serve it with the "
                "transformers backend: --model-impl transformers (LLM(..., model_impl='transformers')), which "
                "`normalign serve` passes by default."
            )
        max_tokens = vllm_config.scheduler_config.max_num_batched_tokens
        device = next(self.parameters()).device
        self.normalign = NormAlignServingModules(self.normalign_checkpoint, max_tokens).to(device)
        layers = self._decoder_layers()
        # Only the selected layers get a hook: the others trace to exactly vLLM's own graph.
        for index, key in zip(self.normalign_checkpoint.moca_layers, self.normalign.moca or {}, strict=True):
            layers[index].register_forward_hook(self.normalign.calibrate_hook(key))

    def _decoder_layers(self) -> nn.ModuleList:
        expected = self.normalign_checkpoint.num_decoder_layers
        for path in _LAYER_PATHS:
            try:
                layers = self.get_submodule(path)
            except AttributeError:
                continue
            if len(layers) != expected:
                raise ckpt.NormAlignServingError(
                    f"{self.normalign_checkpoint.folder}: {ckpt.CONFIG_NAME} was written for {expected} decoder "
                    f"layers, but vLLM built {len(layers)} ({path}): the plugin weights belong to another model."
                )
            return layers
        raise ckpt.NormAlignServingError(f"hf-normalign cannot find the decoder layers of {type(self).__name__}.")

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self.normalign is not None:
            if multimodal_embeddings is not None and self.normalign.projector_norm is not None:
                multimodal_embeddings = self.normalign.normalize(multimodal_embeddings)
            self.normalign.record_vision_positions(input_ids.shape[0], is_multimodal)
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.normalign is None:
            return super().load_weights(weights)
        # vLLM's loader reads every *.safetensors of the folder, ours included: keep those names for the plugin.
        ours = ckpt.weight_names(self.normalign_checkpoint)
        loaded = super().load_weights((name, tensor) for name, tensor in weights if name not in ours)
        state = self.normalign.state_dict()
        tensors = ckpt.read_weights(self.normalign_checkpoint, state)
        self.normalign.load_state_dict(tensors, strict=True)
        self.normalign.prepare(self.normalign_dtype)
        return set(loaded) | {f"normalign.{key}" for key in state}


class NormAlignLlava(NormAlignMixin, LlavaForConditionalGeneration):
    supported = False


class NormAlignQwen2VL(NormAlignMixin, Qwen2VLForConditionalGeneration):
    supported = False


class NormAlignQwen2_5_VL(NormAlignMixin, Qwen2_5_VLForConditionalGeneration):
    supported = False


class NormAlignTransformersMultiModal(NormAlignMixin, TransformersMultiModalForCausalLM):
    pass
