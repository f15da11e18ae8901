"""The `normalign` command line (also `python -m hf_normalign`).

Each subcommand lives next to the code it drives and exposes `register(subparsers)`, which adds
its parser and sets `func`; this module only wires them together, importing lazily so that
`normalign --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module that defines `register(subparsers)`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("hf_normalign.demo", "run the miniature alignment experiment offline"),
    "patch": ("hf_normalign.persistence", "patch a model and save the aligned checkpoint"),
    "push": ("hf_normalign.hub", "upload an aligned checkpoint or adapter to the Hub"),
    "mir": ("hf_normalign.diagnostics.mir", "Modality Integration Rate of a model"),
    "report": ("hf_normalign.diagnostics.report", "HTML report of the modality-gap diagnostics"),
    "serve": ("normalign_vllm.cli", "serve an aligned checkpoint with vLLM"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normalign", description="Fix and measure the modality gap in VLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command == name:
            importlib.import_module(module).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in COMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
