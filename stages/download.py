"""download stage: fetch the CIFAR-10 archive (URL or local path) and write data/cifar10/{train,test}.npz."""

import _venv  # noqa: F401  (first: reruns the stage with .venv's python where `python` lacks the package)

from cifar_pipeline import paths
from cifar_pipeline.download import download
from cifar_pipeline.errors import run_stage
from cifar_pipeline.params import load_params


def main() -> None:
    data = load_params().data
    meta = download(data.url, data.md5)
    counts = ", ".join(f"{n} {split}" for split, n in meta["counts"].items())
    print(f"{paths.DATA_DIR}: {counts} images ({meta['layout']} layout, md5 {meta['md5']})")


if __name__ == "__main__":
    run_stage(main, time_file=paths.DOWNLOAD_TIME)
