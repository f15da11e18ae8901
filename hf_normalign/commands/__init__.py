"""The ``normalign`` subcommands' runners, one module per command, each with ``run(args) -> exit code``.

:mod:`hf_normalign.cli` owns the options and the usage checks (argparse only, so ``--help`` imports no torch) and
imports ``hf_normalign.commands.<name>:run`` by name once the arguments are valid. A runner turns the parsed
arguments into calls of the public API and prints results with :func:`hf_normalign.console.emit`; the work itself
lives in the library (``normalign mir`` runs :func:`hf_normalign.mir`), so every command is also a Python call.
Nothing is imported here.
"""
