"""Prometheus metrics (/metrics) and the database's view of the queues (`ciserver status`).

Two kinds of numbers, chosen so that each is right whatever process does the work:

* **Counters and the latency histogram** are counted where things happen: SMTP and IMAP
  intake in the daemon, inbox processing and relaying in the daemon *and* in its inbox worker
  processes (`ciserver worker inbox`). `ciserver serve` therefore puts prometheus_client in
  multiprocess mode: every process writes its counts to mmap files in
  ``STATE_DIR/metrics/<daemon pid>/`` (``$PROMETHEUS_MULTIPROC_DIR``, inherited by the workers),
  and /metrics, served by the daemon, adds up the files of all its processes, including
  workers that died and were restarted, so counters never go backwards while the daemon runs.
  The directory of a daemon that is gone is removed when the next one starts. Each instance
  counts its own work: on PostgreSQL with several instances, ``sum()`` them.
* **Queue gauges** (depth, oldest age, failed items) are nobody's counters: they are read from
  the database when /metrics is scraped, with index-backed queries whose cost is bounded by
  the number of *waiting* items, not by the size of the tables. They are the truth for the
  whole installation: several instances on one PostgreSQL all report the same values (take
  ``max()``), and a worker process needs no bookkeeping for them.

Counting happens after the transaction that records the work commits: an inbox batch that is
rolled back and retried message by message is counted once.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .store.models import InboxMessage, OutboxItem

log = logging.getLogger("ciserver.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
INBOUND_SOURCES = ("smtp", "imap")
SMTP_REFUSALS = ("unknown_recipient", "too_many_recipients", "sender_not_allowed",
                 "too_big", "storage_error", "too_many_connections", "session_timeout")
INBOUND_OUTCOMES = ("done", "ignored", "rejected", "quarantined", "failed")
OUTBOUND_OUTCOMES = ("sent", "deferred", "failed")
PARTSTATS = ("ACCEPTED", "DECLINED", "TENTATIVE", "DELEGATED", "NEEDS-ACTION")
ANSWER_KINDS = (*PARTSTATS, "COUNTER", "OTHER")
ANSWER_OUTCOMES = ("applied", "stale", "late", "counter")
# Seconds from queued to accepted by the next hop: a fan-out takes seconds to minutes,
# greylisting and retries take minutes to hours.
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 1800, 3600, 7200,
                   14400, 43200, 86400)


class _Metrics:
    """The counted metrics of this process (built on first use, after the mode is chosen)."""

    def __init__(self) -> None:
        # registry=None: the exposition registry is built per scrape (see exposition()).
        self.inbound_received = Counter(
            "ciserver_inbound_received", "Messages committed to the inbox, by how they came.",
            ["source"], registry=None)
        self.smtp_refused = Counter(
            "ciserver_smtp_refused", "SMTP commands or connections refused before the inbox: "
            "by reason (the answer's class: 5xx for recipients, senders and size, 4xx for "
            "the rest).", ["reason"], registry=None)
        self.inbound_processed = Counter(
            "ciserver_inbound_processed", "Inbox messages processed, by final status.",
            ["outcome"], registry=None)
        self.outbound = Counter(
            "ciserver_outbound_deliveries",
            "Delivery attempts recorded: sent (2xx), deferred (4xx or network error: "
            "retried), failed (5xx or queue lifetime exceeded).", ["outcome"], registry=None)
        self.latency = Histogram(
            "ciserver_outbound_delivery_latency_seconds",
            "From queued (or re-queued with a newer version) to accepted by the next hop.",
            buckets=LATENCY_BUCKETS, registry=None)
        self.answers = Counter(
            "ciserver_answers", "Answers received from customers: REPLY PARTSTAT (or "
            "COUNTER), and what became of them (applied, stale, late, counter).",
            ["kind", "outcome"], registry=None)
        for source in INBOUND_SOURCES:
            self.inbound_received.labels(source)
        for outcome in INBOUND_OUTCOMES:
            self.inbound_processed.labels(outcome)
        for reason in SMTP_REFUSALS:
            self.smtp_refused.labels(reason)
        for outcome in OUTBOUND_OUTCOMES:
            self.outbound.labels(outcome)
        for kind in PARTSTATS:
            self.answers.labels(kind, "applied")

    def all(self) -> list[Counter | Histogram]:
        return [self.inbound_received, self.smtp_refused, self.inbound_processed, self.outbound,
                self.latency, self.answers]


_metrics: _Metrics | None = None
_directory: Path | None = None


def _get() -> _Metrics:
    global _metrics
    if _metrics is None:
        _metrics = _Metrics()
    return _metrics


# -------------------------------------------------------------------------------------------
# Process modes


def _use_directory(path: Path) -> None:
    global _directory, _metrics
    os.environ[MULTIPROC_ENV] = str(path)  # inherited by the worker processes
    values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    _directory = path
    _metrics = None  # rebuilt with file-backed values


def start_multiprocess(state_dir: Path) -> Path:
    """The daemon, before it starts worker processes: count in ``STATE_DIR/metrics/<pid>``
    (fresh), and remove the directories of daemons that are gone."""
    base = state_dir / "metrics"
    base.mkdir(parents=True, exist_ok=True)
    for old in base.iterdir():
        if old.is_dir() and old.name.isdigit() and (int(old.name) == os.getpid()
                                                     or not _alive(int(old.name))):
            shutil.rmtree(old, ignore_errors=True)
    path = base / str(os.getpid())
    path.mkdir(mode=0o700)
    _use_directory(path)
    return path


def join_multiprocess() -> Path | None:
    """A worker process: count into the daemon's directory (from the environment)."""
    value = os.environ.get(MULTIPROC_ENV, "")
    if value and Path(value).is_dir():
        _use_directory(Path(value))
        return Path(value)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -------------------------------------------------------------------------------------------
# What the services call (one line at each place)


def inbound_received(source: str) -> None:
    """A message is committed to the inbox (services.inbox.accept)."""
    _get().inbound_received.labels(source if source in INBOUND_SOURCES else "other").inc()


def smtp_refused(reason: str) -> None:
    """The SMTP listener refused a recipient, a message or a connection (smtp.py)."""
    _get().smtp_refused.labels(reason if reason in SMTP_REFUSALS else "other").inc()


def answer(session: Any, kind: str, outcome: str) -> None:
    """An answer is recorded in ``session`` (counted by inbound_processed once it commits)."""
    kind = kind.upper()
    if kind not in ANSWER_KINDS:
        kind = "OTHER"  # PARTSTAT comes from mail: never let it make new series
    session.info.setdefault("ciserver.metrics.answers", []).append((kind, outcome))


def inbound_processed(session: Any, statuses: Iterable[str]) -> None:
    """Inbox messages reached their final status; ``session`` (or None) has committed."""
    m = _get()
    for status in statuses:
        m.inbound_processed.labels(status if status in INBOUND_OUTCOMES else "failed").inc()
    if session is not None:
        for kind, outcome in session.info.pop("ciserver.metrics.answers", ()):
            m.answers.labels(kind, outcome).inc()


def delivered(queued_at: datetime | None, now: datetime) -> None:
    """One message was accepted by the next hop."""
    m = _get()
    m.outbound.labels("sent").inc()
    if queued_at is not None:
        m.latency.observe(max(0.0, (now - queued_at).total_seconds()))


def not_delivered(state: str) -> None:
    """One attempt failed: ``state`` is the item's new state (pending = deferred)."""
    _get().outbound.labels("failed" if state == "failed" else "deferred").inc()


def deliveries_recorded(now: datetime, results: Sequence[tuple[Any, bool, bool, str]],
                        claims: Mapping[int, Any], failed: Sequence[Mapping[str, Any]]) -> None:
    """services.outbox.record committed ``results``; ``failed`` holds the new state of each
    unsuccessful one (``b_state``), ``claims`` the queued_at of the claimed items."""
    for d, ok, _permanent, _response in results:
        if ok:
            claim = claims.get(d.item_id)
            delivered(getattr(claim, "queued_at", None), now)
    for row in failed:
        not_delivered(str(row["b_state"]))


# -------------------------------------------------------------------------------------------
# The database's view of the queues


@dataclass
class QueueState:
    now: datetime
    outbox: dict[str, int] = field(default_factory=dict)  # pending, sending, failed
    outbox_oldest: datetime | None = None  # queued_at of the oldest pending/sending item
    outbox_overdue: datetime | None = None  # next_attempt_at of the most overdue pending item
    inbox: dict[str, int] = field(default_factory=dict)  # new, processing, failed (or all)
    inbox_oldest: datetime | None = None  # received_at of the oldest new message
    inbox_failed_recently: int = 0  # failed since ``since`` (detail only)
    outbox_failed_recently: int = 0

    def age(self, when: datetime | None) -> float:
        return max(0.0, (self.now - when).total_seconds()) if when is not None else 0.0


async def queue_state(engine: AsyncEngine, now: datetime, *, detail: bool = False,
                      since: timedelta = timedelta(hours=1)) -> QueueState:
    """Queue depth and age from the database. Every query is answered from the
    (state, next_attempt_at) and (status, id) indexes or touches waiting rows only;
    ``detail`` (`ciserver status`) also counts every inbox status and recent failures."""
    st = QueueState(now=now)
    o, i = OutboxItem, InboxMessage
    waiting = ("pending", "sending", "failed")
    async with engine.connect() as conn:
        for state, n in (await conn.execute(
                select(o.state, func.count()).where(o.state.in_(waiting))
                .group_by(o.state))).all():
            st.outbox[state] = int(n)
        st.outbox_oldest = (await conn.execute(
            select(func.min(o.queued_at)).where(o.state.in_(("pending", "sending"))))
        ).scalar_one_or_none()
        st.outbox_overdue = (await conn.execute(
            select(func.min(o.next_attempt_at)).where(o.state == "pending"))
        ).scalar_one_or_none()
        if st.outbox_overdue is not None and st.outbox_overdue > now:
            st.outbox_overdue = None  # the first retry is not due yet
        statuses = i.status.in_(("new", "processing", "failed")) if not detail else None
        q = select(i.status, func.count()).group_by(i.status)
        for status, n in (await conn.execute(q.where(statuses) if statuses is not None
                                             else q)).all():
            st.inbox[status] = int(n)
        st.inbox_oldest = (await conn.execute(
            select(i.received_at).where(i.status == "new").order_by(i.id).limit(1))
        ).scalar_one_or_none()
        if detail:
            st.inbox_failed_recently = int((await conn.execute(
                select(func.count()).where(i.status == "failed",
                                           i.processed_at >= now - since))).scalar_one())
            st.outbox_failed_recently = int((await conn.execute(
                select(func.count()).where(o.state == "failed",
                                           o.updated_at >= now - since))).scalar_one())
    return st


class _QueueCollector(Collector):
    def __init__(self, state: QueueState | None) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("ciserver_database_up",
                               "1 if the database answered the queue queries of this scrape.")
        up.add_metric([], 1.0 if self.state is not None else 0.0)
        yield up
        st = self.state
        if st is None:
            return
        depth = GaugeMetricFamily("ciserver_outbox_queue_depth",
                                  "Outbox items waiting to be sent, by state.",
                                  labels=["state"])
        for state in ("pending", "sending"):
            depth.add_metric([state], float(st.outbox.get(state, 0)))
        yield depth
        yield GaugeMetricFamily(
            "ciserver_outbox_queue_oldest_age_seconds",
            "Age of the oldest waiting outbox item (since queued; 0 = none waiting).",
            value=st.age(st.outbox_oldest))
        yield GaugeMetricFamily(
            "ciserver_outbox_overdue_seconds",
            "How long the most overdue pending item has been due (0 = the relay keeps up).",
            value=st.age(st.outbox_overdue))
        yield GaugeMetricFamily(
            "ciserver_outbox_failed_items",
            "Outbox items that failed for good (see `ciserver queue list --state failed`).",
            value=float(st.outbox.get("failed", 0)))
        inbox = GaugeMetricFamily("ciserver_inbox_queue_depth",
                                  "Inbox messages waiting to be processed, by status.",
                                  labels=["status"])
        for status in ("new", "processing"):
            inbox.add_metric([status], float(st.inbox.get(status, 0)))
        yield inbox
        yield GaugeMetricFamily(
            "ciserver_inbox_queue_oldest_age_seconds",
            "Age of the oldest inbox message not yet processed (0 = none).",
            value=st.age(st.inbox_oldest))
        yield GaugeMetricFamily(
            "ciserver_inbox_failed_messages",
            "Inbox messages whose processing failed (see `ciserver inbox list --status "
            "failed`; `ciserver inbox retry`).", value=float(st.inbox.get("failed", 0)))


class _LocalCollector(Collector):
    """This process's counters (when the daemon has no worker processes)."""

    def collect(self) -> Iterator[Metric]:
        for metric in _get().all():
            yield from metric.collect()


_PROCESS = ProcessCollector(registry=None)


async def exposition(engine: AsyncEngine, now: datetime) -> bytes:
    """The /metrics body: counters of every process of this daemon, the daemon's process
    metrics, and the queue gauges read from the database now."""
    try:
        state: QueueState | None = await queue_state(engine, now)
    except Exception as exc:  # the counters are still worth serving
        log.warning("metrics: the database did not answer: %s: %s", type(exc).__name__, exc)
        state = None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_QueueCollector(state))
    _get()  # the zero-valued series exist from the start
    if _directory is not None:
        MultiProcessCollector(registry, path=str(_directory))  # type: ignore[no-untyped-call]
    else:
        registry.register(_LocalCollector())
    registry.register(_PROCESS)
    return generate_latest(registry)
