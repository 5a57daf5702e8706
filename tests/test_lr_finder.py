"""The LR range test: the loop, the suggestion rules and their refusals, the outputs, and the lr-find stage."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import ROOT, dvc_plot_values
from test_train_stage import PARAMS, make_project, run_stage, set_params
from test_training import CPU, loader, tiny_model

from cifar_pipeline.params import LrFindParams, parse_params
from cifar_pipeline.stage import PipelineError
from cifar_pipeline.training import lr_find
from cifar_pipeline.training.engine import new_model
from cifar_pipeline.training.loader import prepare_training

START, END, N = 1e-7, 10.0, 200


def curve(center: float, noise: float = 0.0, blowup: float | None = None, threshold: float = 5.0) -> dict:
    """A range-test result shaped like a real one: flat, a sigmoid descent around lr = 10**center, and optionally a
    blow-up from lr = 10**blowup, cut where the loss passes `threshold` x its best (as range_test stops)."""
    x = np.linspace(np.log10(START), np.log10(END), N)
    loss = 2.3 - 1.5 / (1 + np.exp(-(x - center) / 0.3))
    if blowup is not None:
        loss += 20 * np.maximum(0.0, x - blowup) ** 2
    loss += noise * np.random.default_rng(0).normal(size=N)
    n, diverged = N, False
    for i in range(N):
        if loss[i] > threshold * loss[: i + 1].min():
            n, diverged = i + 1, True
            break
    return {"lr": list(10 ** x[:n]), "loss": list(loss[:n]), "raw_loss": list(loss[:n]), "diverged": diverged}


def suggest(result: dict, rule: str = "steepest", **cfg) -> float:
    return lr_find.suggest_lr(result, LrFindParams(rule=rule, start_lr=START, end_lr=END, num_iter=N, **cfg))


STEP = 10 ** (np.log10(END / START) / (N - 1))  # the ratio of two neighbouring LRs of the range


def v_curve(lowest_lr: float, noise: float = 0.0, seed: int = 0) -> dict:
    """A range-test result with a known lowest point: the raw loss falls linearly in log(lr) down to `lowest_lr` and
    rises as steeply after it, until range_test's divergence check (on the lagging average) stops it."""
    x = np.log10(np.geomspace(START, END, N))
    raw = 1.0 + 0.5 * np.abs(x - np.log10(lowest_lr))
    raw += noise * np.random.default_rng(seed).normal(size=N)
    smoothed = lagging_average(raw, 0.05)
    n = next((i + 1 for i in range(N) if smoothed[i] > 5 * smoothed[: i + 1].min()), N)
    return {"lr": list(10 ** x[:n]), "loss": list(smoothed[:n]), "raw_loss": list(raw[:n]), "diverged": n < N}


def test_descent_end_is_the_lowest_point_of_the_raw_loss():
    assert suggest(v_curve(1e-3), "descent_end") == pytest.approx(1e-3, rel=STEP - 1)
    assert suggest(v_curve(0.03), "descent_end") == pytest.approx(0.03, rel=STEP - 1)
    # The lagging average that range_test records as "loss" puts its lowest point most of a decade higher.
    assert suggest(v_curve(1e-3), "minimum") * 10 > 1e-3 * STEP**10


def test_descent_end_divides_by_the_divisor():
    assert suggest(v_curve(1e-3), "descent_end", divisor=3) == suggest(v_curve(1e-3), "descent_end") / 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_descent_end_on_a_noisy_curve_stays_within_a_few_points(seed):
    noisy = v_curve(1e-3, noise=0.1, seed=seed)  # noise of a third of the fall over a decade
    assert suggest(noisy, "descent_end") == pytest.approx(1e-3, rel=STEP**3 - 1)


def test_descent_end_without_a_turn_up_asks_for_a_higher_end_lr():
    with pytest.raises(PipelineError, match="still falling at the .*higher lr_find.end_lr"):
        suggest(curve(-3.0, noise=0.003), "descent_end")  # levels off, never rises, never diverges


def test_centred_average_has_no_lag():
    raw = np.abs(np.arange(100) - 60.0) / 10 + 1  # a V with its lowest point at index 60
    assert int(np.argmin(lr_find.centred_average(list(raw), 0.05))) == 60
    assert int(np.argmin(lagging_average(raw, 0.05))) > 65  # where the lagging average puts it


def test_centred_average_spans_1_over_smooth_points_and_at_most_a_fifth_of_a_short_curve():
    step = [0.0] * 100 + [1.0] * 100
    changed = np.flatnonzero(np.diff(lr_find.centred_average(step, 0.05)))
    assert changed.min() == 89 and changed.max() == 109  # 10 points either side of the step at 99/100
    short = [0.0] * 15 + [1.0] * 15  # a 30-step range test: 3 points either side, not 10
    changed = np.flatnonzero(np.diff(lr_find.centred_average(short, 0.05)))
    assert changed.min() == 11 and changed.max() == 17


def lagging_average(raw, smooth: float) -> np.ndarray:
    """The bias-corrected moving average that range_test records as "loss"."""
    average, out = 0.0, []
    for i, value in enumerate(raw):
        average = (1 - smooth) * average + smooth * value
        out.append(average / (1 - (1 - smooth) ** (i + 1)))
    return np.array(out)


def test_steepest_is_where_the_loss_falls_fastest():
    assert suggest(curve(-3.0, blowup=-1.0)) == pytest.approx(1e-3, rel=0.1)
    assert suggest(curve(-4.0, noise=0.005, blowup=-2.0)) == pytest.approx(1e-4, rel=0.25)


def test_minimum_is_a_tenth_of_the_lr_of_the_lowest_loss():
    result = curve(-3.0, noise=0.01, blowup=-1.0)
    lowest = result["lr"][int(np.argmin(result["loss"]))]
    assert suggest(result, "minimum") == pytest.approx(lowest / 10, rel=1e-12)
    assert 10**-2 < lowest < 10**-1  # the descent ends before the blow-up


def test_minimum_below_the_range_asks_for_a_lower_start_lr():
    result = curve(-3.0, blowup=-1.0)
    lowest = result["lr"][int(np.argmin(result["loss"]))]
    with pytest.raises(PipelineError, match="a tenth of the LR of the lowest loss .* lr_find.start_lr"):
        # a start_lr within a decade of the lowest
        lr_find.suggest_lr(result, LrFindParams(rule="minimum", start_lr=lowest / 5, end_lr=END, num_iter=N))


def test_valley_is_inside_the_descent_before_the_minimum():
    result = curve(-3.0, noise=0.01, blowup=-1.0)
    valley = suggest(result, "valley")
    lowest = result["lr"][int(np.argmin(result["loss"]))]
    assert 10**-3.5 < valley < lowest
    assert valley != suggest(result, "steepest")


@pytest.mark.parametrize("rule", ["steepest", "valley"])
def test_a_descent_at_the_start_of_the_range_asks_for_a_lower_start_lr(rule):
    with pytest.raises(PipelineError, match="low end of the range.*lower lr_find.start_lr"):
        suggest(curve(-7.5, blowup=-5.5), rule)


@pytest.mark.parametrize("rule", ["descent_end", "steepest", "minimum"])
def test_a_minimum_at_the_start_of_the_range_asks_for_a_lower_start_lr(rule):
    result = curve(-9.0, blowup=-6.6, threshold=1e9)  # falls over the first points, then only climbs
    with pytest.raises(PipelineError, match="lowest at the low end.*lower lr_find.start_lr"):
        suggest(result, rule)


@pytest.mark.parametrize("rule", ["descent_end", "steepest", "valley"])
@pytest.mark.parametrize("center", [0.0, 1.0])
def test_a_loss_still_falling_at_the_end_asks_for_a_higher_end_lr(rule, center):
    with pytest.raises(PipelineError, match="still falling at the .*higher lr_find.end_lr"):
        suggest(curve(center, noise=0.003), rule)


def test_a_curve_that_never_falls_asks_for_a_wider_range():
    flat = curve(5.0, noise=0.01)  # the descent lies beyond end_lr
    with pytest.raises(PipelineError, match="never fell.*higher lr_find.end_lr"):
        suggest(flat)
    rising = curve(-20.0, blowup=-5.0)  # already diverging from well inside the range
    rising["loss"] = [2.3 + 0.01 * i for i in range(len(rising["loss"]))]
    with pytest.raises(PipelineError, match="never fell.*before it diverged.*lower lr_find.start_lr"):
        suggest(rising)


def test_an_immediate_divergence_asks_for_a_lower_start_lr():
    result = curve(-3.0, blowup=-6.8)
    assert result["diverged"] and len(result["lr"]) < 30
    with pytest.raises(PipelineError, match=r"diverged after \d+ of 200 iterations.*lower lr_find.start_lr"):
        suggest(result)


def test_range_test_raises_the_lr_exponentially_and_smooths_with_bias_correction():
    torch.manual_seed(0)
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    data = loader(40, 10, True)  # 4 batches: 12 iterations cycle through it three times
    result = lr_find.range_test(
        model, data, CPU, start_lr=1e-4, end_lr=1e-2, num_iter=12, smooth=0.3, diverge_threshold=5.0, weight_decay=0
    )
    assert not result["diverged"] and len(result["lr"]) == 12
    assert result["lr"] == pytest.approx([1e-4 * 100 ** (i / 11) for i in range(12)], rel=1e-12)
    average = 0.0
    for i, (raw, smoothed) in enumerate(zip(result["raw_loss"], result["loss"], strict=True)):
        average = 0.7 * average + 0.3 * raw
        assert smoothed == pytest.approx(average / (1 - 0.7 ** (i + 1)), rel=1e-12)
    assert result["loss"][0] == pytest.approx(result["raw_loss"][0], rel=1e-12)  # no pull towards 0 at the start
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_range_test_stops_when_the_loss_diverges():
    torch.manual_seed(0)
    result = lr_find.range_test(
        tiny_model(), loader(40, 10, True), CPU, start_lr=1e-3, end_lr=1e7, num_iter=60, smooth=0.3,
        diverge_threshold=2.0, weight_decay=0,
    )  # fmt: skip
    assert result["diverged"] and len(result["lr"]) < 60
    assert result["loss"][-1] > 2.0 * min(result["loss"][:-1])


def test_repeated_tests_are_averaged_step_by_step_up_to_the_first_to_stop():
    tests = [v_curve(3e-3, noise=0.05, seed=seed) for seed in range(3)]
    tests[1] = {key: value[:150] if isinstance(value, list) else True for key, value in tests[1].items()}
    mean = lr_find.mean_curve(tests, 0.05)
    assert mean["lr"] == tests[1]["lr"] and mean["diverged"]
    first, second, third = (test["raw_loss"][:150] for test in tests)
    raw = [(a + b + c) / 3 for a, b, c in zip(first, second, third, strict=True)]
    assert mean["raw_loss"] == pytest.approx(raw, rel=1e-12) and len(raw) == 150
    assert mean["loss"] == pytest.approx(lagging_average(raw, 0.05), rel=1e-12)
    # Averaging takes noise out of the pick: 30 noisy tests, alone and as 10 means of 3.
    noisy = [v_curve(3e-3, noise=0.1, seed=seed) for seed in range(30)]
    alone = np.log10([suggest(test, "descent_end") for test in noisy])
    means = np.log10([suggest(lr_find.mean_curve(noisy[i : i + 3], 0.05), "descent_end") for i in range(0, 30, 3)])
    assert means.std() < 0.8 * alone.std()  # 0.050 against 0.076 decades
    assert np.abs(means - np.log10(3e-3)).max() < np.abs(alone - np.log10(3e-3)).max()


@pytest.mark.slow
def test_each_repeat_starts_from_a_fresh_model_of_its_own_on_batches_of_its_own(tmp_path, monkeypatch):
    monkeypatch.chdir(make_project(tmp_path))
    short = {**PARAMS["lr_find"], "num_iter": 10}  # 5 passes of the tiny loader's 2 batches a test
    params = parse_params({**PARAMS, "lr_find": {**short, "repeats": 2}})
    single = lr_find.run_range_test(params.model_copy(update={"lr_find": LrFindParams(**short)}))
    repeated = lr_find.run_range_test(params)
    # The second test on its own: the model of seed + 1, on the loader's passes after the first test's.
    runtime, splits, _, _, loader = prepare_training(params)
    cfg = params.lr_find
    second = lr_find.range_test(
        new_model(params.model, params.seed + 1, runtime, len(splits.classes)), loader, runtime,
        start_lr=cfg.start_lr, end_lr=cfg.end_lr, num_iter=cfg.num_iter, smooth=cfg.smooth,
        diverge_threshold=cfg.diverge_threshold, weight_decay=params.train.weight_decay,
        first_epoch=-(-cfg.num_iter // len(loader)),
    )  # fmt: skip
    assert second["raw_loss"][0] != single["raw_loss"][0]  # not a copy of the first test
    expected = lr_find.mean_curve([single, second], cfg.smooth)
    assert repeated["lr"] == expected["lr"] and repeated["diverged"] == expected["diverged"]
    assert repeated["raw_loss"] == pytest.approx(expected["raw_loss"], rel=1e-6)


@pytest.mark.slow
def test_the_range_test_minimises_the_training_loss_label_smoothing_included(tmp_path, monkeypatch):
    """train.label_smoothing reaches the range test: its curve is of the loss training will minimise."""
    monkeypatch.chdir(make_project(tmp_path))
    short = {**PARAMS["lr_find"], "num_iter": 10}
    params = parse_params({**PARAMS, "lr_find": short, "train": {**PARAMS["train"], "label_smoothing": 0.3}})
    result = lr_find.run_range_test(params)
    runtime, splits, _, _, loader = prepare_training(params)
    cfg = params.lr_find

    def direct(label_smoothing: float) -> dict:
        return lr_find.range_test(
            new_model(params.model, params.seed, runtime, len(splits.classes)), loader, runtime,
            start_lr=cfg.start_lr, end_lr=cfg.end_lr, num_iter=cfg.num_iter, smooth=cfg.smooth,
            diverge_threshold=cfg.diverge_threshold, weight_decay=params.train.weight_decay,
            label_smoothing=label_smoothing,
        )  # fmt: skip

    assert result["raw_loss"] == pytest.approx(direct(0.3)["raw_loss"], rel=1e-6)
    assert result["raw_loss"][0] != pytest.approx(direct(0.0)["raw_loss"][0], rel=1e-3)


@pytest.mark.parametrize("model, seeds", [("dilated_net", 11), ("custom_resnet", 3)])
def test_the_seed_spread_tables_are_what_the_stored_curves_give(model, seeds):
    """docs/results/lr_find_seeds.md's tables, recomputed from the curves stored beside it."""
    spec = importlib.util.spec_from_file_location("lr_find_seeds", ROOT / "benchmarks" / "lr_find_seeds.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.summarise(model)
    assert len(summary["per_seed"]) == seeds and summary["descent_end"][1]["n"] == seeds
    doc = (ROOT / "docs/results/lr_find_seeds.md").read_text()
    for table in module.markdown(summary).split("\n\n"):
        assert table in doc


def test_results_file_is_a_curve_dvc_can_plot(tmp_path):
    result = curve(-3.0, blowup=-1.0)
    path = tmp_path / "reports/lr_find.json"
    lr_find.save_results(path, result, 1e-3, "steepest", N, repeats=3)
    saved = json.loads(path.read_text())
    assert saved["suggested_lr"] == 1e-3 and saved["rule"] == "steepest" and "wall_time_s" not in saved
    assert saved["repeats"] == 3
    assert saved["num_iter"] == N and saved["num_iter_run"] == len(result["lr"]) and saved["diverged"]
    assert [r["lr"] for r in saved["curve"]] == result["lr"]
    assert [r["loss"] for r in saved["curve"]] == result["loss"]

    values = dvc_plot_values(tmp_path, "lr_range_test", "lr", "reports/lr_find.json", "loss")
    points = [(p["lr"], p["loss"]) for p in values]
    assert points == [(r["lr"], r["loss"]) for r in saved["curve"]]


@pytest.mark.slow
def test_the_stage_writes_the_curve_the_plot_and_a_suggestion(tmp_path):
    root = make_project(tmp_path)
    (root / "reports/lr_find.json").unlink()
    result = run_stage(root, "lr_find")
    assert result.returncode == 0, result.stderr
    saved = json.loads((root / "reports/lr_find.json").read_text())
    cfg = PARAMS["lr_find"]
    assert saved["rule"] == "descent_end" and saved["num_iter"] == cfg["num_iter"] and saved["repeats"] == 1
    lrs = [r["lr"] for r in saved["curve"]]
    assert lrs[0] == cfg["start_lr"] and lrs == sorted(lrs) and len(lrs) == saved["num_iter_run"]
    assert lrs[3] < saved["suggested_lr"] < lrs[-2]
    assert f"suggested max LR {saved['suggested_lr']:.4g}" in result.stdout
    assert (root / "reports/lr_find.png").read_bytes().startswith(b"\x89PNG")
    assert json.loads((root / "reports/lr_find_time.json").read_text())["wall_time_s"] > 0

    # The train stage depends on lr_find.json: a rerun on the CPU must leave it byte for byte the same, or DVC would
    # retrain for nothing (the wall time, which differs on every run, lives in lr_find_time.json).
    first = (root / "reports/lr_find.json").read_bytes()
    assert run_stage(root, "lr_find").returncode == 0
    assert (root / "reports/lr_find.json").read_bytes() == first


@pytest.mark.slow
def test_the_stage_refuses_a_range_that_misses_the_descent(tmp_path):
    params = {**PARAMS, "lr_find": {"start_lr": 1e-9, "end_lr": 1e-8, "num_iter": 10}}
    root = make_project(tmp_path)
    set_params(root, params)
    result = run_stage(root, "lr_find")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "never fell" in result.stderr and "higher lr_find.end_lr" in result.stderr
    # The curve stays behind to look at, without a suggestion the train stage could pick up.
    assert json.loads((root / "reports/lr_find.json").read_text())["suggested_lr"] is None
    assert (root / "reports/lr_find.png").is_file()
