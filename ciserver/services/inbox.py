"""The durable inbox: raw mail is committed here before anybody says "250", then processed.

Processing runs each message in its own transaction. A message that raises is rolled back,
marked ``failed`` with its error and kept for ``ciserver inbox retry``; the processor goes on
with the next one. Statuses: new -> processing -> done | ignored | rejected | quarantined |
failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .. import metrics
from ..addresses import Kind
from ..itip.mime import extract
from ..itip.parse import ItipError
from ..store.models import Answer, Event, InboxMessage, Subscription
from ..store.sqlite_inbox import SqliteInboxWriter
from . import attendee, organizer
from . import batch as batches
from .batch import Batch
from .context import Services
from .outcome import Outcome

log = logging.getLogger("ciserver.inbox")
CLAIM_TIMEOUT = timedelta(minutes=5)
# A message is claimed at most this many times. Its claim expires only when the worker died,
# hung or lost the store while processing it (a message that raises is marked failed at
# once). Without a bound a poison message was claimed again after every restart and froze
# each new worker; after MAX_ATTEMPTS it is set aside as failed for `ciserver inbox retry`.
MAX_ATTEMPTS = 3
GATHER_BELOW = 50
GATHER_DELAY = 0.05


_INBOX = cast(Table, InboxMessage.__table__)


class GroupCommit:
    """Commits the messages of concurrent SMTP sessions together.

    Each caller still waits for *its* message to be committed before it answers 250; while
    one commit is on its way to the disk, the messages arriving meanwhile gather into the next
    one. Measured with bench/inbound: one transaction per message capped ingest at about 140
    messages/s on SQLite; grouped, the commit stops being the limit.
    """

    MAX_BATCH = 200

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.pending: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
        self.task: asyncio.Task[None] | None = None
        url = svc.engine.url
        self.sqlite = (SqliteInboxWriter(url.database) if svc.dialect == "sqlite"
                       and url.database and url.database != ":memory:" else None)

    def close(self) -> None:
        if self.sqlite is not None:
            self.sqlite.close()

    async def submit(self, row: dict[str, Any]) -> int:
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.pending.append((row, future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await future

    async def _insert(self, rows: list[dict[str, Any]]) -> list[int]:
        if self.sqlite is not None:
            return await self.sqlite.write(rows)
        async with self.svc.engine.begin() as conn:
            result = await conn.execute(
                insert(_INBOX).returning(_INBOX.c.id, sort_by_parameter_order=True), rows)
            return [r[0] for r in result.all()]

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = (self.pending[:self.MAX_BATCH],
                                   self.pending[self.MAX_BATCH:])
            try:
                ids = await self._insert([row for row, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), inbox_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(inbox_id)
            self.svc.wake_inbox()


async def accept(svc: Services, raw: bytes, mail_from: str, rcpts: list[str], *,
                 source: str = "smtp", peer: str = "", message_id: str = "") -> int:
    """Store a message durably; returns its inbox id once it is committed. Raises if the
    store is unavailable (the SMTP edge then answers 451)."""
    row = {"received_at": svc.now(), "source": source, "peer": peer[:100],
           "mail_from": mail_from[:400], "rcpt_to": "\n".join(rcpts),
           "message_id": message_id[:400], "size": len(raw), "raw": raw, "status": "new",
           "attempts": 0, "result": "", "error": ""}
    if svc.group_commit is None:
        svc.group_commit = GroupCommit(svc)
    batcher: GroupCommit = svc.group_commit
    inbox_id = await batcher.submit(row)
    metrics.inbound_received(source)
    return inbox_id


Row = tuple[int, bytes, str, str, datetime]  # id, raw, mail_from, rcpt_to, received_at


async def claim_rows(svc: Services, limit: int = 200) -> list[Row]:
    """Take up to ``limit`` due messages, with their content, in one statement (UPDATE ...
    RETURNING over a SKIP LOCKED selection: instances never take the same message).

    A message whose claim expired is first set aside if it had MAX_ATTEMPTS already, and
    is otherwise claimed again *alone*: whatever killed its batch may be this message, and
    its batchmates must not share its attempts."""
    now = svc.now()
    expired = and_(_INBOX.c.status == "processing", _INBOX.c.claimed_until < now)
    async with svc.engine.begin() as conn:
        poisoned = (select(_INBOX.c.id).where(expired, _INBOX.c.attempts >= MAX_ATTEMPTS)
                    .with_for_update(skip_locked=True))
        set_aside = (await conn.execute(
            update(_INBOX).where(_INBOX.c.id.in_(poisoned.scalar_subquery()))
            .values(status="failed", processed_at=now, claimed_until=None,
                    error=f"set aside after {MAX_ATTEMPTS} attempts: each time the claim "
                          "expired before processing finished (the worker died, hung or "
                          "lost the store while processing this message); "
                          "`ciserver inbox retry` tries it again")
            .returning(_INBOX.c.id))).scalars().all()
        for inbox_id in set_aside:
            log.warning("inbox %s failed: set aside after %d expired claims", inbox_id,
                        MAX_ATTEMPTS)
        rows = (await conn.execute(_claim(expired, 1, now))).all()
        if not rows:
            rows = (await conn.execute(_claim(_INBOX.c.status == "new", limit, now))).all()
    if set_aside:
        metrics.inbound_processed(None, ["failed"] * len(set_aside))
    return sorted((tuple(r) for r in rows), key=lambda r: r[0])


def _claim(due: Any, limit: int, now: datetime) -> Any:
    chosen = (select(_INBOX.c.id).where(due).order_by(_INBOX.c.id).limit(limit)
              .with_for_update(skip_locked=True))
    return (update(_INBOX).where(_INBOX.c.id.in_(chosen.scalar_subquery()))
            .values(status="processing", claimed_until=now + CLAIM_TIMEOUT,
                    attempts=_INBOX.c.attempts + 1)
            .returning(_INBOX.c.id, _INBOX.c.raw, _INBOX.c.mail_from, _INBOX.c.rcpt_to,
                       _INBOX.c.received_at))


async def claim(svc: Services, limit: int = 200) -> list[int]:
    return [r[0] for r in await claim_rows(svc, limit)]


@dataclass(frozen=True)
class Prepared:
    """A claimed message, parsed before any transaction starts: parsing is the CPU-heavy
    part, and SQLite has one writer, so it must not happen while the store is locked."""

    inbox_id: int
    rcpt_to: str
    msg: organizer.Incoming


def prepare(inbox_id: int, raw: bytes, mail_from: str, rcpt_to: str,
            received_at: datetime) -> Prepared:
    msg = organizer.Incoming(inbox_id=inbox_id, raw=raw, mail_from=mail_from,
                             received_at=received_at, ex=extract(raw))
    with contextlib.suppress(ItipError):
        msg.objects()  # cached; a handler that needs them raises the error again
    return Prepared(inbox_id, rcpt_to, msg)


async def _apply(svc: Services, session: AsyncSession, item: Prepared) -> list[Outcome]:
    outcomes: list[Outcome] = []
    seen: set[str] = set()
    for rcpt_addr in item.rcpt_to.split("\n"):
        rcpt = svc.book.parse(rcpt_addr)
        if rcpt is None or rcpt_addr.lower() in seen:
            continue
        seen.add(rcpt_addr.lower())
        if rcpt.kind is Kind.CREATE:
            outcomes += await organizer.handle(svc, session, item.msg)
        else:
            outcomes += await attendee.handle(svc, session, item.msg, rcpt)
    return outcomes


def _finished(inbox_id: int, outcomes: list[Outcome], now: datetime) -> dict[str, Any]:
    return {"id": inbox_id, "status": Outcome.worst(outcomes),
            "result": "\n".join(o.text for o in outcomes)[:10000] or "nothing to do",
            "error": "", "processed_at": now, "claimed_until": None}


async def _preload(svc: Services, session: AsyncSession, items: Sequence[Prepared]) -> None:
    """Load the subscriptions, events and answers a batch will touch, in three queries:
    the handlers then find them in the session instead of asking the database each time."""
    sub_ids: set[int] = set()
    for item in items:
        for addr in item.rcpt_to.split("\n"):
            rcpt = svc.book.parse(addr)
            if rcpt is not None and rcpt.kind is not Kind.CREATE:
                sub_ids.add(rcpt.subscription_id)
    if not sub_ids:
        return
    subs = (await session.execute(
        select(Subscription).where(Subscription.id.in_(sub_ids)))).scalars().all()
    event_ids = {s.event_id for s in subs}
    evs = (await session.execute(select(Event).where(Event.id.in_(event_ids)))).scalars().all()
    answers = (await session.execute(
        select(Answer).where(Answer.subscription_id.in_(sub_ids)))).scalars().all()
    session.info["batch"] = Batch(
        answers={(a.subscription_id, a.occurrence): a for a in answers}, answers_for=sub_ids)
    # The identity map holds objects weakly: keep them alive for the batch.
    session.info["preloaded"] = [*subs, *evs, *answers]


async def _prepare_rows(rows: Sequence[Row]) -> list[Prepared]:
    items = []
    for inbox_id, raw, mail_from, rcpt_to, received_at in rows:
        items.append(prepare(inbox_id, raw, mail_from, rcpt_to, received_at))
        await asyncio.sleep(0)  # let other tasks of this loop run between two parses
    return items


async def _load(svc: Services, ids: list[int]) -> list[Prepared]:
    async with svc.engine.connect() as conn:
        rows = (await conn.execute(
            select(_INBOX.c.id, _INBOX.c.raw, _INBOX.c.mail_from, _INBOX.c.rcpt_to,
                   _INBOX.c.received_at).where(_INBOX.c.id.in_(ids))
            .order_by(_INBOX.c.id))).all()
    return await _prepare_rows([tuple(r) for r in rows])


async def process_many(svc: Services, ids: list[int]) -> None:
    """Load and apply claimed messages (see process_items)."""
    await process_items(svc, await _load(svc, ids))


async def process_items(svc: Services, items: list[Prepared]) -> None:
    """Apply a claimed batch in one transaction (one commit for all: at high rates the
    per-message commit and lookups dominate, see bench/inbound). If any message raises,
    the batch is rolled back and each message is processed on its own, so a bad one only
    fails itself."""
    ids = [item.inbox_id for item in items]
    if len(items) <= 1:
        for inbox_id in ids:
            await process(svc, inbox_id)
        return
    now = svc.now()
    try:
        async with svc.sessions.begin() as session:
            await _preload(svc, session, items)
            results = [_finished(item.inbox_id, await _apply(svc, session, item), now)
                       for item in items]
            batch = batches.of(session)
            if batch is not None:
                await batch.write(session)
            await session.execute(update(InboxMessage), results)
    except Exception as exc:
        log.info("batch of %d messages fell back to one by one (%s: %s)", len(ids),
                 type(exc).__name__, exc)
        for inbox_id in ids:
            await process(svc, inbox_id)
        return
    metrics.inbound_processed(session, [r["status"] for r in results])
    for item, r in zip(items, results, strict=True):
        log.info("inbox %s %s message-id=%s: %s", r["id"], r["status"],
                 _mid(item), str(r["result"]).replace("\n", "; "))


async def process(svc: Services, inbox_id: int) -> str:
    """Apply one message; returns its final status. Never raises for a bad message."""
    now = svc.now()
    items: list[Prepared] = []
    try:
        items = await _load(svc, [inbox_id])
        if not items:
            return "missing"
        async with svc.sessions.begin() as session:
            result = _finished(inbox_id, await _apply(svc, session, items[0]), now)
            await session.execute(update(InboxMessage), [result])
    except ItipError as exc:
        error = str(exc)
    except Exception as exc:  # a bad message must never stop the processor
        log.exception("inbox message %s failed", inbox_id)
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"
    else:
        metrics.inbound_processed(session, [result["status"]])
        log.info("inbox %s %s message-id=%s: %s", inbox_id, result["status"], _mid(items[0]),
                 str(result["result"]).replace("\n", "; "))
        return str(result["status"])
    async with svc.sessions.begin() as session:
        await session.execute(
            update(InboxMessage).where(InboxMessage.id == inbox_id)
            .values(status="failed", error=error[:10000], processed_at=now, claimed_until=None))
    metrics.inbound_processed(None, ["failed"])
    log.warning("inbox %s failed message-id=%s: %s", inbox_id,
                _mid(items[0]) if items else "(unknown)", error.splitlines()[0] if error else "")
    return "failed"


def _mid(item: Prepared) -> str:
    """The message's Message-ID for a log line (one line, never empty)."""
    return " ".join(item.msg.ex.message_id.split())[:200] or "(none)"


async def run(svc: Services, stop: asyncio.Event, poll: float = 2.0) -> None:
    """The processor loop: woken by new mail, and polling for other instances' mail."""
    while not stop.is_set():
        try:
            rows = await claim_rows(svc)
        except Exception:
            log.exception("inbox claim failed; retrying")
            rows = []
            await asyncio.sleep(poll)
        try:
            await process_items(svc, await _prepare_rows(rows))
        except Exception:  # the store itself failed; the claims expire and are retried
            log.exception("inbox messages %s could not be recorded", [r[0] for r in rows])
            await asyncio.sleep(poll)
        if len(rows) >= GATHER_BELOW:
            continue
        if rows:
            # A small batch under steady load: let a few more messages arrive. Per-batch
            # costs (claim, preload, commit) dominate small batches (bench/inbound); 50 ms
            # of extra delay buys batches several times larger.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), GATHER_DELAY)
            continue
        svc.inbox_ready.clear()
        waiter = asyncio.ensure_future(svc.inbox_ready.wait())
        stopper = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiter, stopper}, timeout=poll, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        stopper.cancel()


async def drain(svc: Services) -> int:
    """Process everything that is waiting (tests, CLI retry). Returns how many."""
    count = 0
    while rows := await claim_rows(svc):
        await process_items(svc, await _prepare_rows(rows))
        count += len(rows)
    return count


async def listing(svc: Services, status: str | None = None,
                  limit: int = 50) -> Sequence[InboxMessage]:
    async with svc.sessions() as session:
        q = select(InboxMessage).order_by(InboxMessage.id.desc()).limit(limit)
        if status:
            q = q.where(InboxMessage.status == status)
        return (await session.execute(q)).scalars().all()


async def get(svc: Services, inbox_id: int) -> InboxMessage | None:
    async with svc.sessions() as session:
        return await session.get(InboxMessage, inbox_id)


async def retry(svc: Services, ids: list[int] | None = None,
                status: str = "failed") -> int:
    """Put messages back to ``new`` (all with ``status`` when no ids are given)."""
    async with svc.sessions.begin() as session:
        q = update(InboxMessage).values(status="new", claimed_until=None)
        q = q.where(InboxMessage.id.in_(ids)) if ids else q.where(InboxMessage.status == status)
        result = await session.execute(q)
    svc.wake_inbox()
    return int(getattr(result, "rowcount", 0) or 0)
