#!/usr/bin/env bash
# The fast engine on one GPU, no network: engine tokens/s, the bare-forward ceiling and model.generate
# on Qwen2.5-0.5B- and 7B-shaped random-weight models (bf16), and reference-vs-fast label agreement
# on the testbed. Sized to finish in under 8 minutes on one H200 (hard limit: 8 minutes).
#   benchmarks/gpu_check.sh            # on the GPU machine
#   benchmarks/gpu_check.sh --small    # shrunk smoke run (also on a CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 480 python benchmarks/gpu_check.py "$@"
