#!/usr/bin/env bash
# Builds what benchmarks/gpu_measure.sh needs on the device machine, which reaches no package index, in the
# git-ignored .carry/ (carried along with the working tree, 64 MiB in all):
#
#   benchmarks/prepare_device.sh [ARCHIVE]      # ARCHIVE: default ../shared/datasets/cifar10-jpeg.tar.gz
#
#   .carry/wheels/   wheels for the device's Python (CPython 3.12, manylinux x86_64) of this project's dependencies
#                    that its image lacks (the device's own torch, numpy, opencv, matplotlib... are used as they are:
#                    /work/.library/device/KINDS.md lists them)
#   .carry/cifar10-jpeg.tar.gz   the data
#
# Then, on the device (the carry list names .carry):
#   set -o pipefail; WHEELS=.carry/wheels benchmarks/gpu_measure.sh .carry/cifar10-jpeg.tar.gz MD5 $OUT 2>&1 | tee $OUT/log.txt
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
archive=${1:-$repo/../shared/datasets/cifar10-jpeg.tar.gz}
carry=$repo/.carry
# The device image's Python packages (KINDS.md, "Python packages already there"), as pip names them: never carried.
present="absl-py accelerate aiohttp aiosignal anyio attrs certifi charset-normalizer click cloudpickle contourpy
cycler filelock fonttools frozenlist fsspec h11 httpcore httpx idna jinja2 joblib kiwisolver markdown-it-py
markupsafe matplotlib mdurl mpmath multidict networkx numpy nvidia-.* opencv-python-headless packaging pandas
pillow pip platformdirs propcache protobuf psutil pygments pyparsing python-dateutil pyyaml requests rich scipy
setuptools six sympy tqdm triton torch torchvision typing-extensions urllib3 wheel yarl"
# This project's dependencies that the image lacks, at the versions pyproject.toml pins.
needed=$(python3 - "$repo/pyproject.toml" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
block = re.search(r"^dependencies = \[(.*?)\]", text, re.S | re.M).group(1)
pins = re.findall(r'"([^"]+)"', block)
print(" ".join(p for p in pins if p.split("==")[0] in {"albumentations", "dvc", "dvclive", "torchinfo", "pydantic"}))
PY
)

rm -rf "$carry/wheels"
mkdir -p "$carry/wheels"
platforms=()
for tag in manylinux_2_39 manylinux_2_35 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
    manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
# dvc's hydra-core needs antlr4-python3-runtime, published as source only: pure Python, so built into a wheel here.
python3 -m pip wheel --quiet --no-deps -w "$carry/wheels" antlr4-python3-runtime==4.9.3
# With their dependencies, resolved for the device's Python; then the ones its image has are dropped.
python3 -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
    --find-links "$carry/wheels" -d "$carry/wheels" $needed
for wheel in "$carry/wheels"/*.whl; do
    name=$(basename "$wheel" | cut -d- -f1 | tr '_A-Z' '-a-z')
    for skip in $present; do
        if [[ $name =~ ^${skip}$ ]]; then
            rm "$wheel"
            break
        fi
    done
done

cp "$archive" "$carry/"
echo "$(find "$carry/wheels" -name '*.whl' | wc -l) wheels in $carry/wheels; $carry: $(du -sh "$carry" | cut -f1)"
echo "the working tree that travels with .carry: $(($(git -C "$repo" ls-files -z | xargs -0 du -cb | tail -1 |
    cut -f1) / 1048576 + $(du -sm "$carry" | cut -f1))) MiB of 64"
