"""Verdicts judged on the stored per-sample evidence, through the worker with real runs.

A model memorises 32 training samples whose labels are wrong for their image (only
memorisation classifies them), its reference statistics are computed (K = 4), and two
deletions of those samples are judged with the default policy:

- a method that changes nothing (fine-tuning at a vanishing learning rate): test accuracy is
  intact, yet the forget samples are flagged far above never-trained controls, so the verdict
  fails on the forgetting test and nothing is published;
- retraining without them: flagged at the control rate, the verdict passes.
"""

from __future__ import annotations

from typing import Any

from worker_world import LENIENT_POLICY, World

from app.services import models as model_service
from app.services import references as reference_service
from worker.tasks import run_job

RECIPE = {"optimizer": "sgd", "lr": 0.05, "epochs": 30, "batch_size": 16, "seed": 0}


def _run(world: World, job_id: str) -> Any:
    return run_job(job_id, worker="w1", settings=world.settings, sessions=world.sessions,
                   store=world.store, enqueue=world.enqueue)


def _checks(verdict: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["check"]: c for c in verdict["checks"]}


def test_forgetting_test_fails_a_deletion_that_forgot_nothing_and_passes_retraining(
    memo_world: tuple[World, list[str]],
) -> None:
    world, memorised = memo_world
    with world.sessions() as s:
        reg = model_service.register_model_train(
            s, principal=world.principal, name="memo-cnn", dataset="memo",
            architecture="small_cnn", num_classes=4, recipe=RECIPE, settings=world.settings,
        )
    assert _run(world, str(reg.job_id)).outcome == "succeeded"
    ref_job = reference_service.get_references(world.sessions(), "memo-cnn")["job_id"]
    assert _run(world, ref_job).outcome == "succeeded"

    _, job_id = world.submit("memo-cnn", memorised, method="finetune",
                             method_options={"lr": 1e-9, "epochs": 0.05})
    assert job_id and _run(world, job_id).outcome == "failed"
    job = world.job(job_id)
    assert job.error and job.error["code"] == "verdict_failed"
    verdict, evidence = job.verdict, job.evidence
    assert verdict is not None and evidence is not None
    checks = _checks(verdict)
    assert checks["max_acc_test_drop"]["ok"]  # accuracy looks fine ...
    assert not checks["forgetting"]["ok"]  # ... but the samples are still recognised
    assert checks["forgetting"]["p_value"] < 0.05
    assert verdict["forgetting"] == "tested"
    assert any(r.startswith("forget samples flagged as members") for r in verdict["reasons"])
    # The evidence is kept per sample, with the history of the run, on the failed job.
    assert set(evidence["p_values"]) == set(memorised)
    assert evidence["forget"]["flagged"] >= evidence["control"]["flagged"] + 4
    assert evidence["code_version"] and job.history is not None
    assert [v.version for v in world.versions()] == [1]

    _, retrain_job = world.submit("memo-cnn", memorised, method="retrain")
    assert retrain_job and _run(world, retrain_job).outcome == "succeeded"
    job = world.job(retrain_job)
    assert job.verdict is not None and job.evidence is not None
    assert _checks(job.verdict)["forgetting"]["ok"]
    assert job.verdict["forgetting"] == "tested"  # the original is flagged: the test has power
    assert job.evidence["original"]["flagged"] > job.evidence["control_original"]["flagged"]
    assert [v.version for v in world.versions()] == [1, 2]


def test_a_deletion_before_the_references_says_so_and_publishes(
    memo_world: tuple[World, list[str]],
) -> None:
    world, memorised = memo_world
    with world.sessions() as s:
        reg = model_service.register_model_train(
            s, principal=world.principal, name="memo-cnn", dataset="memo",
            architecture="small_cnn", num_classes=4, recipe={**RECIPE, "epochs": 2},
            settings=world.settings, policy=LENIENT_POLICY,
        )
    assert _run(world, str(reg.job_id)).outcome == "succeeded"
    _, job_id = world.submit("memo-cnn", memorised[:4])
    assert job_id and _run(world, job_id).outcome == "succeeded"
    job = world.job(job_id)
    assert job.verdict is not None and job.evidence is not None
    assert job.verdict["forgetting"] == "not_tested_references_pending"
    assert job.verdict["forgetting_summary"] == "forgetting not tested: references pending"
    assert "forgetting" not in _checks(job.verdict)
    assert job.evidence["references"]["status"] == "pending"
