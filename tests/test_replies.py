"""What customers' calendars and remote MTAs send back, through real SMTP, the inbox and the
processor: answers from Outlook, Google and Apple, staleness, forwarded invites, answers per
occurrence, the RSVP window, REFRESH, COUNTER, plain and automatic replies, unsubscribe and
bounces. Assertions read the database and the API, and what the capturing smarthost got."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import Message

import pytest
from icalendar import Calendar

from ciserver.addresses import make_token
from ciserver.itip.mime import extract
from ciserver.store import models

from .conftest import DOMAIN, ORGANIZER, Captured, Pipeline, Refused, calendar_mail, page_id
from .fixtures import load_fixture
from .organizer_mail import organizer_mail

# The fixtures' event: "Game night", weekly on Wednesdays (4 times) from 2026-03-04 19:00 in
# New York (EST, = 2026-03-05T00:00Z); US DST starts 2026-03-08, so later ones are 23:00Z.
START = datetime(2026, 3, 5, 0, 0, tzinfo=UTC)
RRULE = "FREQ=WEEKLY;COUNT=4;BYDAY=WE"
LAST_END = datetime(2026, 3, 26, 2, 0, tzinfo=UTC)  # 2026-03-25 22:00 EDT
ORG_UID = "game-night-2026@google.com"

FAN_ONE = "fan.one@example.com"  # outlook_reply_accept.eml
FRIEND_TWO = "friend.two@example.org"  # outlook_reply_forwarded.eml
FAN_TWO = "fan.two@gmail.com"  # google_*.eml
FAN_THREE = "fan.three@example.net"  # apple_*.eml
FAN_FOUR = "fan.four@example.com"  # plain_reply_no_calendar.eml
FANS = (FAN_ONE, FAN_TWO, FAN_THREE, FAN_FOUR)


@dataclass
class Game:
    id: str  # the API id
    uid: str  # the UID customers see
    tokens: dict[str, str]

    def rsvp(self, fan: str) -> str:
        return f"rsvp+{self.tokens[fan]}@{DOMAIN}"


async def game_night(p: Pipeline, *fans: str, uid: str = ORG_UID,
                     summary: str = "Game night") -> Game:
    raw = organizer_mail("google", uid=uid, sequence=0, dtstamp=datetime(2026, 2, 1, tzinfo=UTC),
                         start=START, end=START + timedelta(hours=3), summary=summary,
                         location="Dice & Slice Cafe", rrule=RRULE)
    row = await p.deliver(f"create@{DOMAIN}", raw, ORGANIZER)
    assert row.status == "done", row.result
    event_id = page_id(p.sink.to(ORGANIZER)[-1])
    p.sink.clear()
    tokens = await p.subscribe(event_id, *fans) if fans else {}
    event = await p.event(event_id)
    return Game(event_id, event.uid, tokens)


async def organizer_update(p: Pipeline, game: Game, sequence: int, *,
                           location: str = "Dice & Slice Cafe, back room") -> None:
    raw = organizer_mail("google", uid=ORG_UID, sequence=sequence,
                         dtstamp=datetime(2026, 2, 1 + sequence, tzinfo=UTC), start=START,
                         end=START + timedelta(hours=3), summary="Game night",
                         location=location, rrule=RRULE)
    row = await p.deliver(f"create@{DOMAIN}", raw, ORGANIZER)
    assert row.status == "done" and "updated event" in row.result, row.result


async def answer(p: Pipeline, game: Game, fixture: str, fan: str, *, sequence: int = 0,
                 sender: str | None = None) -> models.InboxMessage:
    """One of tests/data's client replies, sent by ``fan`` with their own token."""
    raw = load_fixture(fixture, token=game.tokens[fan], uid=game.uid, sequence=sequence)
    return await p.deliver(game.rsvp(fan), raw, sender or fan)


def _utc(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def itip(method: str, game: Game, fan: str, *, attendee: str | None = None,
         partstat: str = "", sequence: int | None = None, dtstamp: datetime | None = None,
         reply_time: datetime | None = None, rid: str = "", start: datetime | None = None,
         comment: str = "", response_comment: str = "", outlook: bool = False,
         uid: str | None = None) -> str:
    """Calendar text of a customer's iTIP message. ``outlook``: Exchange's REPLY shape (no
    ORGANIZER, upper-case MAILTO:, SEQUENCE and DTSTAMP only when given)."""
    lines = ["BEGIN:VCALENDAR",
             "PRODID:" + ("Microsoft Exchange Server 2010" if outlook else "-//Test//EN"),
             "VERSION:2.0", f"METHOD:{method}", "BEGIN:VEVENT", f"UID:{uid or game.uid}"]
    if not outlook:
        lines.append(f"ORGANIZER;CN=Board Game Club:mailto:{game.rsvp(fan)}")
    params = f";PARTSTAT={partstat}" if partstat else ""
    if response_comment:
        params += f';X-RESPONSE-COMMENT="{response_comment}"'
    lines.append(f"ATTENDEE{params}:{'MAILTO:' if outlook else 'mailto:'}"
                 f"{(attendee or fan).upper() if outlook else attendee or fan}")
    if sequence is not None:
        lines.append(f"SEQUENCE:{sequence}")
    if dtstamp is not None:
        lines.append(f"DTSTAMP:{_utc(dtstamp)}")
    if reply_time is not None:
        lines.append(f"X-MICROSOFT-CDO-REPLYTIME:{_utc(reply_time)}")
    if rid:
        lines.append(rid)
    if start is not None:
        lines += [f"DTSTART:{_utc(start)}", f"DTEND:{_utc(start + timedelta(hours=3))}"]
    if comment:
        lines.append(f"COMMENT:{comment}")
    lines += ["SUMMARY:Game night", "END:VEVENT", "END:VCALENDAR"]
    return "\r\n".join(lines) + "\r\n"


async def send_itip(p: Pipeline, game: Game, fan: str, ical: str, *,
                    date: datetime = datetime(2026, 2, 20, 12, tzinfo=UTC),
                    method: str | None = "REPLY") -> models.InboxMessage:
    from email.utils import format_datetime

    raw = calendar_mail(ical, from_addr=fan, to=game.rsvp(fan), subject="Answer",
                        method=method, date=format_datetime(date))
    return await p.deliver(game.rsvp(fan), raw, fan)


async def history(p: Pipeline, game: Game, fan: str) -> list[tuple[str, str, str]]:
    sub = await p.subscription(game.id, fan)
    rows = await p.rows(models.RsvpHistory, models.RsvpHistory.subscription_id == sub.id)
    return [(r.occurrence, r.partstat, r.outcome) for r in rows]


async def answers(p: Pipeline, game: Game, fan: str) -> dict[str, tuple[str, str]]:
    """occurrence ("" = the whole event) -> (partstat, comment)."""
    sub = await p.subscription(game.id, fan)
    rows = await p.rows(models.Answer, models.Answer.subscription_id == sub.id)
    return {r.occurrence: (r.partstat, r.comment) for r in rows}


def mail_to(p: Pipeline, rcpt: str) -> list[Captured]:
    return p.sink.to(rcpt)


def plain_reply(game: Game, fan: str, sender: str, subject: str, body: str) -> bytes:
    """A text-only mail (no calendar data) to ``fan``'s reply address, from ``sender``
    (a From header value), its headers and body written raw as UTF-8."""
    return (f"From: {sender}\r\nTo: {game.rsvp(fan)}\r\nSubject: {subject}\r\n"
            "Date: Sat, 21 Feb 2026 19:02:44 +0100\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            f"\r\n{body}\r\n").encode()


def forwarded_text(p: Pipeline) -> tuple[Message, str]:
    """The one mail the organizer got, and its text."""
    [mail] = p.sink.messages
    body = mail.message.get_payload(decode=True)
    assert isinstance(body, bytes)
    return mail.message, body.decode()


# --------------------------------------------------------------------------------------------
# The three clients


async def test_outlook_google_apple_answers_are_counted(pipeline: Pipeline) -> None:
    p = pipeline
    game = await game_night(p, *FANS)

    outlook = await answer(p, game, "outlook_reply_accept.eml", FAN_ONE)
    google = await answer(p, game, "google_reply_tentative.eml", FAN_TWO)
    # Apple answers from the customer's iCloud account; the ATTENDEE is the invited address.
    apple = await answer(p, game, "apple_reply_accept.eml", FAN_THREE, sender="fan3@icloud.com")
    assert [outlook.status, google.status, apple.status] == ["done"] * 3
    assert f"{FAN_ONE} answered ACCEPTED" in outlook.result
    # The Apple shape really has no method= parameter: METHOD comes from the body.
    raw = load_fixture("apple_reply_accept.eml", token=game.tokens[FAN_THREE], uid=game.uid)
    assert [part.header_method for part in extract(raw).parts] == [None]

    people = await p.attendees(game.id)
    assert {e: a["rsvp"] for e, a in people.items()} == {
        FAN_ONE: "Y", FAN_TWO: "M", FAN_THREE: "Y", FAN_FOUR: None}
    assert people[FAN_TWO]["partstat"] == "TENTATIVE"
    assert people[FAN_ONE]["responded_at"] is not None
    assert people[FAN_FOUR]["responded_at"] is None
    # Outlook's note is its COMMENT, Google's the ATTENDEE's X-RESPONSE-COMMENT.
    assert await answers(p, game, FAN_ONE) == {
        "": ("ACCEPTED", "Bringing snacks, see you there!")}
    assert await answers(p, game, FAN_TWO) == {"": ("TENTATIVE", "Might be late")}
    assert await answers(p, game, FAN_THREE) == {"": ("ACCEPTED", "")}
    for fan in (FAN_ONE, FAN_TWO, FAN_THREE):
        assert [o for _, _, o in await history(p, game, fan)] == ["applied"]

    report = await p.report(game.id)
    assert {(r["email"], r["occurrence"]): r["rsvp"] for r in report} == {
        (FAN_ONE, ""): "Y", (FAN_TWO, ""): "M", (FAN_THREE, ""): "Y", (FAN_FOUR, ""): ""}
    # Answers are counted, nobody is mailed because of them.
    assert p.sink.messages == []


# --------------------------------------------------------------------------------------------
# Staleness (RFC 5546 §2.1.5), per attendee and per RECURRENCE-ID


async def test_reply_with_an_older_sequence_is_kept_as_stale(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_TWO)
    await organizer_update(p, game, 1)  # the customer now has SEQUENCE 1
    p.sink.clear()

    row = await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="ACCEPTED",
                                                 sequence=1, dtstamp=datetime(2026, 2, 20, 9,
                                                                              tzinfo=UTC)))
    assert row.status == "done"
    # A delayed answer to the first version arrives later, with a newer DTSTAMP even.
    row = await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="DECLINED",
                                                 sequence=0, dtstamp=datetime(2026, 2, 20, 10,
                                                                              tzinfo=UTC)))
    assert row.status == "done" and "stale" in row.result
    assert await history(p, game, FAN_TWO) == [("", "ACCEPTED", "applied"),
                                               ("", "DECLINED", "stale")]
    assert (await p.attendees(game.id))[FAN_TWO]["rsvp"] == "Y"
    assert (await answers(p, game, FAN_TWO))[""][0] == "ACCEPTED"


async def test_reply_with_equal_sequence_and_older_dtstamp_is_stale(pipeline: Pipeline) -> None:
    p = pipeline
    game = await game_night(p, FAN_TWO)
    t = datetime(2026, 2, 20, 9, tzinfo=UTC)

    await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="TENTATIVE",
                                           sequence=0, dtstamp=t + timedelta(hours=2)))
    row = await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="DECLINED",
                                                 sequence=0, dtstamp=t))
    assert "stale" in row.result
    assert (await p.attendees(game.id))[FAN_TWO]["rsvp"] == "M"
    # A newer one applies again.
    await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="DECLINED",
                                           sequence=0, dtstamp=t + timedelta(hours=3)))
    assert (await p.attendees(game.id))[FAN_TWO]["rsvp"] == "N"
    assert await history(p, game, FAN_TWO) == [
        ("", "TENTATIVE", "applied"), ("", "DECLINED", "stale"), ("", "DECLINED", "applied")]


async def test_staleness_is_per_attendee_and_per_occurrence(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_TWO, FAN_THREE)
    t = datetime(2026, 2, 20, 9, tzinfo=UTC)
    rid = "RECURRENCE-ID;TZID=America/New_York:20260311T190000"

    # fan.two declines the second occurrence at t+3h ...
    await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="DECLINED",
                                           sequence=0, dtstamp=t + timedelta(hours=3), rid=rid))
    # ... an answer for the whole series stamped earlier is not stale: another occurrence.
    await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="ACCEPTED",
                                           sequence=0, dtstamp=t + timedelta(hours=1)))
    # fan.three's earlier stamp is compared with nobody else's answers.
    await send_itip(p, game, FAN_THREE, itip("REPLY", game, FAN_THREE, partstat="TENTATIVE",
                                             sequence=0, dtstamp=t))
    # An older answer for the same occurrence is stale, and says so.
    row = await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="ACCEPTED",
                                                 sequence=0, dtstamp=t + timedelta(hours=2),
                                                 rid=rid))
    assert "stale answer ACCEPTED" in row.result and "2026-03-11T23:00:00Z" in row.result

    assert await answers(p, game, FAN_TWO) == {"": ("ACCEPTED", ""),
                                               "2026-03-11T23:00:00Z": ("DECLINED", "")}
    assert await history(p, game, FAN_TWO) == [
        ("2026-03-11T23:00:00Z", "DECLINED", "applied"), ("", "ACCEPTED", "applied"),
        ("2026-03-11T23:00:00Z", "ACCEPTED", "stale")]
    assert await history(p, game, FAN_THREE) == [("", "TENTATIVE", "applied")]


async def test_outlook_answers_are_ordered_by_reply_time_else_mail_date(
        sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)

    # The real fixture: no DTSTAMP, no SEQUENCE; X-MICROSOFT-CDO-REPLYTIME 2026-02-20 10:15:30Z.
    await answer(p, game, "outlook_reply_accept.eml", FAN_ONE)
    # Outlook's earlier decline, delivered late: its REPLYTIME is older; its mail Date
    # (newer) must not win over it.
    row = await send_itip(p, game, FAN_ONE, itip(
        "REPLY", game, FAN_ONE, partstat="DECLINED", outlook=True,
        reply_time=datetime(2026, 2, 20, 9, 0, tzinfo=UTC)),
        date=datetime(2026, 2, 20, 11, 0, tzinfo=UTC))
    assert "stale" in row.result
    assert (await p.attendees(game.id))[FAN_ONE]["rsvp"] == "Y"

    # Without REPLYTIME, the mail's Date orders them: older than 10:15:30 is stale ...
    row = await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE, partstat="TENTATIVE",
                                                 outlook=True),
                          date=datetime(2026, 2, 20, 10, 0, tzinfo=UTC))
    assert "stale" in row.result
    # ... newer applies.
    row = await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE, partstat="TENTATIVE",
                                                 outlook=True, comment="Maybe\\, kids"),
                          date=datetime(2026, 2, 20, 12, 0, tzinfo=UTC))
    assert f"{FAN_ONE} answered TENTATIVE" in row.result
    assert (await p.attendees(game.id))[FAN_ONE]["rsvp"] == "M"
    assert await answers(p, game, FAN_ONE) == {"": ("TENTATIVE", "Maybe, kids")}
    assert [o for _, _, o in await history(p, game, FAN_ONE)] == [
        "applied", "stale", "stale", "applied"]


# --------------------------------------------------------------------------------------------
# Forwarded invites


async def test_forwarded_invite_reply_creates_its_own_subscription(pipeline: Pipeline) -> None:
    p = pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)

    # fan.one forwarded the invite; friend.two answers it, to fan.one's rsvp address.
    row = await answer(p, game, "outlook_reply_forwarded.eml", FAN_ONE, sender=FRIEND_TWO)
    assert row.status == "done", row.result
    one = await p.subscription(game.id, FAN_ONE)
    friend = await p.subscription(game.id, FRIEND_TWO)
    assert friend.source == "forwarded" and friend.forwarded_by == one.id
    assert friend.status == "active" and friend.partstat == "ACCEPTED"
    assert friend.name == "Friend Two"
    assert one.partstat == "NEEDS-ACTION" and one.responded_at is None
    assert await history(p, game, FAN_ONE) == []
    people = await p.attendees(game.id)
    assert people[FRIEND_TWO]["rsvp"] == "Y" and people[FRIEND_TWO]["source"] == "forwarded"
    assert people[FAN_ONE]["rsvp"] is None
    assert p.sink.messages == []  # friend.two already has the invite (fan.one's copy)

    # fan.one's own answer still goes to fan.one.
    await answer(p, game, "outlook_reply_accept.eml", FAN_ONE)
    assert (await p.subscription(game.id, FAN_ONE)).partstat == "ACCEPTED"

    # The organizer's next change reaches friend.two too, with an address of their own.
    await organizer_update(p, game, 1)
    assert sorted(m.rcpt_tos[0].lower() for m in p.sink.invites()) == sorted(
        [FAN_ONE, FAN_TWO, FRIEND_TWO])
    [to_friend] = mail_to(p, FRIEND_TWO)
    cal = Calendar.from_ical(to_friend.calendar())
    ev = cal.walk("VEVENT")[0]
    assert str(ev["UID"]) == game.uid and int(ev["SEQUENCE"]) == 1
    assert str(ev["ATTENDEE"]).lower() == f"mailto:{FRIEND_TWO}"
    assert ev["ATTENDEE"].params["PARTSTAT"] == "ACCEPTED"
    friend_rsvp = str(ev["ORGANIZER"]).lower()
    assert friend_rsvp.startswith("mailto:rsvp+") and game.tokens[FAN_ONE] not in friend_rsvp


async def test_forwarded_reply_after_cancel_is_not_a_failure(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    raw = organizer_mail("google", method="CANCEL", uid=ORG_UID, sequence=1,
                         dtstamp=datetime(2026, 2, 10, tzinfo=UTC), start=START,
                         end=START + timedelta(hours=3), summary="Game night", rrule=RRULE)
    assert (await p.deliver(f"create@{DOMAIN}", raw, ORGANIZER)).status == "done"
    row = await answer(p, game, "outlook_reply_forwarded.eml", FAN_ONE, sender=FRIEND_TWO)
    assert row.status == "ignored" and "cancelled" in row.result, (row.status, row.result)
    assert row.error == ""
    assert FRIEND_TWO not in await p.attendees(game.id)


# --------------------------------------------------------------------------------------------
# Answers per occurrence, the report


async def test_answers_per_occurrence_have_rows_of_their_own(pipeline: Pipeline) -> None:
    p = pipeline
    game = await game_night(p, FAN_TWO, FAN_THREE)

    await answer(p, game, "google_reply_tentative.eml", FAN_TWO)
    # Google: RECURRENCE-ID;TZID=America/New_York:20260304T190000 (EST) = 00:00Z.
    await answer(p, game, "google_reply_declined_occurrence.eml", FAN_TWO)
    # Apple: RECURRENCE-ID:20260311T230000Z (19:00 EDT).
    await answer(p, game, "apple_reply_declined_utc_occurrence.eml", FAN_THREE,
                 sender="fan3@icloud.com")

    assert await answers(p, game, FAN_TWO) == {
        "": ("TENTATIVE", "Might be late"), "2026-03-05T00:00:00Z": ("DECLINED", "")}
    assert await answers(p, game, FAN_THREE) == {"2026-03-11T23:00:00Z": ("DECLINED", "")}
    # The whole-event answer is what the attendee list shows.
    people = await p.attendees(game.id)
    assert people[FAN_TWO]["rsvp"] == "M" and people[FAN_THREE]["rsvp"] is None

    report = await p.report(game.id)
    assert [(r["email"], r["occurrence"], r["rsvp"], r["partstat"]) for r in report] == [
        (FAN_THREE, "", "", "NEEDS-ACTION"),
        (FAN_THREE, "2026-03-11T23:00:00Z", "N", "DECLINED"),
        (FAN_TWO, "", "M", "TENTATIVE"),
        (FAN_TWO, "2026-03-05T00:00:00Z", "N", "DECLINED"),
    ]
    occurrence_rows = [r for r in report if r["occurrence"]]
    assert all(r["responded_at"] for r in occurrence_rows)
    assert all(r["event_uid"] == ORG_UID for r in report)


async def test_answers_after_the_last_occurrence_are_late(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO, FAN_THREE)
    await answer(p, game, "google_reply_tentative.eml", FAN_TWO)

    # Between the first and the last occurrence: still counted.
    p.now = datetime(2026, 3, 12, 12, tzinfo=UTC)
    await answer(p, game, "apple_reply_accept.eml", FAN_THREE)
    assert (await p.attendees(game.id))[FAN_THREE]["rsvp"] == "Y"
    before = await p.report(game.id)

    # The series ended 2026-03-26 02:00Z; these come afterwards.
    p.now = LAST_END + timedelta(minutes=1)
    row = await answer(p, game, "outlook_reply_accept.eml", FAN_ONE)
    assert row.status == "done" and "late answer ACCEPTED" in row.result
    row = await answer(p, game, "google_reply_declined_occurrence.eml", FAN_TWO)
    assert "late answer DECLINED" in row.result

    assert await history(p, game, FAN_ONE) == [("", "ACCEPTED", "late")]
    assert await history(p, game, FAN_TWO) == [
        ("", "TENTATIVE", "applied"), ("2026-03-05T00:00:00Z", "DECLINED", "late")]
    assert await answers(p, game, FAN_ONE) == {}
    assert (await p.subscription(game.id, FAN_ONE)).partstat == "NEEDS-ACTION"
    assert await p.report(game.id) == before


# --------------------------------------------------------------------------------------------
# Messages that are not plain answers


async def test_reply_for_another_event_is_quarantined(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    poker = await game_night(p, uid="poker-night@google.com", summary="Poker night")

    raw = load_fixture("outlook_reply_accept.eml", token=game.tokens[FAN_ONE], uid=poker.uid)
    row = await p.deliver(game.rsvp(FAN_ONE), raw, FAN_ONE)
    assert row.status == "quarantined"
    assert poker.uid in row.result and game.id in row.result and game.uid in row.result
    assert row.raw == raw  # nothing lost
    assert (await p.subscription(game.id, FAN_ONE)).partstat == "NEEDS-ACTION"
    assert await history(p, game, FAN_ONE) == []


async def test_refresh_resends_the_current_version(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)
    await organizer_update(p, game, 1, location="Board Room, 2nd floor")
    p.sink.clear()

    row = await send_itip(p, game, FAN_TWO, itip("REFRESH", game, FAN_TWO,
                                                 dtstamp=datetime(2026, 2, 20, tzinfo=UTC)),
                          method="REFRESH")
    assert row.status == "done" and "REFRESH" in row.result
    [again] = p.sink.messages
    assert again.rcpt_tos == [FAN_TWO]
    cal = Calendar.from_ical(again.calendar())
    ev = cal.walk("VEVENT")[0]
    assert str(cal["METHOD"]) == "REQUEST"
    assert int(ev["SEQUENCE"]) == 1 and str(ev["LOCATION"]) == "Board Room, 2nd floor"
    assert str(ev["UID"]) == game.uid and ev.start == START


async def test_counter_is_forwarded_to_the_organizer(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)
    proposed = START + timedelta(hours=1)  # 20:00 New York

    row = await send_itip(p, game, FAN_ONE, itip(
        "COUNTER", game, FAN_ONE, partstat="TENTATIVE", sequence=0,
        dtstamp=datetime(2026, 2, 20, tzinfo=UTC), start=proposed,
        comment="Could we start an hour later?"), method="COUNTER")
    assert row.status == "done" and "COUNTER" in row.result
    [mail] = p.sink.messages
    assert mail.rcpt_tos == [ORGANIZER]
    msg = mail.message
    assert msg["Reply-To"] == FAN_ONE
    assert "proposes a new time for Game night" in msg["Subject"]
    body = msg.get_payload(decode=True)
    assert isinstance(body, bytes)
    text = body.decode()
    assert "Wednesday 04 March 2026, 19:00 to 22:00 (America/New_York" in text  # now
    assert "Wednesday 04 March 2026, 20:00 to 23:00 (America/New_York" in text  # proposed
    assert "Could we start an hour later?" in text
    # Nothing changes until the organizer changes the event.
    event = await p.event(game.id)
    assert event.sequence == 0 and event.start_at == START


async def test_plain_reply_is_forwarded_to_the_organizer(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_FOUR)

    raw = load_fixture("plain_reply_no_calendar.eml", token=game.tokens[FAN_FOUR], uid=game.uid)
    row = await p.deliver(game.rsvp(FAN_FOUR), raw, FAN_FOUR)
    assert row.status == "done" and "forwarded" in row.result
    [mail] = p.sink.messages
    assert mail.rcpt_tos == [ORGANIZER]
    assert mail.mail_from in ("", "<>")  # null reverse-path: notices never start a loop
    msg = mail.message
    assert msg["Reply-To"] == FAN_FOUR
    assert msg["Auto-Submitted"] == "auto-replied"
    assert "Game night" in msg["Subject"] and FAN_FOUR in msg["Subject"]
    body = msg.get_payload(decode=True)
    assert isinstance(body, bytes)
    assert "Count me in, but I can only stay until nine." in body.decode()
    assert (await p.subscription(game.id, FAN_FOUR)).partstat == "NEEDS-ACTION"


async def test_html_only_reply_is_forwarded_as_text(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_FOUR)
    raw = (f"From: Fan Four <{FAN_FOUR}>\r\nTo: {game.rsvp(FAN_FOUR)}\r\n"
           "Subject: Re: Invitation: Game night\r\nDate: Sat, 21 Feb 2026 19:02:44 +0100\r\n"
           "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n"
           "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
           "<html><head><style>p {color: red}</style></head><body><div>Can I bring my =\r\n"
           "kids?&nbsp;They&#39;re 10 &amp; 12.</div><div><br></div><div>Fan</div>=\r\n"
           "</body></html>\r\n").encode()
    row = await p.deliver(game.rsvp(FAN_FOUR), raw, FAN_FOUR)
    assert row.status == "done" and "forwarded" in row.result
    [mail] = p.sink.messages
    body = mail.message.get_payload(decode=True)
    assert isinstance(body, bytes)
    text = body.decode()
    assert "Can I bring my kids? They're 10 & 12." in text and "color" not in text
    assert "<div>" not in text


OUT_OF_OFFICE = (
    "From: Fan Four <fan.four@example.com>\r\nTo: rsvp+{token}@invites.example.com\r\n"
    "Subject: Automatic reply: Invitation: Game night\r\n"
    "Date: Fri, 20 Feb 2026 16:00:00 +0000\r\nMessage-ID: <oof-{n}@example.com>\r\n"
    "{header}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    "I am out of the office until March 2nd.\r\n")


@pytest.mark.parametrize("header", ["Auto-Submitted: auto-replied", "X-Autoreply: yes",
                                    "Precedence: auto_reply"])
async def test_out_of_office_is_ignored(sqlite_pipeline: Pipeline, header: str) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_FOUR)
    raw = OUT_OF_OFFICE.format(token=game.tokens[FAN_FOUR], n=1, header=header).encode()
    row = await p.deliver(game.rsvp(FAN_FOUR), raw, FAN_FOUR)
    assert row.status == "ignored" and "automatic reply" in row.result
    assert p.sink.messages == []


# --------------------------------------------------------------------------------------------
# Unsubscribe and bounces


async def test_mail_to_unsubscribe_stops_all_mail(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)
    raw = (f"From: {FAN_ONE}\r\nTo: unsubscribe+{game.tokens[FAN_ONE]}@{DOMAIN}\r\n"
           "Subject: unsubscribe\r\n\r\n\r\n").encode()
    row = await p.deliver(f"unsubscribe+{game.tokens[FAN_ONE]}@{DOMAIN}", raw, FAN_ONE)
    assert row.status == "done" and "unsubscribed" in row.result
    assert (await p.attendees(game.id))[FAN_ONE]["status"] == "unsubscribed"

    await organizer_update(p, game, 1)
    assert [m.rcpt_tos for m in p.sink.invites()] == [[FAN_TWO]]
    p.sink.clear()
    # Not even a REFRESH brings mail back.
    row = await send_itip(p, game, FAN_ONE, itip("REFRESH", game, FAN_ONE), method="REFRESH")
    assert row.status == "ignored" and "unsubscribed" in row.result
    raw = organizer_mail("google", method="CANCEL", uid=ORG_UID, sequence=2,
                         dtstamp=datetime(2026, 2, 10, tzinfo=UTC), start=START,
                         end=START + timedelta(hours=3), summary="Game night", rrule=RRULE)
    await p.deliver(f"create@{DOMAIN}", raw, ORGANIZER)
    assert [m.rcpt_tos for m in p.sink.invites()] == [[FAN_TWO]]


def dsn(token: str, rcpt: str, action: str, status: str, diagnostic: str) -> bytes:
    """An RFC 3464 delivery status notification, as Postfix writes it, to bounce+TOKEN."""
    return (
        "From: MAILER-DAEMON@mx.example.com (Mail Delivery System)\r\n"
        f"To: bounce+{token}@{DOMAIN}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\n"
        "Date: Fri, 20 Feb 2026 16:00:00 +0000\r\n"
        "Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status;\r\n"
        "\tboundary=\"B0UND\"\r\n\r\n"
        "--B0UND\r\nContent-Description: Notification\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
        "This is the mail system at host mx.example.com.\r\n\r\n"
        "I'm sorry to have to inform you that your message could not\r\n"
        "be delivered to one or more recipients.\r\n\r\n"
        "--B0UND\r\nContent-Description: Delivery report\r\n"
        "Content-Type: message/delivery-status\r\n\r\n"
        "Reporting-MTA: dns; mx.example.com\r\n"
        "Arrival-Date: Fri, 20 Feb 2026 15:59:58 +0000\r\n\r\n"
        f"Final-Recipient: rfc822; {rcpt}\r\nOriginal-Recipient: rfc822;{rcpt}\r\n"
        f"Action: {action}\r\nStatus: {status}\r\n"
        f"Diagnostic-Code: smtp; {diagnostic}\r\n\r\n"
        "--B0UND\r\nContent-Description: Undelivered Message Headers\r\n"
        "Content-Type: text/rfc822-headers\r\n\r\n"
        f"From: Zach Lowe <rsvp+{token}@{DOMAIN}>\r\nTo: {rcpt}\r\n"
        "Subject: Invitation: Game night\r\n\r\n"
        "--B0UND--\r\n").encode()


async def test_hard_bounce_marks_the_subscription_bounced(pipeline: Pipeline) -> None:
    p = pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)
    token = game.tokens[FAN_ONE]
    row = await p.deliver(f"bounce+{token}@{DOMAIN}", dsn(
        token, FAN_ONE, "failed", "5.1.1",
        "550 5.1.1 <fan.one@example.com>: Recipient address rejected: User unknown"), "")
    assert row.status == "done" and "hard bounce (5.1.1)" in row.result
    people = await p.attendees(game.id)
    assert people[FAN_ONE]["status"] == "bounced" and people[FAN_TWO]["status"] == "active"

    await organizer_update(p, game, 1)
    assert [m.rcpt_tos for m in p.sink.invites()] == [[FAN_TWO]]


async def test_delayed_dsn_counts_a_soft_bounce(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    token = game.tokens[FAN_ONE]
    row = await p.deliver(f"bounce+{token}@{DOMAIN}", dsn(
        token, FAN_ONE, "delayed", "4.4.7", "451 4.4.7 Greylisted, try again later"), "")
    assert row.status == "done" and "soft bounce" in row.result
    sub = await p.subscription(game.id, FAN_ONE)
    assert sub.status == "active" and sub.soft_bounces == 1

    # A success report (NOTIFY=SUCCESS) is not a bounce at all.
    row = await p.deliver(f"bounce+{token}@{DOMAIN}", dsn(
        token, FAN_ONE, "delivered", "2.0.0", "250 2.0.0 Ok: queued"), "")
    assert row.status == "ignored" and "without failure" in row.result
    sub = await p.subscription(game.id, FAN_ONE)
    assert sub.status == "active" and sub.soft_bounces == 1


async def test_forged_tokens_are_refused_at_rcpt(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    sub = await p.subscription(game.id, FAN_ONE)
    forged = make_token(b"not the server secret", sub.id)
    assert forged != game.tokens[FAN_ONE]
    real = game.tokens[FAN_ONE]
    tampered = real[:15] + ("a" if real[15] != "a" else "b") + real[16:]  # inside the HMAC
    raw = load_fixture("outlook_reply_accept.eml", token=forged, uid=game.uid)
    inbox_before = len(await p.rows(models.InboxMessage))
    for rcpt in (f"rsvp+{forged}@{DOMAIN}", f"bounce+{forged}@{DOMAIN}",
                 f"unsubscribe+{forged}@{DOMAIN}", f"rsvp+{tampered}@{DOMAIN}",
                 f"rsvp+{real}x@{DOMAIN}", f"rsvp@{DOMAIN}", f"rsvp+{real}@other.example",
                 FAN_ONE):
        with pytest.raises(Refused) as refused:
            await p.send(rcpt, raw, FAN_ONE)
        assert refused.value.code == 550, rcpt
        assert "5.1.1" in refused.value.text
    assert len(await p.rows(models.InboxMessage)) == inbox_before  # nothing was accepted
    assert (await p.subscription(game.id, FAN_ONE)).partstat == "NEEDS-ACTION"


async def test_a_reply_answers_for_one_person_only(sqlite_pipeline: Pipeline,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """RFC 5546: one ATTENDEE per REPLY. A REPLY to a subscriber's address listing thirty
    strangers records one answer and subscribes nobody else; and one subscriber's forwarded
    invite signs up at most attendee.MAX_FORWARDS people."""
    from ciserver.services import attendee

    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    strangers = [f"victim{i}@example.org" for i in range(30)]
    ical = itip("REPLY", game, FAN_ONE, partstat="ACCEPTED", attendee=strangers[0])
    extra = "".join(f"ATTENDEE;PARTSTAT=ACCEPTED:mailto:{s}\r\n" for s in strangers[1:])
    ical = ical.replace("SUMMARY:Game night", extra + "SUMMARY:Game night")
    row = await send_itip(p, game, FAN_ONE, ical)
    assert row.status == "done" and "only the answer of victim0@example.org" in row.result
    people = await p.attendees(game.id)
    assert sorted(people) == [FAN_ONE, "victim0@example.org"]

    # the subscriber among many: their own answer, nobody else's
    ical = itip("REPLY", game, FAN_ONE, partstat="DECLINED", attendee=strangers[5],
                sequence=0, dtstamp=datetime(2026, 2, 21, tzinfo=UTC))
    ical = ical.replace("SUMMARY:Game night",
                        f"ATTENDEE;PARTSTAT=DECLINED:mailto:{FAN_ONE}\r\nSUMMARY:Game night")
    row = await send_itip(p, game, FAN_ONE, ical)
    assert row.status == "done", row.result
    people = await p.attendees(game.id)
    assert sorted(people) == [FAN_ONE, "victim0@example.org"]
    assert people[FAN_ONE]["rsvp"] == "N"

    # forwards, one message each: at most MAX_FORWARDS people per subscriber
    monkeypatch.setattr(attendee, "MAX_FORWARDS", 3)
    for friend in ("f1@example.net", "f2@example.net", "f3@example.net"):
        row = await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE,
                                                     partstat="TENTATIVE", attendee=friend))
    assert row.status == "ignored" and "signed up 3 people already" in row.result
    assert sorted(await p.attendees(game.id)) == [
        "f1@example.net", "f2@example.net", FAN_ONE, "victim0@example.org"]


async def test_an_unknown_partstat_is_no_answer(sqlite_pipeline: Pipeline) -> None:
    """RFC 5545 3.2.12: PARTSTAT=X-FOO counts as NEEDS-ACTION, which is no answer: the Yes
    recorded before stays."""
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    row = await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE, partstat="ACCEPTED"))
    assert row.status == "done", row.result
    for partstat in ("X-FOO", "NEEDS-ACTION"):
        row = await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE,
                                                     partstat=partstat))
        assert row.status == "ignored" and "is not an answer" in row.result, row.result
    assert (await p.attendees(game.id))[FAN_ONE]["rsvp"] == "Y"


async def test_an_answer_after_the_cancel_is_late(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)
    await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE, partstat="DECLINED"))
    raw = organizer_mail("google", method="CANCEL", uid=ORG_UID, sequence=1,
                         dtstamp=datetime(2026, 2, 10, tzinfo=UTC), start=START,
                         end=START + timedelta(hours=3), summary="Game night", rrule=RRULE)
    assert (await p.deliver(f"create@{DOMAIN}", raw, ORGANIZER)).status == "done"
    for fan in (FAN_ONE, FAN_TWO):
        row = await send_itip(p, game, fan, itip("REPLY", game, fan, partstat="ACCEPTED",
                                                 sequence=1))
        assert row.status == "done" and "late answer ACCEPTED" in row.result, row.result
    people = await p.attendees(game.id)
    assert people[FAN_ONE]["rsvp"] == "N" and people[FAN_TWO]["rsvp"] is None
    assert ("", "ACCEPTED", "late") in await history(p, game, FAN_TWO)


async def test_a_plain_reply_from_someone_else_names_its_writer(
        sqlite_pipeline: Pipeline) -> None:
    """A colleague the invite was forwarded to writes to the subscriber's address: the
    organizer sees who wrote, and answering reaches the writer."""
    p = sqlite_pipeline
    game = await game_night(p, FAN_FOUR)
    raw = plain_reply(game, FAN_FOUR, "Jana Kolleg <j@example.de>",
                      "Re: Invitation: Game night", "Is there parking?")
    row = await p.deliver(game.rsvp(FAN_FOUR), raw, "j@example.de")
    assert row.status == "done" and "from j@example.de forwarded" in row.result, row.result
    msg, text = forwarded_text(p)
    assert msg["Reply-To"] == "j@example.de" and "j@example.de" in msg["Subject"]
    assert "Jana Kolleg <j@example.de> (to fan.four@example.com's invite address)" in text
    assert "Is there parking?" in text


async def test_later_invites_keep_each_occurrences_own_answer(pipeline: Pipeline) -> None:
    """Yes to the series, No to one game: when the organizer moves that game, the update's
    override VEVENT carries DECLINED (the calendar must not show it accepted again), the
    series ACCEPTED; a fan who answered no occurrence gets the series' answer in both."""
    p = pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)
    rid = "RECURRENCE-ID;TZID=America/New_York:20260311T190000"
    for fan in (FAN_ONE, FAN_TWO):
        await send_itip(p, game, fan, itip("REPLY", game, fan, partstat="ACCEPTED"))
    await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE, partstat="DECLINED",
                                           rid=rid))
    p.sink.clear()
    second = datetime(2026, 3, 11, 23, 0, tzinfo=UTC)
    raw = organizer_mail("google", uid=ORG_UID, sequence=1,
                         dtstamp=datetime(2026, 2, 20, tzinfo=UTC),
                         start=second + timedelta(hours=1),
                         end=second + timedelta(hours=4), summary="Game night (late start)",
                         recurrence_id=second)
    row = await p.deliver(f"create@{DOMAIN}", raw, ORGANIZER)
    assert row.status == "done" and "updated event" in row.result, row.result
    for fan, expected in ((FAN_ONE, "DECLINED"), (FAN_TWO, "ACCEPTED")):
        [msg] = mail_to(p, fan)
        evs = Calendar.from_ical(msg.calendar()).walk("VEVENT")
        master = next(e for e in evs if "RECURRENCE-ID" not in e)
        override = next(e for e in evs if "RECURRENCE-ID" in e)
        assert master["ATTENDEE"].params["PARTSTAT"] == "ACCEPTED", fan
        assert override["ATTENDEE"].params["PARTSTAT"] == expected, fan


@pytest.mark.parametrize("attendee", [
    "ATTENDEE;CN=Fan One;EMAIL={fan};PARTSTAT=ACCEPTED:urn:uuid:0b5e8f1c-1f0e-4a53-9d6e-2f6a",
    'ATTENDEE;CN=Fan One;EMAIL="{fan}";PARTSTAT=ACCEPTED:urn:uuid:0b5e8f1c-1f0e-4a53-9d6e',
    "ATTENDEE;PARTSTAT=ACCEPTED:mailto:{escaped}",
])
async def test_apple_style_attendee_values_are_understood(sqlite_pipeline: Pipeline,
                                                          attendee: str) -> None:
    """Apple's servers may name the attendee by a urn:uuid with the address in the EMAIL
    parameter (RFC 7986); a mailto: URI may percent-escape its @."""
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    line = attendee.format(fan=FAN_ONE, escaped=FAN_ONE.replace("@", "%40"))
    ical = itip("REPLY", game, FAN_ONE, partstat="ACCEPTED")
    ical = "\r\n".join(line if x.startswith("ATTENDEE") else x for x in ical.split("\r\n"))
    row = await send_itip(p, game, FAN_ONE, ical)
    assert row.status == "done" and f"{FAN_ONE} answered ACCEPTED" in row.result, row.result
    assert (await p.attendees(game.id))[FAN_ONE]["rsvp"] == "Y"


async def test_an_answer_for_no_occurrence_is_not_counted(sqlite_pipeline: Pipeline) -> None:
    """RECURRENCE-ID of a time the series never has (a typo, a stale or forged reply): no
    row of its own in the report; real occurrences, before and after DST, still count."""
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    for rid, counted in (("RECURRENCE-ID:20260310T020000Z", False),
                         ("RECURRENCE-ID;TZID=America/New_York:20260304T190000", True),
                         ("RECURRENCE-ID:20260311T230000Z", True),
                         ("RECURRENCE-ID:20260401T230000Z", False)):  # after COUNT=4
        row = await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE,
                                                     partstat="DECLINED", rid=rid))
        assert ("no occurrence of this event" in row.result) != counted, (rid, row.result)
    report = await p.report(game.id)
    assert sorted(r["occurrence"] for r in report if r["occurrence"]) == [
        "2026-03-05T00:00:00Z", "2026-03-11T23:00:00Z"]


def test_is_occurrence() -> None:
    from ciserver.itip import content as content_mod

    def stored(*lines: str) -> str:
        return "\r\n".join(["BEGIN:VCALENDAR", "VERSION:2.0", "BEGIN:VEVENT", "UID:content",
                            *lines, "END:VEVENT", "END:VCALENDAR", ""])

    weekly = stored("DTSTART;TZID=America/New_York:20260304T190000",
                    "RRULE:FREQ=WEEKLY;COUNT=4", "EXDATE;TZID=America/New_York:20260318T190000")
    assert content_mod.is_occurrence(weekly, "2026-03-05T00:00:00Z")
    assert content_mod.is_occurrence(weekly, "2026-03-11T23:00:00Z")  # after the DST change
    assert not content_mod.is_occurrence(weekly, "2026-03-19T00:00:00Z")  # EXDATE, 23:00Z
    assert not content_mod.is_occurrence(weekly, "2026-03-18T23:00:00Z")
    assert not content_mod.is_occurrence(weekly, "2026-03-12T00:00:00Z")
    daily = stored("DTSTART;VALUE=DATE:20260301", "RRULE:FREQ=DAILY")
    assert content_mod.is_occurrence(daily, "2027-01-01")
    assert content_mod.is_occurrence(daily, "2027-01-01T10:00:00Z")  # mixed forms: kept
    single = stored("DTSTART:20260301T100000Z")
    assert content_mod.is_occurrence(single, "2026-03-01T10:00:00Z")
    assert not content_mod.is_occurrence(single, "2026-03-02T10:00:00Z")


async def test_raw_utf8_headers_reach_the_organizer_readable(sqlite_pipeline: Pipeline) -> None:
    """SMTPUTF8 mail carries raw UTF-8 in its headers: the forwarded text has the subject as
    written, not a row of replacement characters."""
    p = sqlite_pipeline
    game = await game_night(p, FAN_FOUR)
    raw = plain_reply(game, FAN_FOUR, f"Fan Four <{FAN_FOUR}>", "Grüße aus Köln",
                      "Bis bald!")
    row = await p.deliver(game.rsvp(FAN_FOUR), raw, FAN_FOUR)
    assert row.status == "done", row.result
    _, text = forwarded_text(p)
    assert "Subject: Grüße aus Köln" in text and "\ufffd" not in text


async def test_unreadable_calendar_data_from_a_customer_is_rejected(
        sqlite_pipeline: Pipeline) -> None:
    """A customer's client sends broken iCalendar: `rejected` with the reason (bad input),
    not `failed`, which is for what the operator must look at."""
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE)
    broken = itip("REPLY", game, FAN_ONE, partstat="ACCEPTED").replace("END:VCALENDAR\r\n", "")
    broken = broken.replace("END:VEVENT\r\n", "")
    row = await send_itip(p, game, FAN_ONE, broken)
    assert row.status == "rejected" and "calendar data" in row.result, (row.status, row.result)
    assert row.error == ""
    assert (await p.attendees(game.id))[FAN_ONE]["rsvp"] is None
