#!/usr/bin/env bash
# Run HERE (a machine with PyPI access) before a session on the lent GPU machine: fetches the wheels the
# GPU machine's image lacks into .whl/ and copies the benchmark data into .data/ (both ignored by git),
# so that `device run` can carry them. Then, with the device tool:
#     run  carry [".whl", ".data"]  command "bash bench/device/check.sh suite"          (timeout_s 600)
#     run  carry [".whl", ".data"]  command "bash bench/device/check.sh kaggle speed"   (timeout_s 600)
# See docs/performance.md, "On the GPU machine".
set -euo pipefail
cd "$(dirname "$0")/../.."
WHEELS=(albumentations==2.0.8 albucore==0.0.24 stringzilla simsimd pydantic pydantic-core annotated-types
        typing-inspection typing-extensions pysodmetrics==1.6.2)
mkdir -p .whl
for w in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$w"
done
# pydantic pins pydantic-core exactly: keep one version of each (two stop the install there)
ls .whl
DATA_SRC=${DATA_SRC:-../shared/data/kvasir_seg}
if [ -d "$DATA_SRC" ]; then
  mkdir -p .data && rm -rf .data/kvasir_seg && cp -r "$DATA_SRC" .data/kvasir_seg
fi
du -sh .whl .data 2>/dev/null || true
echo "carry: .whl .data (the working tree that travels must stay under 64 MiB)"
