#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md and of the README's results table, measured in one go:
#
#   benchmarks/gpu_measure.sh ARCHIVE MD5 OUT_DIR
#
# ARCHIVE/MD5: a local CIFAR-10 archive (data.url / data.md5). Runs, with `dvc repro` in a scratch copy of this
# checkout:
#   1. bench.py --variants: our train step, loader and eval against the notebook baseline, and the device's
#      ceiling; profile_step.py: where the step's device time goes;
#   2. the defaults (custom_resnet, Albumentations loader, 24 epochs): the 90% target;
#   3. the same with augment.backend=gpu: the 30 s target;
#   4. dilated_net with augment.backend=gpu: the 85% target;
#   5. 3 and 4 again with lr_find.rule=minimum;
#   6. the defaults with augment.backend=gpu and train.max_lr 0.002, then 0.005 (on the CPU, custom_resnet reached
#      89.22% with the minimum rule's 0.000667: docs/results/custom_resnet_cpu.md).
# Each run's params, dvc.lock, metrics, per-epoch logs and pictures go to OUT_DIR/results.tar.gz, rewritten after
# every run so that a run cut short by a time limit keeps the ones before it; the console log is the caller's to
# keep (e.g. `... 2>&1 | tee OUT_DIR/log.txt`).
#
# SMOKE=1 shrinks everything (small subsets, 2 epochs, a few benchmark batches) to check the script on a CPU.
# WHEELS=DIR installs the wheels in DIR first, beside the machine's own torch (a machine without internet).
set -euo pipefail

if [ $# -ne 3 ]; then
    echo "usage: $0 ARCHIVE MD5 OUT_DIR" >&2
    exit 2
fi
archive=$(realpath "$1")
md5=$2
mkdir -p "$3"
out=$(realpath "$3")
repo=$(cd "$(dirname "$0")/.." && pwd)
export NO_ALBUMENTATIONS_UPDATE=1 DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH
fi
if ! command -v python >/dev/null; then # dvc.yaml's stages call `python`
    mkdir -p /tmp/pybin && ln -sf "$(command -v python3)" /tmp/pybin/python
    export PATH=/tmp/pybin:$PATH
fi

work=$(mktemp -d)
# The source only: no git history, caches, environments or earlier outputs.
tar -C "$repo" --exclude=./.git --exclude=./.carry --exclude=./.venv --exclude=./.resume --exclude=./.dvc/cache \
    --exclude=./.dvc/tmp --exclude='./data/*' --exclude='./models/*' --exclude='./reports/*' -cf - . |
    tar -C "$work" -xf -
cd "$work"
export PYTHONPATH=$work/src${PYTHONPATH:+:$PYTHONPATH}
dvc config --local core.no_scm true # plain `dvc repro`: no git needed on the machine
cp params.yaml params.base.yaml

python -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi

bench_args=(--variants --batches 50 --repeats 3)
profile_args=(--steps 5)
common=("data.url=$archive" "data.md5=$md5")
if [ "${SMOKE:-0}" = 1 ]; then
    bench_args=(--model dilated_net --batch-size 32 --batches 2 --repeats 1 --loader-batches 4)
    profile_args=(--model dilated_net --batch-size 32 --steps 1)
    # The README's CPU smoke run, on 2 epochs and fewer test images.
    common+=(model.name=dilated_net data.train_subset=2000 data.test_subset=200 train.epochs=2 train.peak_epoch=1
        train.batch_size=128 lr_find.start_lr=1e-5 lr_find.end_lr=1 lr_find.num_iter=100)
fi

set_params() { # set_params KEY=VALUE...: params.base.yaml with these values (YAML syntax) -> params.yaml
    python - "$@" <<'PY'
import sys
import yaml
params = yaml.safe_load(open("params.base.yaml"))
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    *parents, last = key.split(".")
    section = params
    for part in parents:
        section = section[part]
    if last not in section:
        sys.exit(f"set_params: no key {key} in params.yaml")
    section[last] = yaml.safe_load(value)
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
PY
}

run() { # run NAME KEY=VALUE...: `dvc repro` with these params, timed; its outputs kept in results/NAME
    local name=$1 start
    shift
    set_params "${common[@]}" "$@"
    echo "=== $name: $*"
    start=$(date +%s)
    if ! dvc repro; then # keep going: the other runs' figures still count
        echo "=== $name: dvc repro failed"
        return 0
    fi
    mkdir -p "results/$name"
    cp -r params.yaml dvc.lock reports "results/$name/"
    echo "$(($(date +%s) - start))" >"results/$name/repro_wall_time_s.txt"
    cat reports/summary.md
    tar -czf "$out/results.tar.gz" results
}

mkdir -p results
echo "=== benchmark: bench.py ${bench_args[*]}"
python benchmarks/bench.py "${bench_args[@]}" --out results/bench.json || echo "=== benchmark failed"
echo "=== profile: profile_step.py ${profile_args[*]}"
python benchmarks/profile_step.py "${profile_args[@]}" | tee results/profile_step.txt || echo "=== profile failed"
tar -czf "$out/results.tar.gz" results

run default-albumentations
run default-gpu-backend augment.backend=gpu
run dilated-gpu-backend model.name=dilated_net augment.backend=gpu
# The `minimum` rule suggests a higher max LR than `steepest` (0.013 against 0.0035 for dilated_net on the CPU).
run dilated-gpu-backend-minimum model.name=dilated_net augment.backend=gpu lr_find.rule=minimum
run default-gpu-backend-minimum augment.backend=gpu lr_find.rule=minimum
# A number overrides the range test's suggestion.
run default-gpu-backend-max-lr-0.002 augment.backend=gpu train.max_lr=0.002
run default-gpu-backend-max-lr-0.005 augment.backend=gpu train.max_lr=0.005

# run and the profile above keep results.tar.gz up to date.
echo "=== results in $out/results.tar.gz"
