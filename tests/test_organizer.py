"""The organizer's side, through real SMTP to create@, the inbox and the processor: invites in
Google, Outlook and Apple shapes, updates and their staleness, cancelling the event or one
occurrence, override-only updates, the organizer policy, invites we must refuse, and bad
input that must fail clearly without stopping the processor."""

from __future__ import annotations

import asyncio
import base64
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from dateutil.rrule import rrulestr
from icalendar import Calendar

from ciserver.services import inbox
from ciserver.store import models

from .conftest import (
    DOMAIN,
    ORGANIZER,
    Captured,
    Pipeline,
    Refused,
    calendar_mail,
    page_id,
)
from .organizer_mail import calendar_text, organizer_mail

CREATE = f"create@{DOMAIN}"
NY = ZoneInfo("America/New_York")
START = datetime(2026, 3, 5, 0, 0, tzinfo=UTC)  # Wednesday 2026-03-04 19:00 EST
RRULE = "FREQ=WEEKLY;COUNT=4;BYDAY=WE"
UID = "board-games@team.example"
S0 = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)
FANS = ("fan.one@example.com", "fan.two@gmail.com")


def invite(style: str = "google", *, method: str = "REQUEST", sequence: int = 0,
           dtstamp: datetime = S0, start: datetime = START, hours: int = 3,
           summary: str = "Game night", location: str = "Dice & Slice Cafe",
           rrule: str = RRULE, **kw: object) -> bytes:
    return organizer_mail(style, method=method, uid=UID, sequence=sequence, dtstamp=dtstamp,
                          start=start, end=start + timedelta(hours=hours), summary=summary,
                          location=location, rrule=rrule, **kw)


async def create(p: Pipeline, raw: bytes | None = None, *fans: str) -> tuple[str, dict[str, str]]:
    """The organizer's invite reaches create@; ``fans`` ask for it. Returns the API id and
    the fans' tokens."""
    row = await p.deliver(CREATE, raw or invite(), ORGANIZER)
    assert row.status == "done" and "created event" in row.result, row.result
    [notice] = p.sink.to(ORGANIZER)
    assert notice.message["Subject"] == "Event ready: Game night"
    event_id = page_id(notice)
    p.sink.clear()
    tokens = await p.subscribe(event_id, *fans) if fans else {}
    return event_id, tokens


def to_fans(p: Pipeline) -> list[Captured]:
    return [m for m in p.sink.messages if m.rcpt_tos[0].lower() != ORGANIZER]


def vevents(msg: Captured) -> tuple[str, list[object]]:
    cal = Calendar.from_ical(msg.calendar())
    return str(cal["METHOD"]), list(cal.walk("VEVENT"))


# --------------------------------------------------------------------------------------------
# The three shapes


@pytest.mark.parametrize("style", ["google", "outlook", "apple"])
@pytest.mark.parametrize("start", [START, datetime(2026, 7, 15, 23, 0, tzinfo=UTC)],
                         ids=["winter", "summer"])
async def test_invite_shapes_create_the_event(sqlite_pipeline: Pipeline, style: str,
                                              start: datetime) -> None:
    p = sqlite_pipeline
    raw = invite(style, start=start)
    if style == "outlook":  # the shape really is what it claims
        assert b"Content-Transfer-Encoding: base64" in raw
        text = base64.b64decode(raw.split(b"base64\r\n\r\n")[1].split(b"\r\n--")[0])
        assert b"TZID:Eastern Standard Time" in text and b"16010101T020000" in text
        assert b"\r\n" not in text  # LF-only inside the base64
    event_id, _ = await create(p, raw)
    event = await p.event(event_id)
    assert event.start_at == start and event.end_at == start + timedelta(hours=3)
    assert event.tzid == "America/New_York" and event.recurring
    assert event.summary == "Game night" and event.location == "Dice & Slice Cafe"
    assert event.organizer_email == ORGANIZER and event.organizer_name == "Zach Lowe"
    assert event.organizer_uid == UID and event.uid == f"{event_id}@{DOMAIN}"

    # What a customer gets says the same instant, in the organizer's zone (IANA name).
    r = await p.http.post(f"/api/v1/events/{event_id}/invites", json={"email": FANS[0]})
    assert r.status_code == 202
    await p.process()
    [msg] = p.sink.messages
    method, [ev] = vevents(msg)
    assert method == "REQUEST"
    assert ev.start == start
    assert ev["DTSTART"].params["TZID"] == "America/New_York"
    assert ev.start.astimezone(NY).hour == 19
    cal = Calendar.from_ical(msg.calendar())
    assert [tz.tz_name for tz in cal.timezones] == ["America/New_York"]


# --------------------------------------------------------------------------------------------
# Updates


async def test_updates_apply_by_sequence_then_dtstamp(pipeline: Pipeline) -> None:
    p = pipeline
    event_id, _ = await create(p, None, *FANS)

    # A higher SEQUENCE with a new time: every fan gets it.
    later = START + timedelta(hours=1)
    row = await p.deliver(CREATE, invite(sequence=1, dtstamp=S0 + timedelta(days=1),
                                         start=later), ORGANIZER)
    assert row.status == "done" and "updated event" in row.result
    assert "DTSTART" in row.result
    got = to_fans(p)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(FANS)
    for msg in got:
        method, [ev] = vevents(msg)
        assert method == "REQUEST" and int(ev["SEQUENCE"]) == 1
        assert ev.start == later
    p.sink.clear()

    # The same SEQUENCE with a newer DTSTAMP (Thunderbird's "minor" update) applies.
    row = await p.deliver(CREATE, invite(sequence=1, dtstamp=S0 + timedelta(days=2),
                                         start=later, location="Board Room"), ORGANIZER)
    assert row.status == "done" and "LOCATION" in row.result
    assert len(to_fans(p)) == 2
    for msg in to_fans(p):
        _, [ev] = vevents(msg)
        assert int(ev["SEQUENCE"]) == 2 and str(ev["LOCATION"]) == "Board Room"
    p.sink.clear()

    # Same SEQUENCE, older DTSTAMP: stale, and the inbox says so.
    row = await p.deliver(CREATE, invite(sequence=1, dtstamp=S0 + timedelta(days=1, hours=12),
                                         start=later, location="Somewhere old"), ORGANIZER)
    assert row.status == "ignored" and row.result.startswith("stale update")
    # A lower SEQUENCE is stale whatever its DTSTAMP.
    row = await p.deliver(CREATE, invite(sequence=0, dtstamp=S0 + timedelta(days=9),
                                         location="Somewhere else"), ORGANIZER)
    assert row.status == "ignored" and row.result.startswith("stale update")
    assert "SEQUENCE 0" in row.result
    # The very same message again (at-least-once delivery upstream): harmless.
    dup = invite(sequence=1, dtstamp=S0 + timedelta(days=2), start=later, location="Board Room")
    row = await p.deliver(CREATE, dup, ORGANIZER)
    assert row.status == "ignored" and row.result.startswith("duplicate update")
    assert p.sink.messages == []

    event = await p.event(event_id)
    assert (event.sequence, event.location, event.start_at) == (2, "Board Room", later)
    assert (event.organizer_sequence, event.organizer_dtstamp) == (1, S0 + timedelta(days=2))
    versions = await p.rows(models.EventVersion, models.EventVersion.event_id == event.id)
    assert [v.sequence for v in versions] == [0, 1, 2]


async def test_update_without_visible_change_sends_nothing(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    event_id, _ = await create(p, invite("outlook"), *FANS)
    # The organizer adds a guest in Outlook: new SEQUENCE, new DTSTAMP, same event for fans.
    raw = invite("outlook", sequence=1, dtstamp=S0 + timedelta(days=1),
                 extra_attendees=("colleague@team.example",))
    row = await p.deliver(CREATE, raw, ORGANIZER)
    assert row.status == "done" and "without visible changes" in row.result
    assert p.sink.messages == []
    event = await p.event(event_id)
    assert event.sequence == 0 and event.organizer_sequence == 1


async def test_the_first_invite_sent_twice_creates_one_event(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    await create(p, invite())
    row = await p.deliver(CREATE, invite(), ORGANIZER)
    assert row.status == "ignored" and "duplicate" in row.result
    assert len(await p.events()) == 1
    assert p.sink.messages == []  # not even a second "Event ready"


# --------------------------------------------------------------------------------------------
# Cancelling


@pytest.mark.parametrize("style", ["google", "outlook"])
async def test_cancel_of_one_occurrence(sqlite_pipeline: Pipeline, style: str) -> None:
    p = sqlite_pipeline
    event_id, _ = await create(p, invite(style), *FANS)
    second = datetime(2026, 3, 11, 23, 0, tzinfo=UTC)  # 19:00 EDT, after the DST change
    raw = invite(style, method="CANCEL", sequence=1, dtstamp=S0 + timedelta(days=1),
                 start=second, rrule="", recurrence_id=second)
    row = await p.deliver(CREATE, raw, ORGANIZER)
    assert row.status == "done", row.result
    assert "cancelled 1 occurrence(s)" in row.result and "2026-03-11T23:00:00Z" in row.result

    # What the code sends: the series again, SEQUENCE up, the occurrence as an EXDATE in
    # the series' own zone. Outlook and Google apply a REQUEST with a higher SEQUENCE as
    # the new state of the series, and match EXDATE against DTSTART's zone and time.
    got = to_fans(p)
    assert sorted(m.rcpt_tos[0] for m in got) == sorted(FANS)
    for msg in got:
        method, [ev] = vevents(msg)
        assert method == "REQUEST" and int(ev["SEQUENCE"]) == 1
        assert str(ev["STATUS"]) == "CONFIRMED"
        assert ev["DTSTART"].params["TZID"] == "America/New_York"
        exdate = ev["EXDATE"]
        assert exdate.params["TZID"] == "America/New_York"
        assert [d.dt for d in exdate.dts] == [datetime(2026, 3, 11, 19, 0, tzinfo=NY)]
        rule = rrulestr(ev["RRULE"].to_ical().decode(),
                        dtstart=ev.start)
        left = [d for d in rule if d not in [x.dt for x in exdate.dts]]
        assert [d.astimezone(UTC) for d in left] == [
            START, datetime(2026, 3, 18, 23, tzinfo=UTC), datetime(2026, 3, 25, 23, tzinfo=UTC)]
        cal = Calendar.from_ical(msg.calendar())
        assert [tz.tz_name for tz in cal.timezones] == ["America/New_York"]
    p.sink.clear()

    event = await p.event(event_id)
    assert event.status == "confirmed" and event.sequence == 1 and event.start_at == START

    # The same CANCEL delivered again, or re-sent later by the client: nothing new to send.
    row = await p.deliver(CREATE, raw, ORGANIZER)
    assert row.status == "ignored" and row.result.startswith("duplicate CANCEL"), row.result
    again = invite(style, method="CANCEL", sequence=1, dtstamp=S0 + timedelta(days=1, hours=1),
                   start=second, rrule="", recurrence_id=second)
    row = await p.deliver(CREATE, again, ORGANIZER)
    assert row.status == "ignored" and "already cancelled" in row.result, row.result
    assert p.sink.messages == []
    assert (await p.event(event_id)).sequence == 1

    # Then the whole series: a CANCEL with a higher SEQUENCE and STATUS:CANCELLED.
    raw = invite(style, method="CANCEL", sequence=2, dtstamp=S0 + timedelta(days=2))
    row = await p.deliver(CREATE, raw, ORGANIZER)
    assert row.status == "done" and row.result == f"cancelled event {event_id}"
    for msg in to_fans(p):
        method, [ev] = vevents(msg)
        assert method == "CANCEL" and int(ev["SEQUENCE"]) == 2
        assert str(ev["STATUS"]) == "CANCELLED"
        ctype = next(x for x in msg.message.walk() if x.get_content_type() == "text/calendar")
        assert ctype.get_param("method") == "CANCEL"
    assert len(to_fans(p)) == 2
    p.sink.clear()
    row = await p.deliver(CREATE, raw, ORGANIZER)
    assert row.status == "ignored" and row.result.startswith("duplicate CANCEL")
    later = invite(style, method="CANCEL", sequence=3, dtstamp=S0 + timedelta(days=3))
    row = await p.deliver(CREATE, later, ORGANIZER)
    assert row.status == "ignored" and "already cancelled" in row.result
    assert p.sink.messages == []
    assert (await p.event(event_id)).status == "cancelled"


async def test_override_only_request_changes_one_occurrence(pipeline: Pipeline) -> None:
    p = pipeline
    event_id, _ = await create(p, None, *FANS)
    second = datetime(2026, 3, 11, 23, 0, tzinfo=UTC)
    moved = second + timedelta(hours=1)
    raw = invite(sequence=1, dtstamp=S0 + timedelta(days=1), start=moved, rrule="",
                 recurrence_id=second, summary="Game night (late start)")
    row = await p.deliver(CREATE, raw, ORGANIZER)
    assert row.status == "done" and "updated event" in row.result, row.result

    got = to_fans(p)
    assert len(got) == 2
    for msg in got:
        _, evs = vevents(msg)
        master = next(e for e in evs if "RECURRENCE-ID" not in e)
        override = next(e for e in evs if "RECURRENCE-ID" in e)
        assert len(evs) == 2
        assert master.start == START and str(master["SUMMARY"]) == "Game night"
        assert "RRULE" in master
        assert override["RECURRENCE-ID"].dt == second
        assert override.start == moved
        assert str(override["SUMMARY"]) == "Game night (late start)"
        assert int(master["SEQUENCE"]) == int(override["SEQUENCE"]) == 1
        assert str(master["UID"]) == str(override["UID"])
    event = await p.event(event_id)
    assert (event.start_at, event.summary, event.sequence) == (START, "Game night", 1)


# --------------------------------------------------------------------------------------------
# Who may create events


async def test_sender_not_allowed_is_refused_at_data(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    raw = invite(organizer="mallory@evil.example")
    with pytest.raises(Refused) as refused:
        await p.send(CREATE, raw, "mallory@evil.example")
    assert refused.value.code == 550 and refused.value.text.startswith("5.7.1")
    assert "mallory@evil.example" in refused.value.text
    assert await p.rows(models.InboxMessage) == []


async def test_organizer_not_allowed_is_rejected_and_told(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    # An allowed sender puts someone else in ORGANIZER.
    raw = invite(organizer="boss@other.example", from_addr=ORGANIZER)
    row = await p.deliver(CREATE, raw, ORGANIZER)
    assert row.status == "rejected"
    assert "boss@other.example is not allowed to create events" in row.result
    assert await p.events() == []
    [notice] = p.sink.messages
    assert notice.rcpt_tos == [ORGANIZER]
    assert notice.message["Subject"] == "Your invitation was not accepted"
    body = notice.message.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert "boss@other.example is not allowed" in body.decode()


def _ical(**kw: object) -> str:
    return calendar_text("google", method="REQUEST", uid=UID, sequence=0, dtstamp=S0,
                         start=START, end=START + timedelta(hours=3), summary="Game night",
                         organizer=ORGANIZER, organizer_name="Zach Lowe",
                         **kw)


def _tnef_only() -> bytes:
    tnef = base64.encodebytes(b"\x78\x9f\x3e\x22" + bytes(range(64))).decode()
    return ("From: Zach Lowe <zach@team.example>\r\nTo: create@invites.example.com\r\n"
            "Subject: Game night\r\nDate: Fri, 20 Feb 2026 10:00:00 +0000\r\n"
            "Message-ID: <tnef-1@team.example>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=\"_TNEF_\"\r\n\r\n"
            "--_TNEF_\r\nContent-Type: text/plain; charset=\"us-ascii\"\r\n\r\n"
            "When: Wednesday, March 4, 2026 7:00 PM-10:00 PM.\r\n\r\n"
            "--_TNEF_\r\nContent-Type: application/ms-tnef; name=\"winmail.dat\"\r\n"
            "Content-Disposition: attachment; filename=\"winmail.dat\"\r\n"
            f"Content-Transfer-Encoding: base64\r\n\r\n{tnef}\r\n--_TNEF_--\r\n").encode()


REFUSED = {
    "no-uid": (lambda: calendar_mail(_ical().replace(f"UID:{UID}\r\n", ""),
                                     from_addr=ORGANIZER, to=CREATE),
               "the calendar object has no UID", "Your invitation has no UID"),
    "two-organizers": (lambda: calendar_mail(
        _ical().replace(f"UID:{UID}\r\n",
                        f"ORGANIZER;CN=Other:mailto:other@nba.example\r\nUID:{UID}\r\n"),
        from_addr=ORGANIZER, to=CREATE),
        "several organizers: other@nba.example, zach@team.example",
        "Your invitation names several organizers"),
    "tnef-only": (_tnef_only, "only a TNEF winmail.dat attachment",
                  "Your invitation could not be read (winmail.dat)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_invites_we_cannot_take_are_refused_clearly(sqlite_pipeline: Pipeline,
                                                          case: str) -> None:
    p = sqlite_pipeline
    make, reason, subject = REFUSED[case]
    row = await p.deliver(CREATE, make(), ORGANIZER)
    assert row.status == "rejected" and reason in row.result, row.result
    assert await p.events() == []
    [notice] = p.sink.messages
    assert notice.rcpt_tos == [ORGANIZER] and notice.message["Subject"] == subject


def _dsn_with_invite(from_addr: str) -> bytes:
    inner = invite().decode()
    return (f"From: Mail Delivery System <{from_addr}>\r\nTo: create@invites.example.com\r\n"
            "Subject: Undelivered Mail Returned to Sender\r\n"
            "Date: Fri, 20 Feb 2026 10:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/report; report-type=delivery-status; boundary=\"R\"\r\n"
            "\r\n--R\r\nContent-Type: text/plain\r\n\r\nYour message could not be "
            "delivered.\r\n--R\r\nContent-Type: message/delivery-status\r\n\r\n"
            "Reporting-MTA: dns; mx.nba.example\r\n\r\n"
            "Final-Recipient: rfc822; someone@nba.example\r\nAction: failed\r\n"
            "Status: 5.1.1\r\n\r\n--R\r\nContent-Type: message/rfc822\r\n\r\n"
            f"{inner}\r\n--R--\r\n").encode()


async def test_a_dsn_to_create_is_never_an_invite(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    # From an allowed domain's mailer daemon: taken in, and ignored as a bounce.
    row = await p.deliver(CREATE, _dsn_with_invite("MAILER-DAEMON@nba.example"), "")
    assert row.status == "ignored" and "delivery status report" in row.result
    # From anyone else: refused before it is even stored.
    with pytest.raises(Refused) as refused:
        await p.send(CREATE, _dsn_with_invite("MAILER-DAEMON@mx.elsewhere.example"), "")
    assert refused.value.code == 550
    assert await p.events() == [] and p.sink.messages == []


# --------------------------------------------------------------------------------------------
# Bad input


def _raw_calendar_mail(body: str, headers: str) -> bytes:
    return ("From: Zach Lowe <zach@team.example>\r\nTo: create@invites.example.com\r\n"
            "Subject: Game night\r\nDate: Fri, 20 Feb 2026 10:00:00 +0000\r\n"
            f"Message-ID: <bad@team.example>\r\nMIME-Version: 1.0\r\n{headers}\r\n\r\n"
            f"{body}").encode()


BAD = {
    "truncated-icalendar": (
        calendar_mail("BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:x-1\r\n"
                      "DTSTART:20260305T000000Z\r\n", from_addr=ORGANIZER, to=CREATE),
        "the calendar data cannot be read"),
    "bad-dtstart": (
        calendar_mail(_ical().replace("DTSTART;TZID=America/New_York:20260304T190000",
                                      "DTSTART;TZID=America/New_York:next wednesday"),
                      from_addr=ORGANIZER, to=CREATE),
        "an event in the calendar data cannot be read"),
    "multipart-without-boundary": (
        _raw_calendar_mail("--X\r\nContent-Type: text/calendar; method=REQUEST\r\n\r\n"
                           + _ical() + "--X--\r\n", "Content-Type: multipart/mixed"),
        "the MIME structure is broken: a multipart/mixed part declares no boundary"),
    "calendar-not-base64": (
        _raw_calendar_mail("!!! this is not base64 at all !!!\r\n",
                           "Content-Type: text/calendar; method=REQUEST\r\n"
                           "Content-Transfer-Encoding: base64"),
        "a text/calendar part (base64) does not decode to iCalendar data"),
}


@pytest.mark.parametrize("case", list(BAD))
async def test_bad_input_fails_readably_and_the_processor_goes_on(
        sqlite_pipeline: Pipeline, case: str) -> None:
    p = sqlite_pipeline
    raw, error = BAD[case]
    bad_reply = await p.send(CREATE, raw, ORGANIZER)
    good_reply = await p.send(CREATE, invite(), ORGANIZER)
    assert "queued as" in bad_reply and "queued as" in good_reply
    await p.process()

    bad, good = await p.rows(models.InboxMessage)
    assert bad.status == "failed", (bad.status, bad.result)
    assert error in bad.error, bad.error
    assert "Traceback" not in bad.error  # a sentence for a person, not a stack
    assert bad.raw == raw  # kept for `ciserver inbox retry`
    assert good.status == "done" and "created event" in good.result
    assert [e.summary for e in await p.events()] == ["Game night"]


async def test_the_running_processor_survives_bad_mail(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    stop = asyncio.Event()
    task = asyncio.create_task(inbox.run(p.svc, stop, poll=0.2))
    try:
        for raw, _ in BAD.values():
            await p.send(CREATE, raw, ORGANIZER)
        await p.send(CREATE, invite(), ORGANIZER)

        for _ in range(200):
            rows = await p.rows(models.InboxMessage)
            if all(r.status not in ("new", "processing") for r in rows):
                break
            await asyncio.sleep(0.05)
        rows = await p.rows(models.InboxMessage)
        assert [r.status for r in rows] == ["failed"] * len(BAD) + ["done"]
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
