"""Run VLMEvalKit with hf-normalign active, so aligned checkpoints are scored with their intervention.

VLMEvalKit has no plugin hook: its model classes call transformers' ``from_pretrained`` directly. Importing
hf_normalign first makes those calls return the patched model for any folder holding normalign_config.json.

    python examples/vlmevalkit_launcher.py /path/to/VLMEvalKit/run.py --data MMStar --model llava_v1.5_7b
    python examples/vlmevalkit_launcher.py --tiny      # offline check: what VLMEvalKit's loader gets

(point VLMEvalKit's model entry, e.g. ``model_path`` of its ``LLaVA_HF`` class, at the aligned folder).
"""

import runpy
import sys
import tempfile

import hf_normalign as normalign  # must come first: installs load-time patching on transformers


def tiny_check() -> None:
    from transformers import LlavaForConditionalGeneration

    from hf_normalign.testing import tiny_model

    with tempfile.TemporaryDirectory() as folder:
        normalign.patch(tiny_model("llava"), methods="moca").save_pretrained(folder)
        model = LlavaForConditionalGeneration.from_pretrained(folder)  # the call VLMEvalKit makes
        print(f"loaded {type(model).__name__}; patched: {normalign.is_patched(model)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--tiny"]:
        tiny_check()
    elif len(sys.argv) < 2 or not sys.argv[1].endswith(".py"):
        sys.exit("usage: vlmevalkit_launcher.py /path/to/VLMEvalKit/run.py [run.py options] | --tiny")
    else:
        script, sys.argv = sys.argv[1], sys.argv[1:]
        runpy.run_path(script, run_name="__main__")
