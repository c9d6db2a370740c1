#!/usr/bin/env bash
# Downloads into .whl/ (ignored by git) the wheels that scripts/gpu-check.sh needs on the
# lent GPU machine and that its image lacks (it has python 3.12, torch, grpcio of its own,
# safetensors, pyyaml, prometheus-client, huggingface-hub, no internet). Pinned to the
# versions this project is tested with; grpcio itself is carried too, because the
# committed stubs refuse a grpcio older than their generator. Run here, where PyPI works:
#
#   scripts/fetch-device-wheels.sh        # then carry ".whl" in the device run call
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
WHEELS=(
    grpcio==1.85.1 grpcio-status==1.85.1 grpcio-health-checking==1.85.1
    grpcio-reflection==1.85.1 protobuf==7.36.2 googleapis-common-protos==1.76.0
    diffusers==0.42.1 importlib-metadata==10.2.0 lazy-importer==0.1.0
    # for `gpu-check.sh --tests` (pytest may be missing from the image)
    pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 pytest-timeout==2.4.0 packaging==26.4
)
rm -rf .whl && mkdir .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
du -sh .whl && ls .whl
