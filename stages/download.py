"""download stage: fetch the dataset's archive (URL or local path) and write data/cifar10/{train,test}.npz."""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline import paths
from cifar_pipeline.data.download import download
from cifar_pipeline.params import load_params
from cifar_pipeline.stage import run_stage


def main() -> None:
    data = load_params().data
    meta = download(data.url, data.md5, labels=data.labels)
    counts = ", ".join(f"{n} {split}" for split, n in meta["counts"].items())
    classes = meta["classes"]
    shown = ", ".join(classes) if len(classes) <= 12 else f"{', '.join(classes[:10])}, ... {classes[-1]}"
    print(
        f"{paths.DATA_DIR}: {counts} images of {len(classes)} classes ({shown}); {meta['layout']} layout, md5 "
        f"{meta['md5']}"
    )
    if meta.get("converted_to_32x32_rgb"):
        print(
            f"  {meta['converted_to_32x32_rgb']} images were not 32x32 RGB: converted as cifar-predict does "
            "(upright, RGB, the centred square resized to 32x32)"
        )
    if skipped := meta.get("skipped_files"):
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        files = "a file that is" if len(skipped) == 1 else f"{len(skipped)} files that are"
        print(f"  skipped {files} not PNG or JPEG: {', '.join(skipped[:5])}{more}")


if __name__ == "__main__":
    run_stage(main, time_file=paths.DOWNLOAD_TIME)
