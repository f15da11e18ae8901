"""Stage an upload of an aligned model: save it, render its model card, list what one commit would send.

    python examples/push_to_hub_staging.py --out staged             # dry run, offline
    python examples/push_to_hub_staging.py --out staged --repo-id me/llava-normalign --push   # real upload

The dry run hands `push_to_hub` an `HfApi` that records the commit instead of sending it, so you
can check the file list and the card before anything leaves the machine.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import HfApi, RepoUrl

import hf_normalign as normalign
from hf_normalign.testing import tiny_model


class DryRunApi(HfApi):
    """Records `create_repo` / `create_commit` instead of calling the Hub."""

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        self.operations = operations
        self.commit_message = kwargs.get("commit_message")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="staged", help="where the aligned checkpoint is saved")
    parser.add_argument("--repo-id", default="your-name/tiny-llava-normalign")
    parser.add_argument("--adapter-only", action="store_true")
    parser.add_argument("--push", action="store_true", help="really upload (needs a token and network)")
    args = parser.parse_args()

    model = normalign.patch(tiny_model("llava"), methods=["projector_norm", "moca"])
    normalign.save_pretrained(model, args.out, adapter_only=args.adapter_only)
    print(f"saved to {args.out}: {sorted(p.name for p in Path(args.out).iterdir())}")

    api = None if args.push else DryRunApi()
    normalign.push_to_hub(args.out, args.repo_id, api=api, private=True)
    if api is not None:
        card = next(op for op in api.operations if op.path_in_repo == "README.md")
        print(f"one commit ({api.commit_message!r}) would upload:")
        for op in api.operations:
            print(f"  {op.path_in_repo}")
        print("\n--- model card ---")
        print(card.path_or_fileobj.decode() if isinstance(card.path_or_fileobj, bytes) else card.path_or_fileobj)


if __name__ == "__main__":
    main()
