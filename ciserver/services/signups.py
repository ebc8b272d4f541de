"""Public sign-ups (invite buttons, the public invite API) committed together.

A customer asking for an invite is one subscription and one queued invite. Done one request
per transaction, that is six round trips to the database and a commit each, one request at a
time on SQLite's single connection: bench/web measured about 60 requests/s. Here the
requests that arrive while a batch is on its way to the disk gather into the next one, which
resolves their events, finds the addresses already subscribed, and inserts the new
subscriptions and their invites with a handful of statements whatever the batch size: by
hand with the sqlite3 module in a thread on SQLite (store/sqlite_signups.py: one statement
when every address is new), through SQLAlchemy on PostgreSQL. Each caller still waits until
*its* sign-up is committed.

The outcome of every request is what :func:`subscriptions.invite` would give it alone:
addresses already subscribed (or stopped, which asking again re-activates) take that path;
an unknown or cancelled event fails that request only; if a batch's transaction fails, its
requests are retried one by one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, cast

from sqlalchemy import Table, insert, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..itip.build import header_safe
from ..store import sqlite_signups
from ..store.models import Event, OutboxItem, Subscription
from ..store.sqlite_signups import SqliteSignupWriter
from . import events, subscriptions
from .context import Services

log = logging.getLogger("ciserver.signups")

_SUBS = cast(Table, Subscription.__table__)
_OUTBOX = cast(Table, OutboxItem.__table__)


# NamedTuples, not frozen dataclasses: one of each per public request, and a frozen
# dataclass's __init__ costs several times a tuple's (bench/web).
class Signup(NamedTuple):
    refs: Sequence[str]  # API ids (or UIDs) of the events, in the order asked
    email: str  # checked by subscriptions.check_email
    name: str = ""
    source: str = "page"
    origin: str = ""


class SignedUp(NamedTuple):
    events: list[str]  # API ids
    queued: bool  # an invite was queued for at least one event (else: all already had it)


class Limited(Exception):
    """The per-event rate limit refused the request; ``wait`` seconds until it would not."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"rate limited for {wait:.0f} s")
        self.wait = wait


Outcome = SignedUp | Exception


class SignupBatcher:
    MAX_BATCH = 500

    def __init__(self, svc: Services,
                 event_limit: Callable[[Sequence[str]], float] | None = None) -> None:
        """``event_limit(public_ids)`` records a hit for each event of an accepted request
        and returns 0, or the seconds to wait when one of them is spent."""
        self.svc = svc
        self.event_limit = event_limit
        self.pending: list[tuple[Signup, asyncio.Future[SignedUp]]] = []
        self.task: asyncio.Task[None] | None = None
        url = svc.engine.url
        self.sqlite = (SqliteSignupWriter(url.database) if svc.dialect == "sqlite"
                       and url.database and url.database != ":memory:"
                       and sqlite_signups.available() else None)
        # ref -> (row id, API id): what a reference names never changes (events are cancelled,
        # not deleted); whether the event is still open is read in each batch's transaction.
        self.refs: dict[str, tuple[int, str]] = {}

    async def submit(self, signup: Signup) -> SignedUp:
        future: asyncio.Future[SignedUp] = asyncio.get_running_loop().create_future()
        self.pending.append((signup, future))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = (self.pending[:self.MAX_BATCH],
                                   self.pending[self.MAX_BATCH:])
            signups = [s for s, _ in batch]
            try:
                outcomes = await (self._apply_sqlite(signups) if self.sqlite is not None
                                  else self._apply(signups))
            except Exception:
                log.warning("a batch of %d sign-ups failed; retrying them one by one",
                            len(batch), exc_info=True)
                outcomes = [await self._one(s) for s in signups]
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # the client went away
                    continue
                if isinstance(outcome, Exception):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
            self.svc.wake_outbox()

    # ----------------------------------------------------------------------------------------

    def _check(self, signup: Signup, targets: list[Event], limited: bool = False
               ) -> Exception | None:
        closed = next((e for e in targets if e.status == "cancelled"), None)
        if closed is not None:
            return subscriptions.EventClosed(f"event {closed.public_id} is cancelled")
        now = self.svc.now()
        over = next((e for e in targets if max(e.end_at, e.rsvp_until) < now), None)
        if over is not None:
            return subscriptions.EventClosed(f"event {over.public_id} is over")
        if self.event_limit is not None and not limited:
            wait = self.event_limit([e.public_id for e in targets])
            if wait:
                return Limited(wait)
        return None

    async def _one(self, signup: Signup, limited: bool = False) -> Outcome:
        """A request alone, the way subscriptions.invite does it (``limited``: its hits on
        the per-event limits are counted already)."""
        try:
            async with self.svc.sessions.begin() as session:
                targets = _unique([await events.find(session, ref) for ref in signup.refs])
                problem = self._check(signup, targets, limited)
                if problem is not None:
                    return problem
                queued = False
                for event in targets:
                    result = await subscriptions.invite(
                        self.svc, session, event, signup.email, signup.name, signup.source,
                        origin=signup.origin)
                    queued = queued or result.queued
                return SignedUp([e.public_id for e in targets], queued)
        except Exception as exc:
            return exc

    async def _apply_sqlite(self, batch: list[Signup]) -> list[Outcome]:
        assert self.sqlite is not None
        missing = {r for s in batch for r in s.refs if r not in self.refs}
        if missing:
            async with self.svc.sessions() as session:
                for ref, event in (await self._resolve(session, missing)).items():
                    self.refs[ref] = (event.id, event.public_id)
                    if len(self.refs) > 100_000:  # a bound; unknown refs are not kept
                        self.refs.clear()
        outcomes: list[Outcome | None] = [None] * len(batch)
        items: list[sqlite_signups.Item] = []
        planned: list[tuple[int, list[str]]] = []
        for i, signup in enumerate(batch):
            unknown = next((r for r in signup.refs if r not in self.refs), None)
            if unknown is not None:
                outcomes[i] = events.NotFound(f"no event {unknown!r}")
                continue
            # (row id, API id) of each event; one named twice ("abc" and "ABC", an id and its
            # UID) is one sign-up
            named = list(dict.fromkeys(self.refs[r] for r in signup.refs))
            if self.event_limit is not None:
                wait = self.event_limit([public_id for _, public_id in named])
                if wait:
                    outcomes[i] = Limited(wait)
                    continue
            items.append(sqlite_signups.Item(
                [row_id for row_id, _ in named], signup.email,
                header_safe(signup.name or "", 200), signup.source,
                header_safe(signup.origin, 200)))
            planned.append((i, [public_id for _, public_id in named]))
        if items:
            public = dict(self.refs.values())
            try:
                results = await self.sqlite.write(items, self.svc.now())
            except Exception:
                # The requests refused above keep their answers; the planned ones are done
                # one by one, their per-event limits counted already.
                log.warning("a batch of %d sign-ups failed; retrying them one by one",
                            len(items), exc_info=True)
                for i, _ in planned:
                    outcomes[i] = await self._one(batch[i], limited=True)
                return _complete(outcomes)
            for (i, public_ids), (kind, row_id) in zip(planned, results, strict=True):
                signup = batch[i]
                if kind == "ok":
                    outcomes[i] = SignedUp(public_ids, True)
                elif kind in ("closed", "over"):
                    outcomes[i] = subscriptions.EventClosed(
                        f"event {public.get(row_id, row_id)} is "
                        f"{'cancelled' if kind == 'closed' else 'over'}")
                elif kind == "missing":
                    outcomes[i] = events.NotFound(f"no event {public.get(row_id, row_id)!r}")
                else:  # subscribed before (or twice in this batch): the ORM path decides
                    outcomes[i] = await self._one(signup, limited=True)
        return _complete(outcomes)

    async def _resolve(self, session: AsyncSession, refs: set[str]) -> dict[str, Event]:
        """ref -> event, as events.find() resolves each (API id, UID, organizer's UID)."""
        clean = {r.strip() for r in refs if r.strip() and "\x00" not in r and len(r) <= 1000}
        if not clean:
            return {}
        rows = (await session.execute(select(Event).where(or_(
            Event.public_id.in_({r.lower() for r in clean}), Event.uid.in_(clean),
            Event.organizer_uid.in_(clean))).order_by(Event.id))).scalars().all()
        found: dict[str, Event] = {}
        for ref in refs:
            r = ref.strip()
            found_one = next((e for e in rows if e.public_id == r.lower() or e.uid == r
                              or e.organizer_uid == r), None)
            if found_one is not None:
                found[ref] = found_one
        return found

    async def _apply(self, batch: list[Signup]) -> list[Outcome]:
        svc = self.svc
        outcomes: list[Outcome | None] = [None] * len(batch)
        async with svc.sessions.begin() as session:
            found = await self._resolve(session, {r for s in batch for r in s.refs})
            plan: list[tuple[int, list[Event]]] = []
            for i, signup in enumerate(batch):
                missing = next((r for r in signup.refs if r not in found), None)
                if missing is not None:
                    outcomes[i] = events.NotFound(f"no event {missing!r}")
                    continue
                targets = _unique([found[r] for r in signup.refs])
                problem = self._check(signup, targets)
                if problem is not None:
                    outcomes[i] = problem
                else:
                    plan.append((i, targets))
            if not plan:
                return _complete(outcomes)

            event_ids = {e.id for _, targets in plan for e in targets}
            emails = {batch[i].email for i, _ in plan}
            existing = set((await session.execute(
                select(Subscription.event_id, Subscription.email).where(
                    Subscription.event_id.in_(event_ids), Subscription.email.in_(emails))
            )).all())

            now = svc.now()
            new_rows: list[dict[str, Any]] = []
            new_events: list[Event] = []
            taken: set[tuple[int, str]] = set()
            for i, targets in plan:
                signup = batch[i]
                queued = False
                for event in targets:
                    key = (event.id, signup.email)
                    if key in existing:  # subscribed before: asking again, or re-activating
                        result = await subscriptions.invite(
                            svc, session, event, signup.email, signup.name, signup.source,
                            origin=signup.origin)
                        queued = queued or result.queued
                    elif key not in taken:
                        taken.add(key)
                        new_rows.append({
                            "event_id": event.id, "email": signup.email,
                            "domain": signup.email.rpartition("@")[2],
                            "name": header_safe(signup.name or "", 200), "status": "active",
                            "source": signup.source, "origin": signup.origin[:200],
                            "forwarded_by": None, "partstat": "NEEDS-ACTION",
                            "soft_bounces": 0, "created_at": now, "updated_at": now})
                        new_events.append(event)
                        queued = True
                outcomes[i] = SignedUp([e.public_id for e in targets], queued)

            if new_rows:
                ids = (await session.execute(
                    insert(_SUBS).returning(_SUBS.c.id, sort_by_parameter_order=True),
                    new_rows)).scalars().all()
                await session.execute(insert(_OUTBOX), [
                    {"kind": "invite", "subscription_id": sub_id,
                     "wanted_sequence": event.sequence, "rcpt_to": row["email"],
                     "rcpt_domain": row["domain"], "state": "pending", "attempts": 0,
                     "queued_at": now, "next_attempt_at": now, "updated_at": now,
                     "mail_from": "", "last_response": ""}
                    for sub_id, row, event in zip(ids, new_rows, new_events, strict=True)])
        return _complete(outcomes)


def _unique(targets: list[Event]) -> list[Event]:
    """Each event once, in the order first named."""
    return list({event.id: event for event in targets}.values())


def _complete(outcomes: list[Outcome | None]) -> list[Outcome]:
    return [o if o is not None else RuntimeError("sign-up not processed") for o in outcomes]
