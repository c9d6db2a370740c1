#!/usr/bin/env bash
# The prepared GPU check (issue #13, part 5): ≤ 8 minutes on one H100, JSON to a folder.
#
#   scripts/gpu-check.sh [--device cuda|cpu] [--quick] [--out DIR]
#
# Parts (services/ditserve/bench/gpucheck.py, each in its own process and time budget):
# CUDA-bf16 vs CPU-fp32 parity of a DiT-XL/2 forward (random weights); forward ms and MFU
# at batch 1, 8, 32, 64, eager vs CUDA graphs; 1-, 2- and 4-stage pipelines on the one GPU
# with `transport: grpc` and `transport: shm` (CUDA IPC): step latency of one request and
# images/s at 16 clients; diffusers' DiTPipeline on the same GPU at the same settings.
# Writes DIR/{parity,forward,pipelines,diffusers,summary}.json; exits 1 unless every part
# is ok. `--device cpu --quick` is the dry run that `make test` runs (tiny model, seconds).
#
# On the lent GPU machine (python3 with torch and grpcio, no internet): carry the wheels
# that scripts/fetch-device-wheels.sh puts in .whl/ (ignored by git), and run
#
#   run(command="bash scripts/gpu-check.sh --out $OUT/gpu-check", carry=[".whl"], timeout_s=600)
#
# The project itself is not installed: PYTHONPATH=services:client is enough (the gRPC
# stubs are committed), for this script and every stage process it starts.
#
# `--tests` instead runs the test files whose CUDA tests skip on a CPU machine (CUDA IPC
# between stage processes, the device's runner and graphs), with the same wheels (pytest
# is carried too): a second call, as the check itself takes most of one call's 10 minutes:
#
#   run(command="bash scripts/gpu-check.sh --tests", carry=[".whl"], timeout_s=300)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Carried wheels (cp312, for the device machine) into a private site folder; not for the
# CPU dry run, which uses this machine's environment as it is.
DEVICE=cuda
for ((i = 1; i <= $#; i++)); do
    case "${!i}" in
        --device=*) DEVICE="${!i#--device=}" ;;
        --device) j=$((i + 1)); DEVICE="${!j:-}" ;;
    esac
done
if [ "$DEVICE" = cuda ] && compgen -G ".whl/*.whl" >/dev/null; then
    echo "gpu-check: installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
elif [ "$DEVICE" = cuda ]; then
    # Said up front: without them the image's own grpcio (older than the committed stubs
    # may need) and no diffusers fail parts later, each with a less obvious message.
    echo "gpu-check: no carried wheels in .whl/ (scripts/fetch-device-wheels.sh, then" \
        "carry \".whl\"): using this machine's packages as they are" >&2
fi
export PYTHONPATH="$ROOT/services:$ROOT/client${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

CUDA_TESTS=(tests/wire/test_cuda_ipc.py tests/stage/test_stage_handoff.py
            tests/stage/test_stage_runner.py tests/model/test_graphs.py)
if [ "${1:-}" = --tests ]; then
    exec "$PYTHON" -m pytest -q -p no:cacheprovider -rs "${CUDA_TESTS[@]}"
fi
exec "$PYTHON" -m ditserve.bench.gpucheck "$@"
