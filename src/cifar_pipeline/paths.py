"""Where every file of the pipeline lives, relative to the project root, defined once.

dvc.yaml names the same files (tests/test_stage_deps.py checks that each stage's outputs are these).
"""

from __future__ import annotations

from pathlib import Path

PARAMS = Path("params.yaml")
PARAMS_CHECK = Path("reports/params_check.json")  # check-params: constant, for every valid params.yaml

# download
DATA_DIR = Path("data/cifar10")  # train.npz, test.npz, meta.json
META = DATA_DIR / "meta.json"
DOWNLOAD_TIME = Path("reports/download_time.json")

# compute-mean-std
STATS = Path("data/stats.json")
STATS_TIME = Path("reports/compute_mean_std_time.json")

# lr-find
LR_FIND = Path("reports/lr_find.json")
LR_FIND_PLOT = Path("reports/lr_find.png")
LR_FIND_TIME = Path("reports/lr_find_time.json")

# train
MODEL = Path("models/model.pt")
BEST = Path("models/best.pt")
RESUME = Path(".resume/train.pt")
# The best epoch's model while the run is under way, beside the resume state: DVC owns models/ and may delete or
# restore models/best.pt before a rerun (`dvc exp run` checks out the last recorded one), but never touches .resume/.
RESUME_BEST = Path(".resume/best.pt")
# DVCLive: metrics.json, params.yaml (what the run used: runtime.Runtime.record), plots/metrics/**.tsv,
# plots/custom/lr_schedule.json
LIVE_DIR = Path("reports/train")
TRAIN_METRICS = LIVE_DIR / "metrics.json"
TRAIN_SAMPLES = Path("reports/train_samples.png")
AUGMENTATIONS = Path("reports/augmentations.yaml")

# report
REPORTS = Path("reports")
