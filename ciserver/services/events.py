"""Events: creation, edits and cancellation, whoever makes them (calendar mail or API).

Every change customers must see raises the server-owned SEQUENCE, is written down in
event_versions and queues the new version for every active subscriber, in one transaction.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..addresses import domain_of, normalize_email
from ..itip import content as content_mod
from ..store.models import Event, EventVersion
from . import outbox
from .context import Services


class NotFound(LookupError):
    pass


class Ambiguous(LookupError):
    """An organizer's UID that several events share (co-organizers, each with their own
    event): ``candidates`` are those events, by creation."""

    def __init__(self, ref: str, candidates: Sequence[Event], more: bool = False) -> None:
        self.ref, self.candidates, self.more = ref, list(candidates), more
        self.matches = (f"more than {len(candidates)}" if more else str(len(candidates)))
        super().__init__(f"{ref!r} matches {self.matches} events: give the API id of one")


def public_id_for(secret: bytes, organizer: str, organizer_uid: str) -> str:
    """Stable API id, also the local part of the UID customers see: derived from the
    organizer's own UID, so re-sent invites map to the same event, yet different from it
    (an organizer can subscribe to their own page without a UID clash)."""
    digest = hmac.new(secret, f"event:{organizer}\0{organizer_uid}".encode(),
                      hashlib.sha256).digest()
    return base64.b32encode(digest[:10]).decode().lower()


def _apply_summary(event: Event, content: str) -> None:
    s = content_mod.summarize(content)
    event.content = content
    event.summary, event.location, event.description = s.summary, s.location, s.description
    event.start_at, event.end_at, event.tzid = s.start, s.end, s.tzid
    event.all_day, event.recurring, event.rsvp_until = s.all_day, s.recurring, s.rsvp_until


async def create(svc: Services, session: AsyncSession, *, organizer: str, organizer_name: str,
                 organizer_uid: str, content: str, origin: str, organizer_sequence: int = 0,
                 organizer_dtstamp: datetime | None = None, inbox_id: int | None = None) -> Event:
    now = svc.now()
    organizer = normalize_email(organizer)
    pid = public_id_for(svc.book.secret, organizer, organizer_uid)
    event = Event(
        public_id=pid, uid=f"{pid}@{svc.book.domain}", organizer_uid=organizer_uid,
        organizer_email=organizer, organizer_domain=domain_of(organizer),
        organizer_name=organizer_name, origin=origin, organizer_sequence=organizer_sequence,
        organizer_dtstamp=organizer_dtstamp, sequence=0, status="confirmed", created_at=now,
        updated_at=now)
    _apply_summary(event, content)
    session.add(event)
    await session.flush()
    session.add(EventVersion(event_id=event.id, sequence=0, changes="created", origin=origin,
                             inbox_id=inbox_id, created_at=now))
    return event


async def change(svc: Services, session: AsyncSession, event: Event, new_content: str, *,
                 origin: str, status: str | None = None, inbox_id: int | None = None) -> list[str]:
    """Apply new content (and status); fan out if customers would see a difference."""
    changes = content_mod.visible_changes(event.content, new_content)
    if status is not None and status != event.status:
        changes.append("STATUS")
        event.status = status
    if not changes:
        return []
    now = svc.now()
    _apply_summary(event, new_content)
    event.sequence += 1
    event.updated_at = now
    session.add(EventVersion(event_id=event.id, sequence=event.sequence,
                             changes=",".join(sorted(set(changes))), origin=origin,
                             inbox_id=inbox_id, created_at=now))
    await session.flush()
    await outbox.enqueue_event(svc, session, event)
    return changes


async def cancel(svc: Services, session: AsyncSession, event: Event, *, origin: str,
                 inbox_id: int | None = None) -> bool:
    if event.status == "cancelled":
        return False
    await change(svc, session, event, event.content, origin=origin, status="cancelled",
                 inbox_id=inbox_id)
    return True


async def create_via_api(svc: Services, session: AsyncSession, *, organizer: str,
                         organizer_name: str, summary: str, start: datetime, end: datetime,
                         location: str = "", description: str = "") -> Event:
    content = content_mod.new_content(summary=summary, start=start, end=end, location=location,
                                      description=description)
    return await create(svc, session, organizer=organizer, organizer_name=organizer_name,
                        organizer_uid=f"{uuid.uuid4()}@{svc.book.domain}", content=content,
                        origin="api")


AMBIGUOUS_SHOWN = 20  # candidates an Ambiguous error lists at most


async def find(session: AsyncSession, ref: str, *, organizer: str | None = None,
               domain: str | None = None, unique: bool = False) -> Event:
    """An event by API id, by the UID customers see, or by the organizer's own UID.

    ``organizer`` and ``domain`` narrow the search, inside the query, to that organizer's
    or that domain's events: only (organizer, organizer's UID) is unique, co-organizers can
    share a UID. An API id or a customer-facing UID names one event whatever else matches;
    an organizer's UID that several events in scope share gives the first created, or
    raises :class:`Ambiguous` with ``unique``."""
    ref = ref.strip()
    if not ref or "\x00" in ref or len(ref) > 1000:  # PostgreSQL refuses NUL in text
        raise NotFound(f"no event {ref!r}")
    exact = or_(Event.public_id == ref.lower(), Event.uid == ref)
    q = select(Event).where(or_(exact, Event.organizer_uid == ref))
    if organizer is not None:
        q = q.where(Event.organizer_email == normalize_email(organizer))
    if domain is not None:
        q = q.where(Event.organizer_domain == domain.lower().lstrip("@"))
    rows = (await session.execute(
        q.order_by(case((exact, 0), else_=1), Event.id).limit(AMBIGUOUS_SHOWN + 1)
    )).scalars().all()
    if not rows:
        raise NotFound(f"no event {ref!r}")
    first = rows[0]
    if unique and len(rows) > 1 and first.public_id != ref.lower() and first.uid != ref:
        raise Ambiguous(ref, rows[:AMBIGUOUS_SHOWN], more=len(rows) > AMBIGUOUS_SHOWN)
    return first


_S = TypeVar("_S", bound=Select[Any])


@dataclass(frozen=True)
class EventFilter:
    """What ``GET /api/v1/events`` and ``ciserver events list`` narrow the listing by."""

    organizer: str | None = None
    domain: str | None = None
    status: str | None = None
    start_from: datetime | None = None  # start at or after
    start_to: datetime | None = None  # start before
    text: str | None = None  # in the summary or the location, case-insensitive

    def apply(self, q: _S) -> _S:
        if self.organizer is not None:
            q = q.where(Event.organizer_email == normalize_email(self.organizer))
        if self.domain is not None:
            q = q.where(Event.organizer_domain == self.domain.lower())
        if self.status is not None:
            q = q.where(Event.status == self.status)
        if self.start_from is not None:
            q = q.where(Event.start_at >= self.start_from)
        if self.start_to is not None:
            q = q.where(Event.start_at < self.start_to)
        if self.text:
            needle = self.text.lower()
            q = q.where(or_(func.lower(Event.summary).contains(needle, autoescape=True),
                            func.lower(Event.location).contains(needle, autoescape=True)))
        return q


async def listing(session: AsyncSession, *, organizer: str | None = None,
                  domain: str | None = None, limit: int = 100, offset: int = 0,
                  status: str | None = None, where: EventFilter | None = None
                  ) -> Sequence[Event]:
    """Events in a stable order: by start, then by creation (id)."""
    f = where or EventFilter(organizer=organizer, domain=domain, status=status)
    q = f.apply(select(Event)).order_by(Event.start_at, Event.id).limit(limit).offset(offset)
    return (await session.execute(q)).scalars().all()


async def listing_total(session: AsyncSession, where: EventFilter) -> int:
    q = where.apply(select(func.count(Event.id)))
    return int((await session.execute(q)).scalar_one())


async def count(session: AsyncSession) -> int:
    return int((await session.execute(select(func.count(Event.id)))).scalar_one())
