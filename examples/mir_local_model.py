"""MIR of a locally saved model, with the built-in offline probe or your own images and texts.

    python examples/mir_local_model.py --model path/to/model --num-samples 100
    python examples/mir_local_model.py --tiny --num-samples 16     # builds and saves a tiny LLaVA first

Same as `normalign mir MODEL`, from Python: load with transformers, measure, print the per-layer table.
"""

from __future__ import annotations

import argparse
import tempfile

from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_normalign import diagnostics
from hf_normalign.testing import tiny_model, tiny_processor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a local directory (or a cached Hub id)")
    parser.add_argument("--tiny", action="store_true", help="save a tiny LLaVA to a temporary folder and use it")
    parser.add_argument("--num-samples", type=int, default=100)
    parser.add_argument("--outliers", default="replace_median", choices=diagnostics.OUTLIER_MODES)
    args = parser.parse_args()
    if not args.tiny and not args.model:
        parser.error("pass --model DIR or --tiny")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if args.tiny:
            path = tmp
            tiny_model("llava").save_pretrained(path)
            tiny_processor("llava").save_pretrained(path)
        model = AutoModelForImageTextToText.from_pretrained(path)
        processor = AutoProcessor.from_pretrained(path)
        result = diagnostics.mir(model, processor, num_samples=args.num_samples, outliers=args.outliers)
    print(result.format_table())
    print(f"MIR = {result.mir:.4f} over {result.num_samples} image-text pairs")


if __name__ == "__main__":
    main()
