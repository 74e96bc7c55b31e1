#!/usr/bin/env bash
# The whole SmolLM2 example (docs/real_model.md), resumable: prepare, the grid, the report. ~60 min on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -n "${HARPE_PYTHON:-}" ]; then PY=$HARPE_PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python; fi
started=$(date +%s)
bash examples/smollm2/prepare.sh
"$PY" -m megatron_harpe.sweeps.sweep --grid examples/smollm2/grid.yaml
"$PY" -m megatron_harpe.sweeps.sweep report sweeps/smollm2
"$PY" examples/smollm2/summarize.py --seconds $(( $(date +%s) - started ))
