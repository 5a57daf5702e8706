"""The commands installed with the package: `cifar-predict` and `cifar-export` (see README: Using the model).

Exit status of cifar-predict: 0 when every image got an answer; 1 when some inputs could not be read (each named on
stderr in one line; the others are still answered); 2 when nothing could be done (bad checkpoint or arguments).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from cifar_pipeline.choices import DEVICES
from cifar_pipeline.errors import run_stage

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
    from cifar_pipeline.classifier import load_classifier
    from cifar_pipeline.predict import PROGRESS_MIN_FILES, classify, find_images
    from cifar_pipeline.runtime import pick_device

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
    from cifar_pipeline.classifier import load_classifier
    from cifar_pipeline.export import export_onnx

    classifier = load_classifier(args.model)
    export_onnx(classifier, args.output)
    print(f"wrote {args.output} ({classifier.model_name}, classes: {', '.join(classifier.classes)})")


def export_main(argv: Sequence[str] | None = None) -> None:
    run_stage(lambda: _export(argv))
