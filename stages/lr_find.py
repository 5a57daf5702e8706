"""lr-find stage: the LR range test -> reports/lr_find.json (curve and suggested max LR) and reports/lr_find.png."""

import time

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline import lr_finder
from cifar_pipeline.atomic import write_json
from cifar_pipeline.data import resolve_num_workers
from cifar_pipeline.dataset import DATA_DIR, load_splits
from cifar_pipeline.engine import make_runtime, new_model, seed_everything
from cifar_pipeline.errors import PipelineError, require_inputs, run_stage
from cifar_pipeline.loaders import make_train_loader
from cifar_pipeline.params import load_params
from cifar_pipeline.stats import STATS_FILE, load_stats

JSON_PATH = "reports/lr_find.json"
PLOT_PATH = "reports/lr_find.png"
TIME_PATH = "reports/lr_find_time.json"


def main() -> None:
    started = time.perf_counter()
    params = load_params()
    require_inputs({str(DATA_DIR): "download", str(STATS_FILE): "compute-mean-std"})
    seed_everything(params.seed, params.train.deterministic)
    runtime = make_runtime(params.train)
    splits = load_splits(DATA_DIR, params.data, params.seed)
    mean, std = load_stats()
    # The same batches as training: train split, augmentations, batch size and loader.
    loader = make_train_loader(
        splits.train_images,
        splits.train_labels,
        params.augment,
        mean,
        std,
        batch_size=params.train.batch_size,
        seed=params.seed,
        num_workers=resolve_num_workers(params.data.num_workers),
        device=runtime.device,
    )

    cfg = params.lr_find
    print(
        f"LR range test: {cfg.num_iter} steps from {cfg.start_lr:g} to {cfg.end_lr:g} on {runtime.device}", flush=True
    )
    result = lr_finder.range_test(
        new_model(params.model, params.seed, runtime),
        loader,
        runtime,
        start_lr=cfg.start_lr,
        end_lr=cfg.end_lr,
        num_iter=cfg.num_iter,
        smooth=cfg.smooth,
        diverge_threshold=cfg.diverge_threshold,
        weight_decay=params.train.weight_decay,
    )
    try:
        suggested = lr_finder.suggest_lr(result, cfg)
    except PipelineError:
        # Leave the curve behind for the user to look at; DVC does not record a failed stage's outputs.
        lr_finder.save_plot(PLOT_PATH, result, None, cfg)
        lr_finder.save_results(JSON_PATH, result, None, cfg.rule, cfg.num_iter)
        raise
    lr_finder.save_plot(PLOT_PATH, result, suggested, cfg)
    lr_finder.save_results(JSON_PATH, result, suggested, cfg.rule, cfg.num_iter)
    write_json(TIME_PATH, {"wall_time_s": round(time.perf_counter() - started, 3)})
    stop = "diverged" if result["diverged"] else "ran to the end"
    print(f"suggested max LR {suggested:.4g} ({cfg.rule} rule); the test {stop} after {len(result['lr'])} steps")


if __name__ == "__main__":
    run_stage(main)
