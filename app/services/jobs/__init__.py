"""Jobs: the unit of work a worker runs for a model, from creation to its end.

Rules enforced here:
- Jobs of one model run strictly in `position` order: a job can be claimed only when no
  earlier job of the model is `queued` or `running`, and it runs on the model's latest
  version at claim time.
- A claim is one conditional UPDATE, so two concurrent claimers never both win.
- Publishing writes the checkpoint first and then, in one transaction, the version row, the
  tombstones, the request statuses and the audit events.
- The `attempt` argument some functions accept makes a worker that lost its claim (its
  heartbeat expired and another worker took the job) fail with `StaleAttempt` instead of
  overwriting the new attempt's state.

Modules, in the order a job meets them:
- `lifecycle`: creation at the end of the model's line, the broker's clock, progress.
- `claim`: the worker's claim and the `JobTicket` it runs from.
- `judging`: the policy's verdict on a finished run and the manifest it would publish with.
- `publish`: `complete_job`, publishing a passing run; `fallback`: failing a verdict.
- `endings`: failing and cancelling, and what an end does to the job's requests.
- `queries`: row loaders, the shared queries and the API's job views.
"""

from app.services.jobs.claim import DEFAULT_MAX_ATTEMPTS, JobTicket, claim_job
from app.services.jobs.endings import (
    cancel_in_transaction,
    cancel_job,
    discard_upload,
    fail_job,
    mark_cancelled,
)
from app.services.jobs.lifecycle import (
    audit_job_queued,
    create_job,
    create_reference_job,
    job_queued_event,
    mark_enqueued,
    record_progress,
)
from app.services.jobs.publish import CompletionResult, complete_job
from app.services.jobs.queries import (
    find_stale_jobs,
    get_job,
    ids_digest,
    list_jobs,
    next_queued_job_id,
    published_files,
    reference_files,
)

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "CompletionResult",
    "JobTicket",
    "audit_job_queued",
    "cancel_in_transaction",
    "cancel_job",
    "claim_job",
    "complete_job",
    "create_job",
    "create_reference_job",
    "discard_upload",
    "fail_job",
    "find_stale_jobs",
    "get_job",
    "ids_digest",
    "job_queued_event",
    "list_jobs",
    "mark_cancelled",
    "mark_enqueued",
    "next_queued_job_id",
    "published_files",
    "record_progress",
    "reference_files",
]
