"""compute-mean-std stage: per-channel mean and std of the images the model trains on -> data/stats.json."""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline import paths
from cifar_pipeline.data.dataset import compute_stats
from cifar_pipeline.params import load_params
from cifar_pipeline.stage import run_stage


def main() -> None:
    params = load_params()
    stats = compute_stats(paths.DATA_DIR, params.data, params.seed)
    mean, std = (", ".join(f"{x:.5f}" for x in stats[key]) for key in ("mean", "std"))
    print(f"{paths.STATS}: mean ({mean}), std ({std}) over {stats['count']} train images")


if __name__ == "__main__":
    run_stage(main, time_file=paths.STATS_TIME)
