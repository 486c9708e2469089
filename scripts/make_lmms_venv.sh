#!/usr/bin/env bash
# Makes lmms-eval's own virtual environment (default .venvs/lmms), apart from the project's .venv: lmms-eval
# pulls ~50 packages (wandb, sentence-transformers, opencv, ...) that llava-lora does not need.
#
#   scripts/make_lmms_venv.sh [VENV_DIR]        # LMMS_EVAL_VERSION=0.7.3 PYTHON=python3 by default
#
# lmms-eval is installed with --no-deps and its requirements after it, minus two:
# - torchvision: lmms-eval's core and its llava_hf model never import it, and PyPI's torchvision does not import
#   beside the CPU torch wheel used here, then breaks transformers' image processors (DESIGN.md).
# - timm: only other models import it, and it requires torchvision.
# decord is added: llava_hf imports it at module level (for videos) though lmms-eval lists it as an extra only.
# torch is pinned to 2.13.0 first so that pip takes the CPU wheel, and transformers to the release that writes
# our checkpoints (lmms-eval 0.7.3 asks only transformers>=4.39.2). filelock stays below 4: lmms-eval 0.7.3's
# evaluator imports filelock._api, which filelock 4 no longer has ("No module named 'filelock._api'").
set -euo pipefail

VENV=${1:-.venvs/lmms}
LMMS_EVAL_VERSION=${LMMS_EVAL_VERSION:-0.7.3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.24.0}
PYTHON=${PYTHON:-python3}

"$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)

pins=$(mktemp)
trap 'rm -f "$pins"' EXIT
printf 'torch==%s\ntransformers==%s\nfilelock<4\n' "$TORCH_VERSION" "$TRANSFORMERS_VERSION" >"$pins"

"${pip[@]}" "torch==$TORCH_VERSION"
"${pip[@]}" --no-deps "lmms-eval==$LMMS_EVAL_VERSION"

# lmms-eval's own requirement list (extras left out), read from its installed metadata.
reqs=$("$VENV/bin/python" - <<'EOF'
import re
from importlib.metadata import requires

SKIP = {"torchvision", "timm"}
for req in requires("lmms_eval"):
    if "extra ==" in req:
        continue
    name = re.split(r"[ <>=!~;\[]", req, maxsplit=1)[0]
    if name.lower().replace("_", "-") not in SKIP:
        print(req.split(";")[0].strip())
EOF
)
mapfile -t reqs <<<"$reqs"
"${pip[@]}" -c "$pins" "${reqs[@]}" decord

# The checks a run needs: lmms-eval, its llava_hf model (decord included), and no torchvision.
"$VENV/bin/python" - <<'EOF'
import importlib.util

import filelock._api  # noqa: F401  (lmms_eval.evaluator patches it)
import lmms_eval.models.chat.llava_hf  # noqa: F401  (imports decord, transformers' Llava classes)
import torch
import transformers

assert importlib.util.find_spec("torchvision") is None, "torchvision got installed; see the comment at the top"
print(f"lmms-eval venv ready: torch {torch.__version__}, transformers {transformers.__version__}")
EOF
