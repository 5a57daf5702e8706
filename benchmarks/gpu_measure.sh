#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md and of the README's and docs/results/'s results tables, measured in one call that fits the
# device lease (15 minutes of device time in all, machine start included; at most 10 minutes a call):
#
#   benchmarks/gpu_measure.sh [--quick] ARCHIVE MD5 OUT_DIR
#
# ARCHIVE/MD5: a local CIFAR-10 archive (data.url / data.md5). After checking that every import works, it runs these
# steps in a scratch copy of this checkout, most important first (`dvc repro` for the runs, 24 epochs each):
#   1. default        the defaults: the 90% and 30 s targets;
#   2. ddp            the default's train stage again as one process of torchrun: DDP on NCCL with SyncBatchNorm
#                     (one GPU shows no speed-up: that the path runs, and what it costs against step 1);
#   3. other-backend  the defaults with the other augment.backend: the same accuracy for both backends?
#   4. bench          bench.py: our train step and loader against the notebook baseline (the 5x target), ceilings;
#   5. dilated        dilated_net: the 85% target;
#   6. dilated-minimum, dilated-dilation, profile, default-minimum, default-max-lr-0.005 and -0.01: as time allows.
# --quick: steps 1, 2 and 4 only, the benchmark shortened: a first look in about 4 minutes.
#
# Before each step it checks the deadline (DEADLINE_S seconds after the start, default 540): a step whose usual
# length no longer fits is not started, and every step runs under `timeout` with the time left. What is done is
# kept: after every step OUT_DIR/results.tar.gz (each run's params, dvc.lock, metrics, per-epoch logs, pictures,
# wall time; bench.json; profile) and OUT_DIR/summary.txt (a line a step) are rewritten through a temporary file
# and a rename, so a kill at any moment leaves the last complete version. The console log is the caller's to keep
# (e.g. `... 2>&1 | tee OUT_DIR/log.txt`).
#
# SMOKE=1 shrinks everything (dilated_net, tiny subsets, 1 epoch, a few benchmark batches) to check the script on a
# CPU.
# WHEELS=DIR installs the wheels in DIR first, beside the machine's own torch (benchmarks/prepare_device.sh builds
# them for the device's Python).
set -euo pipefail

started=$(date +%s)
quick=0
if [ "${1:-}" = --quick ]; then
    quick=1
    shift
fi
if [ $# -ne 3 ]; then
    echo "usage: $0 [--quick] ARCHIVE MD5 OUT_DIR" >&2
    exit 2
fi
smoke=${SMOKE:-0}
deadline=$((started + ${DEADLINE_S:-540}))
archive=$(realpath "$1")
md5=$2
mkdir -p "$3"
out=$(realpath "$3")
repo=$(cd "$(dirname "$0")/.." && pwd)
export NO_ALBUMENTATIONS_UPDATE=1 DVC_NO_ANALYTICS=1 PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH
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

# Every import a stage or benchmark needs, before any run: a missing wheel fails here, not minutes in.
if ! python -c 'import albumentations, cv2, dvclive, matplotlib, numpy, PIL, pydantic, torch, torchinfo, tqdm, yaml
import cifar_pipeline.report.report, cifar_pipeline.training.train, cifar_pipeline.training.lr_find, cifar_pipeline.data.download' ||
    ! dvc --version >/dev/null; then
    echo "=== import check failed: nothing was run (WHEELS=$(realpath "${WHEELS:-.}"))" >&2
    exit 3
fi
[ -f "$archive" ] || { echo "=== $archive does not exist" >&2; exit 2; }
dvc config --local core.no_scm true # plain `dvc repro`: no git needed on the machine
cp params.yaml params.base.yaml
python -c 'import platform, torch; print("python", platform.python_version(), "torch", torch.__version__,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")'
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi

# What each step usually takes (s), for the deadline check: the runs include starting five stages and, for the
# first, unpacking the archive.
run_s=150 first_run_s=200 bench_s=120 profile_s=40 ddp_s=100
bench_args=(--variants --batches 50 --repeats 3)
profile_args=(--steps 5)
common=("data.url=$archive" "data.md5=$md5")
if [ "$quick" = 1 ]; then
    bench_args=(--batches 20 --repeats 1) bench_s=60
fi
if [ "$smoke" = 1 ]; then
    run_s=40 first_run_s=60 bench_s=60 profile_s=20 ddp_s=30
    bench_args=(--model dilated_net --batch-size 32 --batches 2 --repeats 1 --loader-batches 4 --skip stage)
    profile_args=(--model dilated_net --batch-size 32 --steps 1)
    # 100 range-test steps from 1e-5: on 200 real CIFAR-10 images 30 steps from 1e-4 never saw the loss fall 5%.
    common+=(model.name=dilated_net data.train_subset=200 data.test_subset=100 train.epochs=1 train.peak_epoch=1 train.batch_size=64
        lr_find.start_lr=1e-5 lr_find.end_lr=1 lr_find.num_iter=100)
fi
other_backend=$(python -c 'import yaml; b = yaml.safe_load(open("params.yaml"))["augment"]["backend"]
print("albumentations" if b in ("auto", "gpu") else "gpu")')

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

mkdir -p results
: >results/summary.txt
save() { # save LINE: one summary line, then the results to OUT_DIR, each through a temporary file and a rename
    echo "$1" | tee -a results/summary.txt
    cp results/summary.txt "$out/.summary.txt.tmp" && mv -f "$out/.summary.txt.tmp" "$out/summary.txt"
    tar -czf "$out/.results.tar.gz.tmp" results && mv -f "$out/.results.tar.gz.tmp" "$out/results.tar.gz"
}

stopped=0
time_left() { # time_left NAME SECONDS: whether a step of that usual length fits before the deadline
    local left=$((deadline - $(date +%s)))
    if [ "$stopped" = 1 ] || [ "$left" -lt "$2" ]; then
        [ "$stopped" = 1 ] || save "$1: not started: needs ~$2 s, $left s left before the deadline"
        stopped=1
        return 1
    fi
}

run() { # run NAME SECONDS KEY=VALUE...: `dvc repro` with these params, timed; its outputs kept in results/NAME
    local name=$1 need=$2 start status
    shift 2
    time_left "$name" "$need" || return 0
    set_params "${common[@]}" "$@"
    echo "=== $name: $*"
    start=$(date +%s)
    status=0
    timeout --kill-after=10 $((deadline - start)) dvc repro || status=$?
    mkdir -p "results/$name"
    cp -r params.yaml dvc.lock reports "results/$name/" 2>/dev/null || true
    echo "$(($(date +%s) - start))" >"results/$name/repro_wall_time_s.txt"
    if [ "$status" != 0 ]; then # keep going: the other steps' figures still count
        save "$name: dvc repro failed (exit $status) after $(($(date +%s) - start)) s"
        return 0
    fi
    save "$name: done in $(($(date +%s) - start)) s: $(python -c 'import json; m = json.load(open("reports/train/metrics.json"))
print("test acc %.2f%%, train stage %.1f s, max LR %.4g" % (m["test"]["acc"], m["wall_time_s"], m["max_lr"]))')"
}

step() { # step NAME SECONDS COMMAND...: a benchmark, its output in results/NAME.txt
    local name=$1 need=$2 start status
    shift 2
    time_left "$name" "$need" || return 0
    echo "=== $name: $*"
    start=$(date +%s)
    status=0
    timeout --kill-after=10 $((deadline - start)) "$@" 2>&1 | tee "results/$name.txt" || status=$?
    save "$name: $([ "$status" = 0 ] && echo done || echo "failed (exit $status)") in $(($(date +%s) - start)) s"
}

ddp() { # ddp NAME SECONDS: the train stage of the defaults alone, as one process of torchrun (after `run default`)
    local name=$1 need=$2 start status
    time_left "$name" "$need" || return 0
    set_params "${common[@]}"
    echo "=== $name: torchrun --standalone --nproc-per-node 1 stages/train.py"
    start=$(date +%s)
    status=0
    timeout --kill-after=10 $((deadline - start)) python -m torch.distributed.run --standalone --nproc-per-node 1 \
        stages/train.py 2>&1 | tee "results/$name.txt" || status=$?
    mkdir -p "results/$name"
    cp -r reports/train "results/$name/" 2>/dev/null || true
    if [ "$status" != 0 ]; then
        save "$name: failed (exit $status) after $(($(date +%s) - start)) s"
        return 0
    fi
    save "$name: done in $(($(date +%s) - start)) s: $(grep -o 'on 1 process ([a-z]*, [a-z]*)' "results/$name.txt"), \
$(python -c 'import json; m = json.load(open("reports/train/metrics.json"))
print("test acc %.2f%%, train stage %.1f s" % (m["test"]["acc"], m["wall_time_s"]))')"
}

run default "$first_run_s"
ddp ddp "$ddp_s"
[ "$quick" = 1 ] || run other-backend "$run_s" "augment.backend=$other_backend"
step bench "$bench_s" python benchmarks/bench.py "${bench_args[@]}" --out results/bench.json
if [ "$quick" = 0 ]; then
    run dilated "$run_s" model.name=dilated_net
    # The rule with which dilated_net reached 85% on the CPU (docs/results/dilated_net_cpu.md), beside the default's.
    run dilated-minimum "$run_s" model.name=dilated_net lr_find.rule=minimum
    run dilated-dilation "$run_s" model.name=dilated_net model.downsample=dilation
    step profile "$profile_s" python benchmarks/profile_step.py "${profile_args[@]}"
    # custom_resnet's band around the default pick (docs/results/lr_sweep.md): the `minimum` rule's lower LR (89.22%
    # on the CPU) and two higher ones.
    run default-minimum "$run_s" lr_find.rule=minimum
    run default-max-lr-0.005 "$run_s" train.max_lr=0.005
    run default-max-lr-0.01 "$run_s" train.max_lr=0.01
fi
echo "=== $(($(date +%s) - started)) s in all; results in $out/results.tar.gz, one line a step in $out/summary.txt"
