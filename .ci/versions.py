"""Print one line: the releases of the key dependencies this environment resolved (issue 21: each CI leg says what
it ran on, so a new release that breaks a leg shows in the log). Usage: python .ci/versions.py LABEL [EXTRA ...]"""

import sys
from importlib import metadata

KEY = ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "deepspeed", "safetensors")
KEY += ("huggingface_hub", "datasets", "setuptools")


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


if __name__ == "__main__":
    label, *extra = sys.argv[1:]
    print(f"{label}: " + ", ".join(f"{name} {version(name)}" for name in (*KEY, *extra)))
