"""The commands installed with the package: `cifar-predict` and `cifar-export` (docs/using-the-model.md), and
`cifar-results` (docs/experiments.md).

Exit status of cifar-predict: 0 when every image got an answer; 1 when some inputs could not be read (each named on
stderr in one line; the others are still answered); 2 when nothing could be done (bad checkpoint or arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cifar_pipeline.params import DEVICES
from cifar_pipeline.stage import run_stage

DEFAULT_MODEL = "models/model.pt"
MODEL_HELP = f"checkpoint written by the train stage (default {DEFAULT_MODEL})"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def predict_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-predict",
        description="Classify PNG/JPEG images (any size: centre-cropped to a square, resized to 32x32) with a "
        "trained checkpoint, using its own class names, mean and std.",
        epilog="Exit status: 0 all answered, 1 some inputs failed (named on stderr), 2 bad checkpoint or arguments.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders searched for PNG/JPEG")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--top-k", type=_positive, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of lines")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="default cpu")
    parser.add_argument("--batch-size", type=_positive, default=256, help="images per forward pass (default 256)")
    parser.add_argument("--tta", action="store_true", help="average the logits of each image and its mirror")
    return parser


def _predict(argv: Sequence[str] | None) -> None:
    args = predict_parser().parse_args(argv)
    # Imported after parsing: --help and usage errors answer at once, without loading torch.
    from cifar_pipeline.models.checkpoint import load_classifier
    from cifar_pipeline.training.runtime import pick_device
    from cifar_pipeline.use.predict import PROGRESS_MIN_FILES, classify, find_images

    classifier = load_classifier(args.model)
    device = pick_device(args.device, key="--device")
    top_k = min(args.top_k, len(classifier.classes))
    files, problems = find_images(args.images)
    progress = None if len(files) > PROGRESS_MIN_FILES else False
    results = classify(classifier, files, device, top_k, args.batch_size, args.tta, progress)

    answered, failed = [], list(problems)
    for problem in problems:
        print(f"error: {problem.file}: {problem.error}", file=sys.stderr)
    for result in results:
        if result.error:
            failed.append(result)
            print(f"error: {result.file}: {result.error}", file=sys.stderr)
        elif args.json:
            answered.append(result)
        else:
            print(f"{result.file}: " + ", ".join(f"{name} {100 * p:.1f}%" for name, p in result.top), flush=True)
    if args.json:
        document = {
            "model": args.model,
            "tta": args.tta,
            "predictions": [
                {"file": r.file, "top_k": [{"class": name, "probability": round(p, 6)} for name, p in r.top]}
                for r in answered
            ],
            "errors": [{"file": r.file, "error": r.error} for r in failed],
        }
        print(json.dumps(document, indent=2))
    if failed:
        sys.exit(1)


def predict_main(argv: Sequence[str] | None = None) -> None:
    run_stage(lambda: _predict(argv))


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-export",
        description="Write a trained checkpoint as an ONNX model: float32 RGB in 0..1, shape (N, 3, 32, 32), "
        "normalisation included; logits out; class names, mean and std in its metadata.",
    )
    parser.add_argument("output", metavar="OUTPUT.onnx", help="where to write the ONNX model")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    return parser


def _export(argv: Sequence[str] | None) -> None:
    args = export_parser().parse_args(argv)
    from cifar_pipeline.models.checkpoint import load_classifier
    from cifar_pipeline.use.export import export_onnx

    classifier = load_classifier(args.model)
    export_onnx(classifier, args.output)
    print(f"wrote {args.output} ({classifier.model_name}, classes: {', '.join(classifier.classes)})")


def export_main(argv: Sequence[str] | None = None) -> None:
    run_stage(lambda: _export(argv))


def results_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cifar-results",
        description="The experiments of this project (`dvc exp show --json`) grouped by every param but the seed: n, "
        "mean, standard deviation, min and max of the test accuracy (plain and flip TTA) and the train time, and how "
        "many runs reached the target. Failed and unfinished experiments are listed.",
    )
    parser.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD")
    parser.add_argument(
        "--from-json", metavar="FILE", help="read a saved `dvc exp show --json` output instead of running it"
    )
    parser.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="KEY",
        help="another param to group across, as seed is (dotted, e.g. data.num_workers); repeatable",
    )
    parser.add_argument(
        "--target",
        type=float,
        help="accuracy in %% to count runs against (default: on CIFAR-10, 90 for custom_resnet and 85 for dilated_net, "
        "the mission's; none on other data)",
    )
    parser.add_argument(
        "--out",
        default="reports/results",
        metavar="PREFIX",
        help="writes PREFIX.md and PREFIX.json (default reports/results)",
    )
    return parser


def _results(argv: Sequence[str] | None) -> None:
    from pathlib import Path

    from cifar_pipeline.report.results import DEFAULT_IGNORED, collect_runs, exp_show_json, markdown, summarise
    from cifar_pipeline.stage import PipelineError, write_json, write_text

    args = results_parser().parse_args(argv)
    if args.from_json:
        try:
            exp_show = json.loads(Path(args.from_json).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise PipelineError(f"--from-json {args.from_json}: cannot read it as JSON ({exc})") from exc
    else:
        exp_show = exp_show_json(args.all_commits)
    document = summarise(collect_runs(exp_show), (*DEFAULT_IGNORED, *args.ignore), args.target)
    text = markdown(document)
    write_text(f"{args.out}.md", text)
    write_json(f"{args.out}.json", document)
    print(text, end="")
    print(f"wrote {args.out}.md and {args.out}.json")


def results_main(argv: Sequence[str] | None = None) -> None:
    run_stage(lambda: _results(argv))
