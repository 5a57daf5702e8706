"""lr-find stage."""

from cifar_pipeline.errors import PipelineError, run_stage
from cifar_pipeline.params import load_params


def main() -> None:
    load_params()
    raise PipelineError("the lr-find stage is not built yet (issue 5)")


if __name__ == "__main__":
    run_stage(main)
