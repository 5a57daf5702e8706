#!/usr/bin/env bash
# cloud/spot_run.sh NAME: run the pipeline as experiment NAME on a machine that may be taken back (a spot instance),
# and push it. Run the same command on the next machine after a preemption: the train stage resumes after its last
# completed epoch instead of starting again.
#
# Run it in a clone of the project at the commit to run (params.yaml as committed there), with the project's
# environment on PATH, a Git remote `origin` and a default DVC remote (`dvc remote add -d`) that every machine can
# reach, and RESUME_DIR: a folder that outlives the machine (a bucket that SkyPilot mounts, an NFS share).
# cloud/sky.yaml does all of that on a rented GPU.
#
# What survives a preemption and why it is enough: the train stage's resume state (.resume/, here a link into
# RESUME_DIR) is tied to its inputs, among them lr-find's pick. The stages before train are pushed to the DVC
# remote's run cache as soon as they end, so the next machine restores them, byte for byte, instead of rerunning
# them (a rerun range test on another GPU could pick another LR, which would discard the resume state).
set -euo pipefail
if [ $# -ne 1 ]; then
    echo "usage: RESUME_DIR=DIR $0 NAME" >&2
    exit 2
fi
name=$1
: "${RESUME_DIR:?set RESUME_DIR to a folder that outlives this machine}"
mkdir -p "$RESUME_DIR/$name"
rm -rf .resume
ln -s "$RESUME_DIR/$name" .resume

dvc repro --pull lr-find  # from the remote's run cache when an earlier machine ran them
dvc push --run-cache      # for the next machine
dvc exp run --pull -n "$name"
dvc exp push origin "$name"  # its Git ref to origin, its models and reports to the DVC remote
rm -rf "${RESUME_DIR:?}/$name"  # finished: nothing left to resume
