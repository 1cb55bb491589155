"""The baseline unlearning methods on a tiny problem a small CNN memorises in seconds.

Synthetic 12x12 digits-like images: each of 4 classes is a fixed random template plus pixel
noise, so any model that learns the task classifies fresh samples of it correctly. A small
forget set carries RANDOM labels (always different from its template's class): only
memorisation can classify it, and a model that never saw it scores 0 on it. The original
model is trained until it memorises that set; every method must then make the memorised
labels go away while retained samples and held-out samples stay classified.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tiny_problem import NUM_CLASSES, RECIPE, Problem

from engine.archs import build_model
from engine.datasets import Dataset
from engine.errors import Cancelled, InvalidInput
from engine.methods import METHODS, UnlearnContext, make_method
from engine.methods.unsir import noise_labels
from engine.runtime import DeviceData, Reporter

BASELINES = ("finetune", "neggrad_plus", "bad_teacher", "scrub", "unsir", "ssd")
# The defaults are budgets for mnist5k (4,000 samples, batch 64, an 8-epoch recipe at lr
# 0.05). Memorisation here is harder to undo: 30 epochs over 240 samples at lr 0.1, decayed
# to 0, and the defaults barely move it (measured: forget accuracy stays 1.00 for finetune,
# neggrad_plus, bad_teacher and scrub). Each method gets the budget or step size that lets
# it act on this problem, in its own terms; none of them touches what is being checked.
OPTIONS: dict[str, dict[str, Any]] = {
    "finetune": {"epochs": 10.0, "batch_size": 32, "lr": 0.1, "weight_decay": 5e-3},
    "neggrad_plus": {"epochs": 5.0, "batch_size": 32, "forget_batch_size": 16, "lr": 0.04,
                     "beta": 0.9},
    "bad_teacher": {"epochs": 8.0, "batch_size": 32, "lr": 3e-3},
    # SCRUB's last epoch is min-steps only, as in its paper. Rewinding (+R) is tested on its
    # own below: its reference, held-out samples of the forget set's classes, does not
    # describe samples memorised under random labels.
    "scrub": {"epochs": 6, "max_epochs": 5, "batch_size": 32, "forget_batch_size": 4,
              "lr": 5e-3, "rewind": False},
    # The authors' notebook rates: the SSD port's 1e-4 (the default) barely moves this problem.
    "unsir": {"batch_size": 32, "retain_fraction": 1.0, "impair_lr": 0.02, "repair_lr": 0.01},
    "ssd": {"batch_size": 32, "alpha": 20.0},
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_every_baseline_is_registered() -> None:
    assert set(BASELINES) | {"retrain", "feature_constraint"} <= set(METHODS)
    for name in BASELINES:
        assert METHODS[name].name == name


#: Gradient ascent is chaotic on this problem: a rounding difference (another CPU) moves a
#: run from a clean result to a collapse. Measured over seeds 0-3 (lr 0.04, beta 0.9, 5
#: passes): acc_forget 0.38, 0.19, 0.25, 0.19, acc_retain 1.00, 1.00, 0.79, 1.00; at lr 0.05
#: two of four runs lost more than 40 points of retained accuracy. So NegGrad+ is held to
#: forgetting on every seed and to keeping the rest on three of four.
NEGGRAD_SEEDS = range(4)


def test_neggrad_plus_forgets_on_every_seed_and_keeps_the_rest_on_most(problem: Problem) -> None:
    before = _state(problem.original)
    results = []
    for seed in NEGGRAD_SEEDS:
        ctx = problem.context(seed=seed)
        seen: list[int] = []
        ctx.reporter = Reporter(lambda p, seen=seen: seen.append(p.step), None, min_interval_s=0.0)
        out = make_method("neggrad_plus", OPTIONS["neggrad_plus"]).run(ctx)
        assert seen == list(range(1, out.steps + 1)) and len(out.history) == out.steps
        results.append(tuple(problem.acc(out.model, idx) for idx in
                             (problem.forget_idx, problem.retain_idx, problem.test_idx)))
    after = problem.original.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(f <= 0.4 for f, _, _ in results), results
    kept = [r >= 0.9 and t >= 0.9 for _, r, t in results]
    assert sum(kept) >= 3, results


@pytest.mark.parametrize("name", [b for b in BASELINES if b != "neggrad_plus"])
def test_method_forgets_the_memorised_set_and_keeps_the_rest(problem: Problem, name: str) -> None:
    before = _state(problem.original)
    ctx = problem.context()
    seen: list[tuple[str, int, int]] = []
    ctx.reporter = Reporter(lambda p: seen.append((p.phase, p.step, p.total_steps)), None,
                            min_interval_s=0.0)
    out = make_method(name, OPTIONS[name]).run(ctx)

    acc_forget = problem.acc(out.model, problem.forget_idx)
    acc_retain = problem.acc(out.model, problem.retain_idx)
    acc_test = problem.acc(out.model, problem.test_idx)
    assert acc_forget <= 0.4, f"{name}: forget accuracy {acc_forget:.2f} (original 1.00)"
    assert acc_retain >= 0.9, f"{name}: retain accuracy {acc_retain:.2f}"
    assert acc_test >= 0.9, f"{name}: test accuracy {acc_test:.2f}"

    # The original model is left as it was; progress was reported for every step.
    after = problem.original.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert out.steps >= 1 and len(seen) == out.steps
    assert [s for _, s, _ in seen] == list(range(1, out.steps + 1))
    assert {phase for phase, _, _ in seen} == {"unlearning"}
    assert all(total == out.steps for _, _, total in seen)
    assert len(out.history) == out.steps
    assert not out.model.training


@pytest.mark.parametrize("name", BASELINES)
def test_method_is_reproducible_for_a_seed(problem: Problem, name: str) -> None:
    options = {**OPTIONS[name]}
    a = make_method(name, options).run(problem.context(seed=3)).model.state_dict()
    b = make_method(name, options).run(problem.context(seed=3)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", BASELINES)
def test_unknown_or_invalid_options_are_refused(name: str) -> None:
    with pytest.raises(InvalidInput, match="unknown options"):
        make_method(name, {"no_such_option": 1})
    bad = "alpha" if name == "ssd" else "lr" if name != "unsir" else "impair_lr"
    with pytest.raises(InvalidInput):
        make_method(name, {bad: -1.0})


@pytest.mark.parametrize("name", BASELINES)
def test_cancellation_stops_at_the_first_step(problem: Problem, name: str) -> None:
    polls: list[int] = []

    def cancel() -> bool:
        polls.append(1)
        return True

    ctx = problem.context(reporter=Reporter(None, cancel))
    with pytest.raises(Cancelled):
        make_method(name, OPTIONS[name]).run(ctx)
    assert len(polls) == 1


def test_noise_labels_follow_the_forget_set_classes() -> None:
    assert noise_labels(np.array([2, 2, 2, 2]), 8).tolist() == [2] * 8
    assert noise_labels(np.array([1, 1, 1, 3]), 8).tolist() == [1] * 6 + [3] * 2
    rare = noise_labels(np.array([0] * 30 + [2]), 4)
    assert len(rare) == 4 and rare.tolist().count(2) == 1  # every class present gets one
    assert sorted(set(noise_labels(np.array([3, 1, 2]), 2).tolist())) == [1, 2, 3]


def test_unsir_labels_noise_with_the_forgotten_class(problem: Problem) -> None:
    """Forget a whole class that is not class 0: the noise carries that class's label and
    the model loses that class, not class 0 (the public notebook's bug)."""
    dataset = problem.data.dataset
    train = dataset.train_indices
    forgotten = 2
    forget = train[dataset.labels[train] == forgotten]
    out = make_method("unsir", OPTIONS["unsir"]).run(problem.context(forget_idx=forget))
    assert set(out.extra["noise_labels"]) == {forgotten}

    def class_acc(c: int) -> float:
        idx = problem.test_idx[problem.templates[problem.test_idx] == c]
        return problem.acc(out.model, idx)

    assert class_acc(forgotten) <= 0.2
    assert min(class_acc(c) for c in range(NUM_CLASSES) if c != forgotten) >= 0.9


@pytest.mark.parametrize("name", ["neggrad_plus", "bad_teacher", "scrub", "unsir", "ssd"])
def test_batchnorm_statistics_stay_frozen_on_resnet18(name: str) -> None:
    """Forget (or noise) batches must not move the running statistics of a BatchNorm model."""
    rng = np.random.default_rng(1)
    n = 24
    dataset = Dataset(
        name="rgb", ids=np.asarray([f"r{i}" for i in range(n)]),
        labels=rng.integers(0, 3, n).astype(np.int64),
        splits=np.asarray(["train"] * 20 + ["test"] * 4),
        images=rng.random((n, 3, 32, 32)).astype(np.float32), num_classes=3,
    )
    data = DeviceData(dataset, torch.device("cpu"))
    original = build_model("resnet18", 3, dataset.input_shape, seed=0).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    train = dataset.train_indices
    ctx = UnlearnContext(
        arch="resnet18", num_classes=3, data=data, original=original, forget_idx=train[:4],
        retain_idx=train[4:], heldout_idx=dataset.test_indices, recipe=RECIPE,
        teacher_seed=1, seed=0,
    )
    tiny: dict[str, dict[str, Any]] = {
        "neggrad_plus": {"epochs": 0.5, "batch_size": 8, "forget_batch_size": 4},
        "bad_teacher": {"epochs": 0.5, "batch_size": 8},
        "scrub": {"epochs": 1, "max_epochs": 1, "retain_fraction": 0.5, "batch_size": 8},
        "unsir": {"noise_batch_size": 4, "noise_steps": 1, "batch_size": 8,
                  "retain_fraction": 0.5, "repair_epochs": 0.5},
        "ssd": {"batch_size": 8},
    }
    out = make_method(name, tiny[name]).run(ctx)
    before, after = original.state_dict(), out.model.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats
    assert all(torch.equal(before[k], after[k]) for k in stats)
    # ...while the weights did change (the method ran).
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_scrub_rewinds_to_the_epoch_whose_forget_error_matches_held_out_data(
        problem: Problem) -> None:
    """SCRUB+R: among the epoch checkpoints, the one whose forget-set error is closest to the
    final model's error on held-out samples of the forget set's classes is returned."""
    from engine.methods.scrub import class_matched_error, error_on

    dataset = problem.data.dataset
    train = dataset.train_indices
    for forget in (problem.forget_idx, train[dataset.labels[train] == 1]):
        ctx = problem.context(forget_idx=forget)
        options = {**OPTIONS["scrub"], "rewind": True}
        out = make_method("scrub", options).run(ctx)
        errors = out.extra["epoch_forget_errors"]
        target = out.extra["rewind_target_error"]
        chosen = out.extra["rewound_to_epoch"]
        assert len(errors) == options["epochs"]
        assert abs(errors[chosen - 1] - target) == min(abs(e - target) for e in errors)
        assert error_on(out.model, ctx, forget) == pytest.approx(errors[chosen - 1])
        last = make_method("scrub", options | {"rewind": False}).run(ctx).model
        assert class_matched_error(last, ctx) == pytest.approx(target)
        if chosen < len(errors):  # a rewind happened: the model is not the last epoch's
            assert any(not torch.equal(a, b) for a, b in zip(
                out.model.state_dict().values(), last.state_dict().values(), strict=True))
    # Memorised random labels: held-out samples of their classes are classified correctly,
    # so the reference error is low and an early checkpoint is chosen; a whole class forgotten:
    # its held-out samples are misclassified at the end, and so is the chosen forget set.
    assert target >= 0.9 and errors[chosen - 1] >= 0.9


def test_neggrad_plus_pulls_toward_the_original_weights(problem: Problem) -> None:
    """The reference's L2 term: with it, the weights end closer to the original's."""
    def distance(options: dict[str, Any]) -> float:
        model = make_method("neggrad_plus", {**OPTIONS["neggrad_plus"], **options}).run(
            problem.context()).model
        return float(sum((p - q).pow(2).sum() for p, q in zip(
            model.parameters(), problem.original.parameters(), strict=True)))

    assert distance({"l2_pull": 1.0}) < 0.8 * distance({"l2_pull": 0.0})


def test_bad_teacher_budget_is_counted_in_steps(problem: Problem) -> None:
    ctx = problem.context()
    assert make_method("bad_teacher", {"batch_size": 32}).run(ctx).steps == 60
    pool = len(problem.forget_idx) + int(np.ceil(0.3 * len(ctx.retain_idx)))
    by_epochs = make_method("bad_teacher", {"batch_size": 32, "epochs": 1.0}).run(ctx)
    assert by_epochs.steps == int(np.ceil(pool / 32))


def test_retrain_with_a_seed_offset_is_another_exact_retraining(problem: Problem) -> None:
    """The noise floor's row: the same recipe and retain pool, other random draws."""
    ctx = problem.context()
    gold, other = (make_method("retrain", {"seed_offset": k}).run(ctx) for k in (0, 1))
    assert gold.steps == other.steps
    assert any(not torch.equal(p, q) for p, q in zip(
        gold.model.parameters(), other.model.parameters(), strict=True))
    again = make_method("retrain", {}).run(ctx).model
    assert all(torch.equal(p, q) for p, q in zip(gold.model.parameters(), again.parameters(), strict=True))
    with pytest.raises(InvalidInput):
        make_method("retrain", {"seed_offset": -1})
