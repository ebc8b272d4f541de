"""Reports by mail on a schedule ([reports] in the configuration): an event's final report
once it has ended (``after_event``), and a daily digest per organizer (``daily_digest``).

Every instance of the daemon runs the schedule. A mail is claimed in the database in the
same transaction that puts it in the outbox: ``UPDATE events SET report_sent_at = now WHERE
id = … AND report_sent_at IS NULL`` for a final report, the organizer's row in ``digests``
(``UPDATE … WHERE last_sent_at < slot``, or an ``INSERT … ON CONFLICT DO NOTHING``) for a
digest. On PostgreSQL a second instance's claim waits for the first one's row lock and then
matches no row; on SQLite writers queue on the database lock. Either way one mail goes out,
or none if the transaction fails (the next check tries again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..store.models import Digest, Event, RsvpHistory, Subscription
from . import reports
from .context import Services

log = logging.getLogger("ciserver.reports")

# Events that ended longer ago than this get no final report: turning ``after_event`` on
# for an old installation does not mail its whole past.
FINAL_REPORT_WINDOW = timedelta(days=7)
# A digest covers the organizer's events that have not ended, or ended within this time.
DIGEST_RECENT = timedelta(days=1)


async def run(svc: Services, stop: asyncio.Event, poll: float | None = None) -> None:
    """The daemon's task: check every ``[reports] poll_interval`` seconds until ``stop``.
    The settings are read again on every round, so a reload (SIGHUP) that turns a schedule
    on or off, or changes its hour or interval, takes effect without a restart."""
    while not stop.is_set():
        cfg = svc.config.reports
        if cfg.after_event or cfg.daily_digest:
            try:
                await tick(svc)
            except Exception:  # the next check tries again; the daemon goes on
                log.exception("reports schedule: check failed")
        interval = poll if poll is not None else float(cfg.poll_interval)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def tick(svc: Services) -> int:
    """One check: queue every report that is due now; returns how many mails were queued."""
    cfg = svc.config.reports
    sent = 0
    if cfg.after_event:
        sent += await send_final_reports(svc)
    if cfg.daily_digest:
        sent += await send_digests(svc)
    return sent


def _rowcount(result: Any) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


# --------------------------------------------------------------------------------------------
# After each event


async def due_final_reports(svc: Services, limit: int = 100) -> list[tuple[int, str, str, str]]:
    """(id, organizer, API id, summary) of ended events whose final report is not sent."""
    now = svc.now()
    cutoff = now - timedelta(seconds=svc.config.reports.after_event_delay)
    async with svc.sessions() as session:
        rows = await session.execute(
            select(Event.id, Event.organizer_email, Event.public_id, Event.summary)
            .where(Event.report_sent_at.is_(None), Event.status == "confirmed",
                   Event.rsvp_until <= cutoff, Event.rsvp_until > cutoff - FINAL_REPORT_WINDOW)
            .order_by(Event.rsvp_until, Event.id).limit(limit))
        return [(r[0], r[1], r[2], r[3]) for r in rows]


async def send_final_reports(svc: Services) -> int:
    sent = 0
    for event_id, organizer, public_id, summary in await due_final_reports(svc):
        mail = await reports.prepare_mail(
            svc, to=organizer, title=f"{summary} (final)", event_id=event_id,
            bom=svc.config.reports.attachment_bom, filename=f"{public_id}.csv",
            extra="The event has ended: this is its final report. Answers that arrive from "
                  "now on are kept in the history, flagged late, and change nothing here.")
        if await claim_final_report(svc, event_id, mail):
            sent += 1
            log.info("mailed the final report of event %s to %s", public_id, organizer)
    return sent


async def claim_final_report(svc: Services, event_id: int, mail: reports.PreparedMail) -> bool:
    """Mark the event reported and queue its mail, in one transaction; False if another
    instance was first."""
    async with svc.sessions.begin() as session:
        res = await session.execute(
            update(Event).where(Event.id == event_id, Event.report_sent_at.is_(None))
            .values(report_sent_at=svc.now()))
        if _rowcount(res) != 1:
            return False
        await reports.queue_mail(svc, session, mail)
        return True


# --------------------------------------------------------------------------------------------
# Daily digest


def digest_slot(now: datetime, hour: int) -> datetime:
    """The latest time of day ``hour``:00 UTC that is not after ``now``."""
    slot = now.replace(hour=hour, minute=0, second=0, microsecond=0)
    return slot if slot <= now else slot - timedelta(days=1)


@dataclass(frozen=True)
class DueDigest:
    organizer: str
    last_sent_at: datetime | None
    event_ids: tuple[int, ...]


def _current(now: datetime) -> Any:
    return (Event.status == "confirmed") & (Event.rsvp_until >= now - DIGEST_RECENT)


async def due_digests(svc: Services) -> list[DueDigest]:
    now = svc.now()
    slot = digest_slot(now, svc.config.reports.digest_hour)
    async with svc.sessions() as session:
        organizers = (await session.execute(
            select(Event.organizer_email, Digest.last_sent_at)
            .outerjoin(Digest, Digest.organizer_email == Event.organizer_email)
            .where(_current(now), or_(Digest.last_sent_at.is_(None),
                                      Digest.last_sent_at < slot))
            .group_by(Event.organizer_email, Digest.last_sent_at)
            .order_by(Event.organizer_email))).all()
        out = []
        for organizer, last in organizers:
            ids = (await session.execute(
                select(Event.id).where(_current(now), Event.organizer_email == organizer)
                .order_by(Event.start_at, Event.id))).scalars().all()
            out.append(DueDigest(organizer, last, tuple(ids)))
        return out


async def _changes_since(session: AsyncSession, ids: tuple[int, ...],
                         since: datetime | None) -> tuple[int, int]:
    """(new subscriptions, answers received) for these events since ``since``."""
    if since is None or not ids:
        return 0, 0
    subs = await session.execute(select(func.count()).select_from(Subscription).where(
        Subscription.event_id.in_(ids), Subscription.created_at > since))
    answers = await session.execute(
        select(func.count()).select_from(RsvpHistory)
        .join(Subscription, Subscription.id == RsvpHistory.subscription_id)
        .where(Subscription.event_id.in_(ids), RsvpHistory.received_at > since))
    return int(subs.scalar_one()), int(answers.scalar_one())


async def send_digests(svc: Services) -> int:
    sent = 0
    now = svc.now()
    for due in await due_digests(svc):
        async with svc.sessions() as session:
            subs, answers = await _changes_since(session, due.event_ids, due.last_sent_at)
        extra = (f"Since the last digest ({due.last_sent_at:%Y-%m-%d %H:%M} UTC): "
                 f"{subs} new invite(s), {answers} answer(s) received."
                 if due.last_sent_at is not None else "")
        mail = await reports.prepare_mail(
            svc, to=due.organizer, title=f"daily digest {now:%Y-%m-%d}",
            event_ids=due.event_ids, bom=svc.config.reports.attachment_bom,
            extra=extra, filename=f"digest-{now:%Y-%m-%d}.csv")
        if await claim_digest(svc, due.organizer, mail):
            sent += 1
            log.info("mailed the daily digest to %s", due.organizer)
    return sent


async def claim_digest(svc: Services, organizer: str, mail: reports.PreparedMail) -> bool:
    now = svc.now()
    slot = digest_slot(now, svc.config.reports.digest_hour)
    async with svc.sessions.begin() as session:
        res = await session.execute(
            update(Digest).where(Digest.organizer_email == organizer,
                                 Digest.last_sent_at < slot).values(last_sent_at=now))
        if _rowcount(res) != 1:
            res = await session.execute(_insert_digest(svc, organizer, now))
            if _rowcount(res) != 1:
                return False
        await reports.queue_mail(svc, session, mail)
        return True


def _insert_digest(svc: Services, organizer: str, now: datetime) -> Any:
    if svc.dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(Digest).values(organizer_email=organizer, last_sent_at=now)\
            .on_conflict_do_nothing(index_elements=[Digest.organizer_email])
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(Digest).values(organizer_email=organizer, last_sent_at=now)\
        .on_conflict_do_nothing(index_elements=[Digest.organizer_email])
