"""lmms-eval model ``hf_normalign``: evaluate an aligned checkpoint with its intervention applied.

lmms-eval's own Hugging Face models load with plain transformers, which ignores ``normalign_config.json`` and
scores the base model. This one loads with :func:`hf_normalign.from_pretrained` and refuses a checkpoint it
cannot load patched. Installed with ``pip install 'hf-normalign[eval]'``; lmms-eval finds it through the
``lmms_eval.models`` entry point (:func:`manifest`)::

    lmms-eval --model hf_normalign --model_args pretrained=me/llava-1.5-7b-normalign,dtype=bfloat16 \\
        --tasks mmstar --batch_size 1

Prompts go through the processor's chat template (one image part per visual, then the task's text), or, for a
processor without one, the text with the image placeholder per visual in front.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from ..patching import is_patched
from ..persistence.load import from_pretrained

if TYPE_CHECKING:
    from lmms_eval.models.registry_v2 import ModelManifest

MODEL_ID = "hf_normalign"


def manifest() -> ModelManifest:
    """The ``lmms_eval.models`` entry point: ``--model hf_normalign``."""
    # Imported here: importing lmms_eval.models scans this very entry point, which would find this module half-loaded.
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.NormAlignLMM", aliases=("normalign",))


class NormAlignLMM(lmms):
    """An aligned checkpoint (folder or Hub id) as an lmms-eval model; generation and log-likelihood requests.

    Args (``--model_args``): ``pretrained``, ``revision``, ``device`` (default ``cuda`` when available), ``dtype``
    (``auto``, ``bfloat16`` ...), ``max_new_tokens`` (default 256, when a task gives none), ``batch_size`` (1).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        max_new_tokens: int = 256,
        batch_size: int | str = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        from transformers import AutoProcessor

        if kwargs:
            raise TypeError(f"hf_normalign model: unknown --model_args {sorted(kwargs)}.")
        if int(batch_size) != 1:
            raise ValueError("hf_normalign model: batch_size must be 1 (requests are run one at a time).")
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = from_pretrained(pretrained, revision=revision, dtype=torch_dtype).to(self._device).eval()
        if not is_patched(self.model):  # from_pretrained raises first; kept as the wrapper's own guarantee
            raise RuntimeError(f"{pretrained} loaded without its hf-normalign intervention.")
        self.processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        self.max_new_tokens = int(max_new_tokens)

    # --- prompts -------------------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual: Any, doc_id: Any, task: str, split: str) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]

    def _inputs(self, context: str, visuals: list[Any]) -> dict[str, torch.Tensor]:
        image_token = getattr(self.processor, "image_token", "<image>")
        text = context.replace(image_token, "").strip() if visuals else context
        if getattr(self.processor, "chat_template", None):
            content = [{"type": "image"} for _ in visuals] + [{"type": "text", "text": text}]
            prompt = self.processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True
            )
        else:
            prompt = "".join(f"{image_token}\n" for _ in visuals) + text
        inputs = self.processor(images=visuals or None, text=prompt, return_tensors="pt")
        return {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}

    # --- the lmms interface ----------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or, with ``temperature`` > 0, sampled) continuations, cut at the first ``until`` string."""
        outputs = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(gen_kwargs.get("temperature", 0) or 0)
            inputs = self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split))
            with torch.no_grad():
                ids = self.model.generate(
                    **inputs,
                    max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                    do_sample=temperature > 0,
                    **({"temperature": temperature, "top_p": gen_kwargs.get("top_p")} if temperature > 0 else {}),
                    num_beams=int(gen_kwargs.get("num_beams", 1)),
                )
            text = self.processor.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return outputs

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities after the prompt, and whether greedy decoding gives it."""
        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc)
            inputs = self._inputs(context, self._visuals(doc_to_visual, doc_id, task, split))
            target = self.processor.tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids
            target = target.to(self._device)
            prompt_len = inputs["input_ids"].shape[1]
            inputs["input_ids"] = torch.cat([inputs["input_ids"], target], 1)
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            with torch.no_grad():
                logits = self.model(**inputs).logits[0, prompt_len - 1 : -1].float()
            logprobs = logits.log_softmax(-1).gather(1, target[0][:, None])[:, 0]
            results.append((float(logprobs.sum()), bool((logits.argmax(-1) == target[0]).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("hf_normalign model: multi-round generation is not supported; use generate_until.")
