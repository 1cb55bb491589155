"""Prometheus metrics of the API: request counts and latencies, plus job figures read from
the database at scrape time (queue depth, jobs by status, job durations), so they hold
across API processes and workers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from app.db.models import Job
from app.services.transactions import read_only
from app.vocab import FINAL_JOB_STATUSES, JobStatus


class JobCollector(Collector):
    """Job gauges and counters computed from the jobs table."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Any]:
        try:
            with self.sessions() as s, read_only(s):
                by_status = s.execute(
                    select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
                ).all()
                durations = s.execute(
                    select(Job.kind, Job.status, func.count(), func.coalesce(func.sum(Job.seconds), 0))
                    .where(Job.seconds.is_not(None))
                    .group_by(Job.kind, Job.status)
                ).all()
        except Exception:
            return
        depth = GaugeMetricFamily("lethe_queue_depth", "Jobs waiting to run", labels=[])
        depth.add_metric([], sum(n for _, st, n in by_status if st == JobStatus.QUEUED))
        yield depth
        running = GaugeMetricFamily("lethe_jobs_running", "Jobs running now", labels=[])
        running.add_metric([], sum(n for _, st, n in by_status if st == JobStatus.RUNNING))
        yield running
        outcomes = CounterMetricFamily(
            "lethe_job_outcomes", "Finished jobs by kind and outcome", labels=["kind", "outcome"]
        )
        for kind, st, n in by_status:
            if st in FINAL_JOB_STATUSES:
                outcomes.add_metric([kind, st], n)
        yield outcomes
        dur = SummaryMetricFamily(
            "lethe_job_duration_seconds",
            "Engine seconds of finished jobs",
            labels=["kind", "outcome"],
        )
        for kind, st, n, total in durations:
            dur.add_metric([kind, st], count_value=n, sum_value=float(total or 0.0))
        yield dur


class HttpMetrics:
    """Request counter and latency histogram, labelled by route template (bounded cardinality)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "lethe_http_requests", "HTTP requests", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            "lethe_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    async def middleware(self, request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        """Starlette HTTP middleware body."""
        start = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.requests.labels(request.method, template, str(status)).inc()
            self.latency.labels(request.method, template).observe(time.perf_counter() - start)


def create_registry(sessions: sessionmaker[Session]) -> tuple[CollectorRegistry, HttpMetrics]:
    """A registry of its own per app (several apps may live in one test process)."""
    registry = CollectorRegistry()
    registry.register(JobCollector(sessions))
    return registry, HttpMetrics(registry)
