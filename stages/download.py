"""download stage: fetch the CIFAR-10 archive (URL or local path) and write data/cifar10/{train,test}.npz."""

from cifar_pipeline.errors import PipelineError, run_stage
from cifar_pipeline.params import load_params


def main() -> None:
    load_params()
    raise PipelineError("the download stage is not built yet (issue 2)")


if __name__ == "__main__":
    run_stage(main)
