#!/usr/bin/env bash
# The GPU suite (issue 21): one run, under 8 minutes on an H100/H200, one Markdown block for RESULTS.md.
#
#   bash benchmarks/gpu_suite.sh                  # GPU: GPT-2-small shape, 262,144 tokens; writes gpu_suite.md
#   bash benchmarks/gpu_suite.sh --tiny --device cpu --out /tmp/tiny.md     # any machine (CI), ~1 minute
#
# Installing on a bare GPU image (no network): the suite needs this package and its dependencies
# (transformer-lens, transformers, safetensors, jaxtyping, tqdm, ...) but not torch, which the image has.
# Put their wheels in benchmarks/wheels/ (ignored by git; never commit wheels) on a machine with network:
#
#   pip download -d benchmarks/wheels --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -r <(python -c "import tomllib;print('\n'.join(tomllib.load(open('pyproject.toml','rb'))['project']['dependencies']))" | grep -v '^torch')
#
# (match --python-version to the GPU image's python). The script installs from there with --no-index when the
# package does not import, so an image that already has everything skips the step.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-benchmarks/wheels}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
if ! "$PY" -c "import transformer_lens, jaxtyping, safetensors" 2>/dev/null; then
    if [ -d "$WHEELS" ]; then
        echo "== installing the dependencies from $WHEELS (offline)"
        "$PY" -m pip install -q --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
    else
        echo "missing dependencies and no wheels in $WHEELS; see the header of $0" >&2
        exit 1
    fi
fi
args=("$@")
case " $* " in *" --out "*) ;; *) args+=(--out gpu_suite.md) ;; esac
echo "== load: $(uptime)"
start=$(date +%s)
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/gpu_suite.py "${args[@]}"
echo "== gpu_suite took $(( $(date +%s) - start )) s"
