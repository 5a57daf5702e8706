"""report stage."""

from cifar_pipeline.errors import PipelineError, run_stage
from cifar_pipeline.params import load_params


def main() -> None:
    load_params()
    raise PipelineError("the report stage is not built yet (issue 7)")


if __name__ == "__main__":
    run_stage(main)
