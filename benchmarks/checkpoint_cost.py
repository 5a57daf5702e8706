"""What the train stage's per-epoch checkpoint writes cost the training thread, written there or in the background.

    python benchmarks/checkpoint_cost.py                      # custom_resnet, files in .resume/bench (the disk used)
    python benchmarks/checkpoint_cost.py --model dilated_net --repeats 3

After an epoch that improves the best accuracy the train stage writes two files: models/best.pt (weights, Adam's
moments, scheduler) and the resume state (the same plus the RNG states and the history). Rows:
- `on the training thread`: both files written there, one after the other (how training.fit wrote them before);
- `snapshot + hand-over`: what training.fit's thread does now (copy the tensors into the buffers of the last
  epoch's copy, hand them to the writer);
- `background write`: how long the writer thread then takes to write both;
- `steps alone` / `steps during a background write`: a few train steps of a small model on the training thread,
  without and with the writer busy (what writing in the background takes from the training thread: the GIL, the
  cores).
Figures are the median of `--repeats`, in seconds.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from cifar_pipeline.models import build_model
from cifar_pipeline.models.checkpoint import make_checkpoint, save_plain
from cifar_pipeline.training.engine import make_optimizer, make_scaler, make_scheduler, train_step
from cifar_pipeline.training.resume import CheckpointWriter
from cifar_pipeline.training.runtime import Runtime

CPU = Runtime(torch.device("cpu"), None, True)


def trained_state(name: str) -> dict:
    """A model's state after one Adam step, so that the optimizer holds its moments: what the train stage saves."""
    torch.manual_seed(0)
    model = build_model(name).to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-3, 1e-4, CPU)
    scheduler = make_scheduler(optimizer, 0.01, 24, 98, 5, 100.0)
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    train_step(model, images, labels, optimizer, nn.CrossEntropyLoss(), make_scaler(CPU), CPU)
    scheduler.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}


def files(state: dict, folder: Path) -> list[tuple[Path, dict]]:
    """best.pt and the resume state, as training.fit writes them after an epoch that improves the best."""
    best = make_checkpoint(state["model"], "bench", {}, optimizer=state["optimizer"], scheduler=state["scheduler"])
    resume = {**state, "rng": {"torch": torch.get_rng_state()}, "history": []}
    return [(folder / "best.pt", best), (folder / "train.pt", resume)]


def seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def steps(count: int) -> float:
    """`count` train steps of dilated_net, batch 32: training-thread work to slow down."""
    torch.manual_seed(0)
    model = build_model("dilated_net").to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-3, 0.0, CPU)
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    loss_fn, scaler = nn.CrossEntropyLoss(), make_scaler(CPU)
    train_step(model, images, labels, optimizer, loss_fn, scaler, CPU)  # warm-up
    return seconds(lambda: [train_step(model, images, labels, optimizer, loss_fn, scaler, CPU) for _ in range(count)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="custom_resnet")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="train steps timed with and without a write")
    parser.add_argument("--dir", type=Path, default=Path(".resume/bench"), help="where the files go (removed after)")
    args = parser.parse_args()
    state = trained_state(args.model)
    args.dir.mkdir(parents=True, exist_ok=True)
    writer = CheckpointWriter()
    rows: dict[str, list[float]] = {name: [] for name in ("sync", "handover", "background", "alone", "during")}
    try:
        for _ in range(args.repeats):
            rows["sync"].append(seconds(lambda: [save_plain(p, o) for p, o in files(state, args.dir)]))
            rows["handover"].append(seconds(lambda: writer.write(files(writer.snapshot(state), args.dir))))
            rows["background"].append(seconds(writer.wait) + rows["handover"][-1])
            rows["alone"].append(steps(args.steps))
            writer.write(files(writer.snapshot(state), args.dir))
            handed = time.perf_counter()
            rows["during"].append(steps(args.steps))
            busy_after = writer.busy()
            writer.wait()
            if busy_after:
                print(f"  (the write outlasted the steps: {time.perf_counter() - handed:.3f} s)")
        size = sum(p.stat().st_size for p in args.dir.iterdir()) / 2**20
    finally:
        writer.close()
        shutil.rmtree(args.dir, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in rows.items()}
    print(
        f"{args.model}: best.pt + resume state = {size:.1f} MiB, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}"
    )
    print(f"  on the training thread (before)       {median['sync']:.3f} s")
    print(f"  snapshot + hand-over (now)             {median['handover']:.3f} s")
    print(f"  background write, from the hand-over   {median['background']:.3f} s")
    print(f"  {args.steps} train steps alone                {median['alone']:.3f} s")
    print(f"  {args.steps} train steps during a write       {median['during']:.3f} s")


if __name__ == "__main__":
    main()
