"""train stage: One Cycle training -> models/{model,best}.pt, DVCLive logs in reports/train, sample images.

Interrupted (killed, out of time)? Run it again with the same params: it resumes after the last completed epoch.
"""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline.data import resolve_num_workers
from cifar_pipeline.dataset import DATA_DIR, load_splits
from cifar_pipeline.engine import make_runtime, new_model, seed_everything
from cifar_pipeline.errors import require_inputs, run_stage
from cifar_pipeline.loaders import make_eval_loader, make_train_loader, resolve_backend
from cifar_pipeline.models import model_kwargs
from cifar_pipeline.params import load_params
from cifar_pipeline.plots import save_train_samples
from cifar_pipeline.stats import STATS_FILE, load_stats
from cifar_pipeline.training import LR_FIND_PATH, fingerprint, fit, resolve_max_lr
from cifar_pipeline.transforms import save_augmentations, train_transforms


def main() -> None:
    params = load_params()
    require_inputs({str(DATA_DIR): "download", str(STATS_FILE): "compute-mean-std"})
    max_lr, max_lr_source = resolve_max_lr(params.train.max_lr)
    seed_everything(params.seed, params.train.deterministic)
    runtime = make_runtime(params.train)
    splits = load_splits(DATA_DIR, params.data, params.seed)
    mean, std = load_stats()
    loading = {
        "batch_size": params.train.batch_size,
        "seed": params.seed,
        "num_workers": resolve_num_workers(params.data.num_workers),
        "device": runtime.device,
    }
    train_loader = make_train_loader(splits.train_images, splits.train_labels, params.augment, mean, std, **loading)
    eval_loaders = {}
    for split, images, labels in (
        ("val", splits.val_images, splits.val_labels),
        ("test", splits.test_images, splits.test_labels),
    ):
        if len(labels):  # no val split unless data.val_size > 0
            eval_loaders[split] = make_eval_loader(images, labels, mean, std, backend=params.augment.backend, **loading)
    save_train_samples(train_loader.dataset, splits.classes, "reports/train_samples.png")
    # The Albumentations pipeline is the spec of the augmentations for both backends.
    save_augmentations(train_transforms(params.augment, mean), "reports/augmentations.yaml")

    print(
        f"training {params.model.name} on {len(splits.train_labels)} images for {params.train.epochs} epochs on "
        f"{runtime.device} (max LR {max_lr:.4g} from {max_lr_source}, "
        f"{resolve_backend(params.augment.backend, runtime.device)} augment backend)",
        flush=True,
    )
    inputs = [STATS_FILE, DATA_DIR / "meta.json"] + ([LR_FIND_PATH] if max_lr_source == "lr-find" else [])
    summary = fit(
        new_model(params.model, params.seed, runtime),
        params.model.name,
        model_kwargs(params.model),
        train_loader,
        eval_loaders,
        params.train,
        runtime,
        max_lr=max_lr,
        max_lr_source=max_lr_source,
        run_fingerprint=fingerprint(params, max_lr, inputs),
        checkpoint_extra={
            "batch_size": params.train.batch_size,
            "mean": list(mean),
            "std": list(std),
            "classes": list(splits.classes),
        },
    )
    print(f"final test accuracy {summary['test']['acc']:.2f}% after {params.train.epochs} epochs")


if __name__ == "__main__":
    run_stage(main)
