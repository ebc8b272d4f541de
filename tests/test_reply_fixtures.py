"""Our own REPLY fixtures (tests/data/*.eml), shaped like Outlook, Google and Apple replies,
read by mime.extract and parse.parse_parts after placeholder substitution."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

try:
    from fixtures import DATA_DIR, load_fixture
except ImportError:  # tests/ became a package
    from tests.fixtures import DATA_DIR, load_fixture

from ciserver.itip.mime import extract
from ciserver.itip.parse import parse_parts

# 26 characters of lower-case base32, the shape addresses.make_token gives.
TOKEN = "gezdgnbvgy3tqojqgezdgnbvgy"
UID = "evt-20260304-gamenight@invites.example.com"
SEQUENCE = 3
ORGANIZER = f"rsvp+{TOKEN}@invites.example.com"


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0, s: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, s, tzinfo=UTC)


@dataclass(frozen=True)
class Reply:
    header_method: str | None  # Content-Type method= of the calendar part
    from_addr: str
    attendee: str  # lower-cased, without mailto:
    partstat: str
    person_comment: str = ""  # Google: ATTENDEE;X-RESPONSE-COMMENT
    comment: str = ""  # Outlook: COMMENT
    recurrence_id: str = ""
    start: datetime | None = None
    organizer: bool = True  # Outlook replies have no ORGANIZER
    sequence: int | None = SEQUENCE  # Outlook replies have no SEQUENCE
    dtstamp: datetime | None = None  # Outlook replies have no DTSTAMP
    reply_time: datetime | None = None  # X-MICROSOFT-CDO-REPLYTIME
    summary: str = "Game night"


# Game night: weekly on Wednesdays 19:00 America/New_York from 2026-03-04 (EST, -0500,
# = 2026-03-05T00:00Z); US DST starts 2026-03-08, so 2026-03-11 19:00 EDT = 23:00Z.
FIXTURES: dict[str, Reply] = {
    # Eastern Standard Time 1601 VTIMEZONE: 2026-03-04 19:00 EST = 00:00Z.
    "outlook_reply_accept.eml": Reply(
        "REPLY",
        "fan.one@example.com",
        "fan.one@example.com",
        "ACCEPTED",
        comment="Bringing snacks, see you there!",
        start=utc(2026, 3, 5),
        organizer=False,
        sequence=None,
        reply_time=utc(2026, 2, 20, 10, 15, 30),
        summary="Accepted: Game night",
    ),
    # The same instant in W. Europe Standard Time: 2026-03-05 01:00 CET = 00:00Z.
    "outlook_reply_forwarded.eml": Reply(
        "REPLY",
        "friend.two@example.org",
        "friend.two@example.org",
        "ACCEPTED",
        start=utc(2026, 3, 5),
        organizer=False,
        sequence=None,
        reply_time=utc(2026, 2, 21, 8, 30, 2),
        summary="Accepted: Game night",
    ),
    "google_reply_tentative.eml": Reply(
        "REPLY",
        "fan.two@gmail.com",
        "fan.two@gmail.com",
        "TENTATIVE",
        person_comment="Might be late",
        start=utc(2026, 3, 5),
        dtstamp=utc(2026, 2, 20, 15, 30),
    ),
    # RECURRENCE-ID;TZID=America/New_York:20260304T190000 = 2026-03-05T00:00Z.
    "google_reply_declined_occurrence.eml": Reply(
        "REPLY",
        "fan.two@gmail.com",
        "fan.two@gmail.com",
        "DECLINED",
        recurrence_id="2026-03-05T00:00:00Z",
        start=utc(2026, 3, 5),
        dtstamp=utc(2026, 2, 22, 9, 15),
    ),
    # No method= parameter: METHOD:REPLY comes from the body. Sent from iCloud.
    "apple_reply_accept.eml": Reply(
        None,
        "fan3@icloud.com",
        "fan.three@example.net",
        "ACCEPTED",
        start=utc(2026, 3, 5),
        dtstamp=utc(2026, 2, 20, 17, 12, 11),
    ),
    # RECURRENCE-ID:20260311T230000Z; DTSTART 2026-03-11 19:00 EDT = 23:00Z.
    "apple_reply_declined_utc_occurrence.eml": Reply(
        None,
        "fan3@icloud.com",
        "fan.three@example.net",
        "DECLINED",
        recurrence_id="2026-03-11T23:00:00Z",
        start=utc(2026, 3, 11, 23),
        dtstamp=utc(2026, 2, 24, 8, 3, 1),
    ),
}
PLAIN = "plain_reply_no_calendar.eml"


def load(name: str) -> bytes:
    return load_fixture(name, token=TOKEN, uid=UID, sequence=SEQUENCE)


def test_fixtures_exist() -> None:
    assert set(FIXTURES) | {PLAIN} <= {p.name for p in DATA_DIR.glob("*.eml")}


@pytest.mark.parametrize("name", [*FIXTURES, PLAIN])
def test_load_fixture_substitutes_and_uses_crlf(name: str) -> None:
    raw = load(name)
    assert b"{{" not in raw and b"}}" not in raw
    assert raw.count(b"\n") == raw.count(b"\r\n"), "every line must end in CRLF"
    assert f"rsvp+{TOKEN}@invites.example.com".encode() in raw  # the To: header
    for part in extract(raw).parts:  # also inside base64 and quoted-printable bodies
        assert "{{" not in part.text
        assert f"UID:{UID}" in part.text
        assert f"SEQUENCE:{SEQUENCE}" in part.text  # Outlook: X-MICROSOFT-CDO-APPT-SEQUENCE
        if "ORGANIZER" in part.text:
            assert f"mailto:rsvp+{TOKEN}@invites.example.com" in part.text


def test_load_fixture_defaults_and_unknown_placeholder() -> None:
    raw = load_fixture("google_reply_tentative.eml")
    (obj,) = parse_parts(extract(raw).parts)
    assert obj.uid == "PLACEHOLDER-UID@invites.example.com"
    with pytest.raises(TypeError):
        load_fixture("google_reply_tentative.eml", tokn="x")


@pytest.mark.parametrize(("name", "exp"), list(FIXTURES.items()), ids=list(FIXTURES))
def test_reply_fixture(name: str, exp: Reply) -> None:
    ex = extract(load(name))
    assert not ex.is_dsn and not ex.has_tnef
    assert ex.from_addr == exp.from_addr
    assert ex.parts, "no calendar part found"
    assert {p.header_method for p in ex.parts} == {exp.header_method}

    objects = parse_parts(ex.parts)
    assert [o.uid for o in objects] == [UID], "each UID exactly once"
    obj = objects[0]
    assert obj.method == "REPLY"
    assert len(obj.components) == 1
    comp = obj.components[0]

    assert len(comp.attendees) == 1
    person = comp.attendees[0]
    assert person.email == exp.attendee
    assert person.partstat == exp.partstat
    assert person.comment == exp.person_comment
    assert comp.comment == exp.comment
    assert comp.summary == exp.summary

    assert comp.recurrence_id == exp.recurrence_id
    if exp.recurrence_id:
        assert obj.master is None and obj.overrides == [comp]
    else:
        assert obj.master is comp
    assert comp.start_utc == exp.start

    if exp.organizer:
        assert comp.organizer is not None
        # Addresses are compared case-insensitively, so parse lower-cases them.
        assert comp.organizer.email == ORGANIZER.lower()
    else:
        assert comp.organizer is None
    assert comp.sequence == exp.sequence
    assert comp.dtstamp == exp.dtstamp
    assert comp.reply_time == exp.reply_time


def test_outlook_reply_quirks() -> None:
    raw = load("outlook_reply_accept.eml")
    (part,) = extract(raw).parts
    assert "MAILTO:FAN.ONE@Example.COM" in part.text  # upper-case MAILTO:, mixed-case address
    assert "\r\n" in part.text  # base64 body with CRLF line ends
    assert "ORGANIZER" not in part.text and "DTSTAMP" not in part.text
    assert "\nSEQUENCE" not in part.text
    assert "PRODID:Microsoft Exchange Server 2010" in part.text
    assert "TZID:Eastern Standard Time" in part.text


def test_forwarded_reply_names_another_attendee() -> None:
    (obj,) = parse_parts(extract(load("outlook_reply_forwarded.eml")).parts)
    (person,) = obj.first.attendees
    assert person.email == "friend.two@example.org" != "fan.one@example.com"


@pytest.mark.parametrize(
    "name", ["google_reply_tentative.eml", "google_reply_declined_occurrence.eml"]
)
def test_google_sends_two_copies_one_uid(name: str) -> None:
    raw = load(name)
    assert b'Content-Type: text/calendar; charset="UTF-8"; method=REPLY' in raw
    assert b'Content-Type: application/ics; name="invite.ics"' in raw
    objects = parse_parts(extract(raw).parts)
    assert [o.uid for o in objects] == [UID]


def test_apple_reply_comes_from_another_account() -> None:
    ex = extract(load("apple_reply_accept.eml"))
    (part,) = ex.parts
    assert part.header_method is None and part.content_type == "text/calendar"
    (obj,) = parse_parts(ex.parts)
    assert obj.method == "REPLY"
    assert ex.from_addr != obj.first.attendees[0].email


def test_plain_reply_has_no_calendar_part() -> None:
    ex = extract(load(PLAIN))
    assert ex.parts == []
    assert parse_parts(ex.parts) == []
    assert not ex.is_dsn and not ex.auto_reply
    assert "Count me in" in ex.text_body
    assert ex.from_addr == "fan.four@example.com"
