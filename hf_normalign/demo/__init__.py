"""``normalign demo``: the papers' stage-1 experiment in miniature, offline, on a laptop CPU.

A synthetic captioning task (:mod:`.data`), a real LLaVA with a loud vision tower and a text-pre-trained
LLM (:mod:`.models`), stage-1 alignment of six variants with the same seed and budget, and the held-out
results (mean ± std over seeds), diagnostics and a checkpoint round trip (:mod:`.experiment`), written to a
report (:mod:`.report`).

Command line::

    normalign demo --quick              # under 3 minutes on 2 CPU cores
    normalign demo --out my-demo        # the full run: 3 seeds, mean ± std
    normalign demo --quick --seeds 3    # quick, with a spread over 3 seeds
    python -m hf_normalign demo --seed 1 --steps 400

Python::

    from hf_normalign.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig.quick(seed=1), "my-demo")
    print(result.table)
    result.results["variants"]["all three"]["mir"]
"""

from __future__ import annotations

from .experiment import VARIANTS, DemoConfig, DemoResult, run_demo

__all__ = ["VARIANTS", "DemoConfig", "DemoResult", "run_demo"]
