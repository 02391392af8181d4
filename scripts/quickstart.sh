#!/usr/bin/env bash
# The main job: set up, fine-tune the packaged all-MiniLM-L6-v2 on CoNLL-2003 NER (a few minutes on 2 CPU
# cores) and print the entity-level report. Extra arguments are config overrides, e.g. train.epochs=3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tunelab train recipes/conll2003_quick.yaml output_dir=runs/conll2003_quick --overwrite "$@"
