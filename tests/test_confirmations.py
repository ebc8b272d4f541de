"""What the organizer's calendar and the customers hear back from us: create@ accepting the
organizer's invitation (iTIP REPLY), confirmations of updates and cancels, COUNTER kept in
the history and, when configured, answered with DECLINECOUNTER."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from icalendar import Calendar
from sqlalchemy import select

from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import RsvpHistory

from .conftest import DOMAIN, ORGANIZER, Pipeline, Sink, make_config, open_pipeline
from .organizer_mail import organizer_mail
from .test_replies import (
    FAN_ONE,
    FAN_TWO,
    ORG_UID,
    RRULE,
    START,
    game_night,
    itip,
    organizer_update,
    send_itip,
)


def itip_part(msg: object) -> tuple[str, Calendar]:
    for part in msg.message.walk():  # type: ignore[attr-defined]
        if part.get_content_type() == "text/calendar":
            return part.get_param("method"), Calendar.from_ical(part.get_payload(decode=True))
    raise AssertionError("no text/calendar part")


async def test_create_answers_the_organizers_calendar(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    raw = organizer_mail("google", uid=ORG_UID, sequence=0,
                         dtstamp=datetime(2026, 2, 1, tzinfo=UTC), start=START,
                         end=START + timedelta(hours=3), summary="Game night", rrule=RRULE)
    await p.deliver(f"create@{DOMAIN}", raw, ORGANIZER)
    [notice] = p.sink.to(ORGANIZER)
    assert notice.mail_from in ("", "<>")  # never a bounce loop
    assert "/e/" in notice.text()
    method, cal = itip_part(notice)
    assert method == "REPLY" and str(cal["METHOD"]) == "REPLY"
    ev = cal.walk("VEVENT")[0]
    assert str(ev["UID"]) == ORG_UID and int(ev["SEQUENCE"]) == 0
    assert str(ev["ORGANIZER"]).lower() == f"mailto:{ORGANIZER}"
    attendee = ev["ATTENDEE"]
    assert str(attendee).lower() == f"mailto:create@{DOMAIN}"
    assert attendee.params["PARTSTAT"] == "ACCEPTED"
    assert notice.message["From"].endswith(f"<create@{DOMAIN}>")


async def test_updates_and_cancels_are_confirmed(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)
    await organizer_update(p, game, 1)
    [notice] = p.sink.to(ORGANIZER)
    assert "Event updated" in notice.message["Subject"]
    assert "2 customer(s)" in notice.text()
    method, cal = itip_part(notice)
    assert method == "REPLY" and int(cal.walk("VEVENT")[0]["SEQUENCE"]) == 1
    p.sink.clear()
    raw = organizer_mail("google", method="CANCEL", uid=ORG_UID, sequence=2,
                         dtstamp=datetime(2026, 2, 10, tzinfo=UTC), start=START,
                         end=START + timedelta(hours=3), summary="Game night", rrule=RRULE)
    await p.deliver(f"create@{DOMAIN}", raw, ORGANIZER)
    [notice] = p.sink.to(ORGANIZER)
    assert "Event cancelled" in notice.message["Subject"]
    assert len(p.sink.invites()) == 2


async def test_counter_is_kept_in_the_history(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    await send_itip(p, game, FAN_ONE, itip(
        "COUNTER", game, FAN_ONE, partstat="TENTATIVE", sequence=0,
        dtstamp=datetime(2026, 2, 20, tzinfo=UTC), start=START + timedelta(hours=1),
        comment="An hour later?"), method="COUNTER")
    async with p.svc.sessions() as session:
        rows = (await session.execute(select(RsvpHistory))).scalars().all()
    assert [(r.outcome, r.partstat) for r in rows] == [("counter", "TENTATIVE")]
    assert "proposed 2026-03-05T01:00:00Z" in rows[0].comment and "An hour later?" in \
        rows[0].comment
    assert p.sink.invites() == []  # no automatic answer unless configured


@pytest.fixture
async def declining(tmp_path: Path, sqlite_url: str, sink: Sink) -> AsyncIterator[Pipeline]:
    cfg = make_config(tmp_path, sqlite_url, sink, organizers={"decline_counter": "true"})
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    async with open_pipeline(svc, sink) as p:
        yield p
    await svc.close()


async def test_counter_can_be_declined_automatically(declining: Pipeline) -> None:
    p = declining
    game = await game_night(p, FAN_ONE, FAN_TWO)
    await send_itip(p, game, FAN_ONE, itip(
        "COUNTER", game, FAN_ONE, partstat="TENTATIVE", sequence=0,
        dtstamp=datetime(2026, 2, 20, tzinfo=UTC), start=START + timedelta(hours=1)),
        method="COUNTER")
    [answer] = p.sink.invites()
    assert answer.rcpt_tos == [FAN_ONE]
    assert answer.mail_from == f"bounce+{game.tokens[FAN_ONE]}@{DOMAIN}"
    method, cal = itip_part(answer)
    assert method == "DECLINECOUNTER" and str(cal["METHOD"]) == "DECLINECOUNTER"
    ev = cal.walk("VEVENT")[0]
    assert str(ev["UID"]) == game.uid
    assert str(ev["ORGANIZER"]) == f"mailto:{game.rsvp(FAN_ONE)}"
    assert len(p.sink.to(ORGANIZER)) == 1  # the organizer is still told
    assert FAN_TWO not in [m.rcpt_tos[0] for m in p.sink.invites()]
