"""Deletion-request intake on SQLite and PostgreSQL: validation, coalescing, already-forgotten
IDs, idempotency (replay, mismatch, concurrent duplicates), cancel, listing."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import func, select

from app.db.models import DeletionRequest, IdempotencyKey, Job, RequestSample, Tombstone
from app.errors import (
    DuplicateSampleIds,
    IdempotencyInFlight,
    IdempotencyKeyMismatch,
    InvalidInput,
    ModelNotFound,
    NotCancellable,
    PayloadTooLarge,
    TestSplitSamples,
    UnknownSampleIds,
)
from app.services import deletions, jobs


def _count(dep: Any, model: Any, *where: Any) -> int:
    with dep.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def test_request_is_queued_in_a_new_job_and_readable(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    sub = deployment.submit("m", train[:10], subject_ref="dsr-1", reason="gdpr art. 17")
    body = sub.body
    assert sub.status_code == 202 and not sub.replayed
    assert body["status"] == "queued" and body["sample_count"] == 10
    assert body["already_forgotten_count"] == 0 and body["job_id"] == sub.enqueue_job_id
    assert body["method"] == "feature_constraint" and body["verify"] == "standard"
    assert body["received_at"].endswith("Z")
    with deployment.sessions() as s:
        again = deletions.get_deletion_request(s, body["id"])
        job = jobs.get_job(s, body["job_id"])
    assert again == body
    assert job["status"] == "queued" and job["request_ids"] == [body["id"]]
    assert job["kind"] == "unlearn" and job["base_version"] is None
    assert _count(deployment, RequestSample, RequestSample.request_id == body["id"]) == 10


def test_unknown_model_is_404(deployment: Any) -> None:
    with pytest.raises(ModelNotFound) as err:
        deployment.submit("nope", ["s0000"])
    assert err.value.status == 404 and err.value.code == "model_not_found"


def test_unknown_and_test_split_ids_are_refused_with_the_ids(deployment: Any) -> None:
    deployment.upload_model("m")
    train, test = deployment.ids()
    unknown = [f"ghost-{i:03d}" for i in range(150)]
    with pytest.raises(UnknownSampleIds) as err:
        deployment.submit("m", train[:3] + unknown)
    problem = err.value.problem()
    assert problem["code"] == "unknown_sample_ids" and problem["status"] == 422
    assert problem["count"] == 150 and len(problem["sample_ids"]) == 100
    assert problem["sample_ids"] == sorted(unknown)[:100]
    with pytest.raises(TestSplitSamples) as err2:
        deployment.submit("m", train[:2] + test[:2])
    assert err2.value.problem()["sample_ids"] == sorted(test[:2])
    assert err2.value.code == "test_split_samples"
    assert _count(deployment, DeletionRequest) == 0 and _count(deployment, Job) == 0


def test_duplicates_empty_and_oversized_lists_are_refused(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    with pytest.raises(DuplicateSampleIds) as err:
        deployment.submit("m", [train[0], train[1], train[0]])
    assert err.value.problem()["sample_ids"] == [train[0]]
    with pytest.raises(InvalidInput):
        deployment.submit("m", [])
    deployment.settings.max_ids_per_request = 5
    with pytest.raises(PayloadTooLarge):
        deployment.submit("m", train[:6])
    with pytest.raises(InvalidInput, match="method"):
        deployment.submit("m", train[:1], method="forget_everything")
    with pytest.raises(InvalidInput, match="callback_url"):
        deployment.submit("m", train[:1], callback_url="http://example.com/hook")
    assert _count(deployment, DeletionRequest) == 0


def test_requests_coalesce_into_the_queued_job(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    subs = [deployment.submit("m", train[i * 5 : i * 5 + 5]) for i in range(4)]
    job_ids = {s.body["job_id"] for s in subs}
    assert len(job_ids) == 1
    assert [s.enqueue_job_id is not None for s in subs] == [True, False, False, False]
    other = deployment.submit("m", train[40:42], verify="retrain")
    assert other.body["job_id"] not in job_ids
    with deployment.sessions() as s:
        job = jobs.get_job(s, subs[0].body["job_id"])
    assert sorted(job["request_ids"]) == sorted(x.body["id"] for x in subs)


def test_a_running_job_takes_no_new_requests(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    first = deployment.submit("m", train[:3])
    with deployment.sessions() as s:
        ticket = jobs.claim_job(s, first.enqueue_job_id, "w1", store=deployment.store, heartbeat_timeout_s=60)
    assert ticket is not None and ticket.forget_ids == sorted(train[:3])
    second = deployment.submit("m", train[3:6])
    assert second.enqueue_job_id is not None and second.body["job_id"] != first.body["job_id"]
    with deployment.sessions() as s:
        assert jobs.get_job(s, first.enqueue_job_id)["request_ids"] == [first.body["id"]]


def test_already_forgotten_ids_are_counted_and_only_forgotten_succeeds_at_once(
    deployment: Any,
) -> None:
    from app.db.models import ModelRow
    from app.db.types import utcnow

    deployment.upload_model("m")
    train, _ = deployment.ids()
    with deployment.sessions() as s:
        model_id = s.scalar(select(ModelRow.id).where(ModelRow.name == "m"))
        for sid in train[:4]:
            s.add(Tombstone(model_id=model_id, sample_id=sid, version=1, job_id="job_x", created_at=utcnow()))
        s.commit()
    mixed = deployment.submit("m", train[2:6])
    assert mixed.body["already_forgotten_count"] == 2 and mixed.body["status"] == "queued"
    only = deployment.submit("m", train[:3])
    assert only.enqueue_job_id is None and only.body["job_id"] is None
    assert only.body["status"] == "succeeded" and only.body["already_forgotten_count"] == 3
    assert only.body["result_version"] == 1 and only.body["finished_at"] is not None
    with deployment.sessions() as s:
        ticket = jobs.claim_job(s, mixed.enqueue_job_id, "w", store=deployment.store, heartbeat_timeout_s=60)
    assert ticket is not None
    assert ticket.forget_ids == sorted(train[4:6])
    assert ticket.forgotten_ids == sorted(train[:6])


def test_idempotent_replay_and_mismatch(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    first = deployment.submit("m", train[:5], idempotency_key="k-1")
    replay = deployment.submit("m", train[:5], idempotency_key="k-1")
    assert replay.replayed and replay.body == first.body and replay.status_code == 202
    assert replay.enqueue_job_id is None
    with pytest.raises(IdempotencyKeyMismatch) as err:
        deployment.submit("m", train[:6], idempotency_key="k-1")
    assert err.value.status == 422
    assert _count(deployment, DeletionRequest) == 1
    # A failed creation frees the key: the corrected body can use it.
    with pytest.raises(UnknownSampleIds):
        deployment.submit("m", ["ghost"], idempotency_key="k-2")
    ok = deployment.submit("m", train[6:7], idempotency_key="k-2")
    assert ok.body["status"] == "queued"


def _claim_body(train: list[str]) -> dict[str, Any]:
    return {
        "model": "m",
        "sample_ids": train[:2],
        "subject_ref": None,
        "reason": None,
        "method": "feature_constraint",
        "method_options": {},
        "verify": "standard",
        "callback_url": None,
    }


def test_a_key_in_flight_is_409_and_an_abandoned_claim_frees_it(deployment: Any) -> None:
    from app.services import idempotency

    deployment.upload_model("m")
    train, _ = deployment.ids()
    digest = idempotency.body_hash(_claim_body(train))
    first = deployment.sessions()
    try:
        claim, replay = idempotency.begin(first, deployment.principal.id, "k-flight", digest, ttl_s=3600)
        assert claim is not None and replay is None
        if deployment.backend == "postgresql":
            # The first request's transaction is still open: a duplicate learns it at once.
            with pytest.raises(IdempotencyInFlight) as err:
                deployment.submit("m", train[:2], idempotency_key="k-flight")
            assert err.value.status == 409
        # (On SQLite the first transaction holds the write lock: a duplicate would wait.)
    finally:
        first.close()  # the first request dies before committing: its claim goes with it
    retried = deployment.submit("m", train[:2], idempotency_key="k-flight")
    assert retried.status_code == 202 and not retried.replayed
    assert deployment.submit("m", train[:2], idempotency_key="k-flight").body == retried.body
    assert _count(deployment, IdempotencyKey) == 1 and _count(deployment, DeletionRequest) == 1


def test_concurrent_duplicates_create_exactly_one_request(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    results: list[Any] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def post() -> None:
        barrier.wait()
        try:
            results.append(deployment.submit("m", train[:20], idempotency_key="same"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(isinstance(e, IdempotencyInFlight) for e in errors), errors
    assert {r.body["id"] for r in results} and len({r.body["id"] for r in results}) == 1
    assert _count(deployment, DeletionRequest) == 1
    assert _count(deployment, IdempotencyKey) == 1


def test_cancel_queued_request_and_empty_job(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    a = deployment.submit("m", train[:2])
    b = deployment.submit("m", train[2:4])
    with deployment.sessions() as s:
        out = deletions.cancel_deletion_request(s, a.body["id"], actor="t")
        assert out["status"] == "cancelled" and out["finished_at"]
        assert jobs.get_job(s, a.body["job_id"])["status"] == "queued"
        deletions.cancel_deletion_request(s, b.body["id"], actor="t")
        assert jobs.get_job(s, a.body["job_id"])["status"] == "cancelled"
        with pytest.raises(NotCancellable) as err:
            deletions.cancel_deletion_request(s, a.body["id"], actor="t")
    assert err.value.status == 409 and err.value.code == "not_cancellable"


def test_running_request_is_not_cancellable(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    a = deployment.submit("m", train[:2])
    with deployment.sessions() as s:
        ticket = jobs.claim_job(s, a.enqueue_job_id, "w", store=deployment.store, heartbeat_timeout_s=60)
        assert ticket is not None
        with pytest.raises(NotCancellable):
            deletions.cancel_deletion_request(s, a.body["id"], actor="t")
        assert deletions.get_deletion_request(s, a.body["id"])["status"] == "running"


def test_list_filters_and_paginates(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    ids = [deployment.submit("m", [train[i]], subject_ref=f"r{i % 2}").body["id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    with deployment.sessions() as s:
        while True:
            page = deletions.list_deletion_requests(s, limit=2, cursor=cursor)
            seen += [r["id"] for r in page.items]
            cursor = page.next_cursor
            if cursor is None:
                break
        assert seen == sorted(ids, reverse=True)
        only = deletions.list_deletion_requests(s, subject_ref="r1", limit=50)
        assert sorted(r["id"] for r in only.items) == sorted(ids[1::2])
        assert deletions.list_deletion_requests(s, status="succeeded", limit=50).items == []
        assert len(deletions.list_deletion_requests(s, model="m", limit=50).items) == 5


def test_bulk_request_of_many_ids(deployment: Any, tmp_path: Any) -> None:
    """20,000 IDs in one request: validated and stored in bulk."""
    import numpy as np

    from app.services import datasets

    n = 24000
    path = tmp_path / "big.npz"
    ids = np.asarray([f"b{i:06d}" for i in range(n)])
    np.savez(
        path,
        x=np.zeros((n, 4, 4), dtype=np.uint8),
        y=np.arange(n) % 4,
        ids=ids,
        split=np.where(np.arange(n) < 22000, "train", "test"),
    )
    with deployment.sessions() as s:
        datasets.register_dataset(s, name="big", kind="npz", uri=str(path), actor="t")
    with deployment.sessions() as s:
        from app.services import models

        models.register_model_train(
            s,
            principal=deployment.principal,
            name="bigm",
            dataset="big",
            architecture="small_cnn",
            num_classes=4,
            recipe={},
            settings=deployment.settings,
        )
    sub = deployment.submit("bigm", [f"b{i:06d}" for i in range(20000)])
    assert sub.body["sample_count"] == 20000
    assert _count(deployment, RequestSample, RequestSample.request_id == sub.body["id"]) == 20000


def test_concurrent_requests_for_one_model_share_one_job(deployment: Any) -> None:
    deployment.upload_model("m")
    train, _ = deployment.ids()
    errors: list[BaseException] = []
    job_ids: list[str] = []
    gate = threading.Barrier(6)

    def post(i: int) -> None:
        gate.wait()
        try:
            for j in range(4):
                sub = deployment.submit("m", [train[i * 4 + j]])
                job_ids.append(sub.body["job_id"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(job_ids) == 24 and len(set(job_ids)) == 1
    assert _count(deployment, Job) == 1 and _count(deployment, DeletionRequest) == 24
    with deployment.sessions() as s:
        ticket = jobs.claim_job(s, job_ids[0], "w", store=deployment.store, heartbeat_timeout_s=60)
    assert ticket is not None and ticket.forget_ids == sorted(train[:24])
