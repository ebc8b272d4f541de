"""Untrusted RRULEs cost bounded time and memory, and a message that keeps killing its worker
is set aside instead of being claimed forever.

An allowed organizer's FREQ=MINUTELY;UNTIL=99991231T000000Z once pinned the inbox worker
(every occurrence up to year 9999 was listed to find where the series ends) and, claimed
again after each restart, froze every new worker. Such a series is now created like a series
without an end: answers stay open for OPEN_SERIES_WINDOW.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from ciserver.itip import content as content_mod
from ciserver.services import inbox
from ciserver.store import models

from .conftest import DOMAIN, ORGANIZER, Pipeline, calendar_mail

CREATE = f"create@{DOMAIN}"
START = datetime(2026, 3, 5, 0, 0, tzinfo=UTC)
HANG = 20  # seconds: generous, only so that a hang fails the test instead of freezing it


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail after ``seconds`` even inside CPU-bound code, which asyncio.wait_for cannot
    interrupt (the expansion that hung never gave the event loop control back)."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def invite(rrule: str, uid: str) -> bytes:
    ical = "\r\n".join([
        "BEGIN:VCALENDAR", "VERSION:2.0", "PRODID:-//t//EN", "METHOD:REQUEST",
        "BEGIN:VEVENT", "DTSTAMP:20260201T120000Z", "DTSTART:20260305T000000Z",
        "DTEND:20260305T010000Z", "SUMMARY:Far series", f"RRULE:{rrule}", f"UID:{uid}",
        f"ORGANIZER:mailto:{ORGANIZER}", "END:VEVENT", "END:VCALENDAR", ""])
    return calendar_mail(ical, from_addr=ORGANIZER, to=CREATE)


async def created(p: Pipeline, rrule: str, uid: str) -> models.Event:
    with deadline(HANG):
        row = await asyncio.wait_for(p.deliver(CREATE, invite(rrule, uid), ORGANIZER), HANG)
    assert row.status == "done" and "created event" in row.result, (row.result, row.error)
    [event] = await p.events()
    return event  # type: ignore[no-any-return]


@pytest.mark.parametrize("rrule", ["FREQ=MINUTELY;UNTIL=99991231T000000Z",
                                   "FREQ=SECONDLY;COUNT=5000000"])
async def test_huge_series_is_created_quickly_as_open_ended(sqlite_pipeline: Pipeline,
                                                            rrule: str) -> None:
    event = await created(sqlite_pipeline, rrule, "far@team.example")
    assert event.recurring
    # More occurrences than are walked: answers stay open as for a series without an end.
    assert event.rsvp_until == START + content_mod.OPEN_SERIES_WINDOW


async def test_weekly_series_ends_at_its_last_occurrence(sqlite_pipeline: Pipeline) -> None:
    event = await created(sqlite_pipeline, "FREQ=WEEKLY;COUNT=4;BYDAY=TH", "weekly@team.example")
    assert event.rsvp_until == START + timedelta(weeks=3, hours=1)


def _content(rrule: str) -> str:
    return "\r\n".join(["BEGIN:VCALENDAR", "VERSION:2.0", "BEGIN:VEVENT", "UID:content",
                        "DTSTART:20260305T000000Z", "DTEND:20260305T010000Z",
                        f"RRULE:{rrule}", "END:VEVENT", "END:VCALENDAR", ""])


def test_dense_series_with_a_near_until_closes_at_until() -> None:
    s = content_mod.summarize(_content("FREQ=MINUTELY;UNTIL=20260312T000000Z"))
    assert s.rsvp_until == datetime(2026, 3, 12, 1, 0, tzinfo=UTC)


def test_series_just_within_the_walk_is_exact() -> None:
    n = content_mod.MAX_OCCURRENCES_WALKED
    s = content_mod.summarize(_content(f"FREQ=HOURLY;COUNT={n}"))
    assert s.rsvp_until == START + timedelta(hours=n - 1, minutes=60)


# --------------------------------------------------------------------------------------------
# Poison messages


async def _expire_claims(p: Pipeline) -> None:
    p.now += inbox.CLAIM_TIMEOUT + timedelta(seconds=1)


async def test_message_whose_claim_keeps_expiring_is_set_aside(sqlite_pipeline: Pipeline
                                                                ) -> None:
    p = sqlite_pipeline
    await p.send(CREATE, invite("FREQ=WEEKLY;COUNT=2", "poison@team.example"), ORGANIZER)
    await p.send(CREATE, invite("FREQ=WEEKLY;COUNT=2", "mate@team.example"), ORGANIZER)
    first = await inbox.claim_rows(p.svc)  # a worker takes both, then dies
    assert len(first) == 2
    poison_id, mate_id = first[0][0], first[1][0]
    await _expire_claims(p)
    # Claimed again alone: the batchmate does not share the poison message's attempts.
    assert [r[0] for r in await inbox.claim_rows(p.svc)] == [poison_id]
    assert [r[0] for r in await inbox.claim_rows(p.svc)] == [mate_id]
    await inbox.process(p.svc, mate_id)
    for _ in range(inbox.MAX_ATTEMPTS - 2):  # the worker keeps dying on it
        await _expire_claims(p)
        assert [r[0] for r in await inbox.claim_rows(p.svc)] == [poison_id]
    await _expire_claims(p)
    assert await inbox.claim_rows(p.svc) == []
    async with p.svc.sessions() as session:
        rows = {m.id: m for m in (await session.execute(select(models.InboxMessage)))
                .scalars()}
    assert rows[mate_id].status == "done"
    poison = rows[poison_id]
    assert (poison.status, poison.attempts, poison.claimed_until) == (
        "failed", inbox.MAX_ATTEMPTS, None)
    assert f"set aside after {inbox.MAX_ATTEMPTS} attempts" in poison.error
    # An operator's retry gives it one more chance.
    assert await inbox.retry(p.svc, [poison_id]) == 1
    assert await inbox.drain(p.svc) == 1
    assert (await p.inbox(poison_id)).status == "done"
