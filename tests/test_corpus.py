"""Every file of the real-client iMIP corpus (../shared/corpus, see its INDEX.md) through
mime.extract and parse.parse_parts.

The expectations below were worked out by hand from each file: METHOD, UID, DSN or not,
and the start instant in UTC from DTSTART and its zone (the message's own VTIMEZONE, a
Windows zone name, an IANA name, or UTC). They were not copied from the code's output.
A file added to the corpus without a row here fails ``test_every_corpus_file_is_covered``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

try:  # importing tests/fixtures.py also makes ``ciserver`` importable
    import fixtures  # noqa: F401
except ImportError:  # tests/ became a package
    import tests.fixtures  # noqa: F401

from ciserver.itip.mime import CalendarPart, Extraction, body_method, extract
from ciserver.itip.parse import ItipObject, parse_parts

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
INVITE_METHODS = {"REQUEST", "CANCEL"}


def utc(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> datetime:
    return datetime(y, mo, d, h, mi, tzinfo=UTC)


@dataclass(frozen=True)
class Expect:
    # METHOD of the message: the calendar body's, else the Content-Type method= parameter;
    # None when the message carries no calendar data at all (or is a DSN), "" when the
    # calendar data has no METHOD anywhere.
    method: str | None
    # UID of the one object in the message; None when there is no VEVENT.
    uid: str | None
    # True when the message is an invite (REQUEST or CANCEL) the pipeline must accept.
    invite: bool
    dsn: bool = False
    # Start of the (first) VEVENT: a UTC instant, a date for all-day events, None when the
    # VEVENT has no DTSTART.
    start: datetime | date | None = None
    # RECURRENCE-ID key of that VEVENT ("" for a master).
    rid: str = ""
    # Number of calendar parts extract() keeps (copies with identical text count once).
    parts: int = 1


NO_CALENDAR = Expect(method=None, uid=None, invite=False, parts=0)
DSN = Expect(method=None, uid=None, invite=False, dsn=True, parts=0)

# Outlook/Exchange GOIDs are folded in the files; the two halves are the two physical lines.
OUTLOOK_TEST_UID = (
    "030000008200E00074C5B7101A82E0080000000060B608D090DDD701000000000000000"
    "0100000004BE0CFFA54BCF64E956E34143362C3C0"
)
TEAMS_UID = (
    "056000008200E00074C5B7101A82E008000000001AF84C64CBC8D601000000000000000"
    "010000000403B5AC10A0EB444A947D2B499A4B98C"
)
CCS_UID = "1E71F9C8-AEDA-48EB-98D0-76E898F6BB5C"
TB_UID = "02e79b96"
KOLAB_UID = "626421779C777FBE9C9B85A80D04DDFA-A4BF5BBB9FEAA271"

EXPECTED: dict[str, Expect] = {
    # --- apple/ccs-calendarserver -----------------------------------------------------
    "ccs-calendarserver__dsn_failure_no_ics.eml": DSN,
    "ccs-calendarserver__dsn_failure_no_original.eml": DSN,
    # The bounced invite (REQUEST, US/Pacific 09:45 PDT) must never be seen.
    "ccs-calendarserver__dsn_failure_with_ics.eml": DSN,
    # REPLY, text/calendar without method=; DTSTART;TZID=US/Pacific:20080812T100000, the
    # VTIMEZONE's DAYLIGHT rule (2nd Sunday of March .. 1st Sunday of November) gives
    # -0700: 10:00 PDT = 17:00Z.
    "ccs-calendarserver__good_reply.eml": Expect(
        "REPLY", CCS_UID, False, start=utc(2008, 8, 12, 17)
    ),
    "ccs-calendarserver__good_reply_future.eml": Expect(
        "REPLY", CCS_UID, False, start=utc(2008, 8, 12, 17)
    ),
    "ccs-calendarserver__good_reply_past.eml": Expect(
        "REPLY", CCS_UID, False, start=utc(2008, 8, 12, 17)
    ),
    "ccs-calendarserver__reply_missing_attachment.eml": NO_CALENDAR,
    "ccs-calendarserver__reply_missing_attendee.eml": Expect(
        "REPLY", CCS_UID, False, start=utc(2008, 8, 12, 17)
    ),
    "ccs-calendarserver__reply_missing_organizer.eml": Expect(
        "REPLY", CCS_UID, False, start=utc(2008, 8, 12, 17)
    ),
    # --- mozilla/releases-comm-central ------------------------------------------------
    # CANCEL of the series; the file has no DTSTART (only an X-NOTE about it).
    "comm-central__cancel-repeat-event.eml": Expect("CANCEL", TB_UID, True, start=None),
    "comm-central__cancel-single-event.eml": Expect(
        "CANCEL", TB_UID, True, start=utc(2022, 3, 16, 11)
    ),
    "comm-central__event-with-file-attachment.eml": Expect(
        "REQUEST", "02e79b96-file", True, start=utc(2022, 3, 16, 11)
    ),
    # Only an override, no master: DTSTART 05:00Z, RECURRENCE-ID 20220317T110000Z.
    "comm-central__exception-major.eml": Expect(
        "REQUEST", TB_UID, True, start=utc(2022, 3, 17, 5), rid="2022-03-17T11:00:00Z"
    ),
    "comm-central__exception-minor.eml": Expect(
        "REQUEST", TB_UID, True, start=utc(2022, 3, 17, 11), rid="2022-03-17T11:00:00Z"
    ),
    # No METHOD property, only method="REQUEST" on the text/calendar part (the identical
    # *.ics text/plain copy is folded into it). TZID "FLE" without VTIMEZONE = Windows
    # "FLE Standard Time" = Europe/Kiev; 2021-10-26 is before the last Sunday of October
    # (31st), so EEST +0300: 09:00 local = 06:00Z.
    "comm-central__ext-messages-invite.eml": Expect(
        "REQUEST", "36138BFC6A7B03EFC2258776003DB5C5", True, start=utc(2021, 10, 26, 6)
    ),
    # Google: text/calendar (QP) and application/ics (base64) copies, both DTSTART in UTC.
    "comm-central__meet-meeting-invite.eml": Expect(
        "REQUEST",
        "65m17hsdolmotv3kvmrtg40ont@google.com",
        True,
        start=utc(2021, 3, 22, 9, 30),
        parts=2,
    ),
    # PUBLISH booking confirmation (base64, TeXt/CaLeNdAr): not an invite.
    "comm-central__message-containing-event.eml": Expect(
        "PUBLISH", "20160824T204000Z-568860280@example.com", False, start=utc(2016, 9, 1, 6, 25)
    ),
    # PUBLISH, no method= parameter: not an invite. Europe/Helsinki VTIMEZONE: 2021-11-29 is
    # after the last Sunday of October, EET +0200: 10:55 local = 08:55Z.
    "comm-central__message-non-invite.eml": Expect(
        "PUBLISH",
        "1e5fd4e6-bc52-439c-ac76-40da54f57c77@secure.example.com",
        False,
        start=utc(2021, 11, 29, 8, 55),
    ),
    # Exchange "FLE Standard Time", 1601 VTIMEZONE: STANDARD +0200 from the last Sunday of
    # October 04:00, DAYLIGHT +0300 from the last Sunday of March 03:00. 2021-11-27 is
    # standard time: 09:00 local = 07:00Z.
    "comm-central__outlook-test-invite.eml": Expect(
        "REQUEST", OUTLOOK_TEST_UID, True, start=utc(2021, 11, 27, 7)
    ),
    "comm-central__repeat-event.eml": Expect("REQUEST", TB_UID, True, start=utc(2022, 3, 16, 11)),
    "comm-central__repeat-update-major.eml": Expect(
        "REQUEST", TB_UID, True, start=utc(2022, 3, 16, 5)
    ),
    "comm-central__repeat-update-minor.eml": Expect(
        "REQUEST", TB_UID, True, start=utc(2022, 3, 16, 11)
    ),
    "comm-central__single-event.eml": Expect("REQUEST", TB_UID, True, start=utc(2022, 3, 16, 11)),
    # Same FLE 1601 VTIMEZONE; 2020-12-02 is standard time (+0200): 19:00 local = 17:00Z.
    "comm-central__teams-meeting-invite.eml": Expect(
        "REQUEST", TEAMS_UID, True, start=utc(2020, 12, 2, 17)
    ),
    "comm-central__update-major.eml": Expect("REQUEST", TB_UID, True, start=utc(2022, 3, 16, 5)),
    "comm-central__update-minor.eml": Expect("REQUEST", TB_UID, True, start=utc(2022, 3, 16, 11)),
    # --- collective/icalendar (bare .ics) ---------------------------------------------
    # A bare VEVENT without VCALENDAR and without METHOD: not an invite.
    "icalendar__issue_101_icalendar_chokes_on_umlauts_in_organizer.ics": Expect(
        "", "20130416112341.10064jz0k4j7uem8@acmenet.de", False, start=utc(2013, 4, 16, 10)
    ),
    # REQUEST without UID (so the UID is ""); zone "GMT +0100 (Standard) / GMT +0200
    # (Daylight)" with 1601 rules (last Sunday of March .. last Sunday of October): July is
    # +0200, 10:00 local = 08:00Z.
    "icalendar__issue_165_missing_event.ics": Expect("REQUEST", "", True, start=utc(2015, 7, 3, 8)),
    # DavMail VFREEBUSY REPLY (UID:null): no VEVENT, so no object.
    "icalendar__issue_27_multiple_periods_in_freebusy_one_freebusy.ics": Expect(
        "REPLY", None, False
    ),
    "icalendar__issue_350.ics": Expect(
        "REQUEST", "20055546456446", True, start=utc(2022, 2, 22, 18, 30)
    ),
    # PUBLISH; "Eastern Standard Time" 1601 VTIMEZONE: DST until the 1st Sunday of November
    # (2024-11-03), so 2024-10-28 17:00 is EDT -0400 = 21:00Z.
    "icalendar__issue_836_do_not_quote_tzid.ics": Expect(
        "PUBLISH", "minimal-demo-event-est-20241028@example.com", False, start=utc(2024, 10, 28, 21)
    ),
    # All-day: DTSTART;VALUE=DATE:20120814.
    "icalendar__property_params.ics": Expect(
        "REQUEST", "XRIMCAL-628059586-522954492-9750559", True, start=date(2012, 8, 14)
    ),
    # "Pacific Standard Time", STANDARD and DAYLIGHT both DTSTART 16010101T020000; DST from
    # the 2nd Sunday of March (2017-03-12), so 2017-02-24 12:00 is PST -0800 = 20:00Z.
    "icalendar__timezone_same_start.ics": Expect(
        "REQUEST",
        "040000008200E00074C5B7101A82E0080000000090E19664858ED20100000000000000",
        True,
        start=utc(2017, 2, 24, 20),
    ),
    # --- nextcloud/mail -------------------------------------------------------------
    # Europe/Berlin, February = CET +0100: 19:00 local = 18:00Z.
    "nextcloud-mail__request_google.txt": Expect(
        "REQUEST", "69d4c40b4a274636bf23517938df9673@example.org", True, start=utc(2025, 2, 20, 18)
    ),
    # "W. Europe Standard Time" 1601 VTIMEZONE, February = +0100: 08:00 local = 07:00Z.
    "nextcloud-mail__request_outlook_com.txt": Expect(
        "REQUEST", "1F0BD3F6FEFC421AAA5BE992D6992B6A", True, start=utc(2025, 2, 26, 7)
    ),
    # --- sicherha/pykolab ------------------------------------------------------------
    # Europe/London (no VTIMEZONE), July = BST +0100: 10:00 local = 09:00Z.
    "pykolab__itip_application_ics.eml": Expect(
        "REQUEST", KOLAB_UID, True, start=utc(2012, 7, 13, 9)
    ),
    "pykolab__itip_empty.eml": NO_CALENDAR,
    # Google: text/calendar and application/ics copies (they differ in ATTENDEEs). UTC.
    "pykolab__itip_google_multipart.eml": Expect(
        "REQUEST", "0BE2F640-5814-47C9-ABAE-E7E959204E76", True, start=utc(2014, 2, 24, 11), parts=2
    ),
    "pykolab__itip_multipart.eml": Expect("REQUEST", KOLAB_UID, True, start=utc(2012, 7, 13, 9)),
    "pykolab__itip_non_multipart.eml": Expect(
        "REQUEST", KOLAB_UID, True, start=utc(2012, 7, 13, 9)
    ),
    "pykolab__itip_recurring.eml": Expect(
        "REQUEST", "dbdb8baeedacae836230e3436fd-5e83dd24cf92", True, start=utc(2012, 7, 9, 9)
    ),
    # TZID "W. Europe Standard Time" without VTIMEZONE = Europe/Berlin; July = CEST +0200:
    # 10:00 local = 08:00Z.
    "pykolab__itip_unicode.eml": Expect(
        "REQUEST", "eea25142-fb1c-4831-a02d-ac9fb4c16b70", True, start=utc(2014, 7, 13, 8)
    ),
    # --- sabre-io/vobject (bare .ics, stored calendar objects without METHOD) ----------
    # America/Toronto VTIMEZONE, August = EDT -0400: 18:00 local = 22:00Z.
    "sabre-vobject__EvolutionTest_apple_attendee_modify.ics": Expect(
        "", "20140813T212317Z-6646-1000-1221-23@evert-ubuntu", False, start=utc(2014, 8, 13, 22)
    ),
    # Evolution's /freeassociation.sourceforge.net/Tzfile/America/Toronto; its 2014 rules:
    # EDT from 2014-03-09 to 2014-11-02, so 11:00 local = 15:00Z.
    "sabre-vobject__EvolutionTest_evolution_event.ics": Expect(
        "", "20140813T153116Z-12176-1000-1065-6@johnny-lubuntu", False, start=utc(2014, 8, 15, 15)
    ),
}

# Rows whose expectation the code does not meet (a genuine bug, reported): name -> reason.
# Each becomes a strict xfail, so the row turns red once the code is fixed.
KNOWN_BUGS: dict[str, str] = {}

# Messages that carry the same invite twice (Google: text/calendar + application/ics).
TWO_COPIES = ("comm-central__meet-meeting-invite.eml", "pykolab__itip_google_multipart.eml")


def corpus_dir() -> Path:
    if not CORPUS.is_dir():
        pytest.skip(
            f"iMIP corpus not found at {CORPUS} (it lives in ../shared/corpus beside the "
            "checkout and is not part of the repository)"
        )
    return CORPUS


def load(name: str) -> tuple[Extraction | None, list[CalendarPart]]:
    path = corpus_dir() / name
    if path.suffix == ".ics":
        return None, [CalendarPart(path.read_bytes().decode("utf-8"), None, "text/calendar")]
    ex = extract(path.read_bytes())
    return ex, ex.parts


def message_method(parts: list[CalendarPart]) -> str | None:
    if not parts:
        return None
    methods = {body_method(p.text) or (p.header_method or "") for p in parts}
    assert len(methods) == 1, f"copies disagree on METHOD: {methods}"
    return methods.pop()


def is_invite(objects: list[ItipObject]) -> bool:
    return any(o.method in INVITE_METHODS for o in objects)


def test_every_corpus_file_is_covered() -> None:
    present = {p.name for p in corpus_dir().iterdir() if p.is_file() and p.name != "INDEX.md"}
    unknown = sorted(present - EXPECTED.keys())
    missing = sorted(EXPECTED.keys() - present)
    assert not unknown, f"corpus files without a row in EXPECTED (add one): {unknown}"
    assert not missing, f"rows in EXPECTED for files no longer in the corpus: {missing}"


def _rows() -> list[object]:
    rows: list[object] = []
    for name, exp in EXPECTED.items():
        marks = (
            [pytest.mark.xfail(reason=KNOWN_BUGS[name], strict=True)] if name in KNOWN_BUGS else []
        )
        rows.append(pytest.param(name, exp, id=name, marks=marks))
    return rows


@pytest.mark.parametrize(("name", "exp"), _rows())
def test_corpus_file(name: str, exp: Expect) -> None:
    ex, parts = load(name)
    if ex is not None:
        assert ex.is_dsn is exp.dsn
    if exp.dsn:
        assert parts == [], "a bounce must not yield calendar parts"
    assert len(parts) == exp.parts

    objects = parse_parts(parts)
    assert message_method(parts) == exp.method
    assert is_invite(objects) is exp.invite
    for obj in objects:
        assert obj.method == (exp.method or "")

    if exp.uid is None:
        assert objects == []
        return
    assert [o.uid for o in objects] == [exp.uid]
    obj = objects[0]
    assert len(obj.components) == 1
    comp = obj.components[0]
    assert comp.recurrence_id == exp.rid
    if exp.rid:
        assert obj.master is None and obj.overrides == [comp]

    if exp.start is None:
        assert comp.start is None
    elif isinstance(exp.start, datetime):
        assert isinstance(comp.start, datetime) and comp.start.tzinfo is not None
        assert comp.start_utc == exp.start
    else:  # all-day: a date stays a date
        assert type(comp.start) is date and comp.start == exp.start
        assert comp.start_utc == datetime(
            exp.start.year, exp.start.month, exp.start.day, tzinfo=UTC
        )


def test_every_request_and_cancel_has_its_start_checked() -> None:
    for name, exp in EXPECTED.items():
        if exp.method in INVITE_METHODS and name != "comm-central__cancel-repeat-event.eml":
            assert exp.start is not None, f"{name}: an invite row needs its hand-computed start"


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e.dsn])
def test_bounces_are_never_invites(name: str) -> None:
    ex, parts = load(name)
    assert ex is not None and ex.is_dsn
    assert parts == [] and parse_parts(parts) == []


@pytest.mark.parametrize(
    "name", ["pykolab__itip_empty.eml", "comm-central__message-non-invite.eml"]
)
def test_not_invites(name: str) -> None:
    _, parts = load(name)
    objects = parse_parts(parts)
    assert not parts or all(o.method not in INVITE_METHODS for o in objects)
    assert not is_invite(objects)


@pytest.mark.parametrize("name", TWO_COPIES)
def test_two_copies_yield_each_uid_once(name: str) -> None:
    ex, parts = load(name)
    assert ex is not None
    assert sorted(p.content_type for p in parts) == ["application/ics", "text/calendar"]
    uids = [o.uid for o in parse_parts(parts)]
    assert uids == [EXPECTED[name].uid]


def test_differing_copies_one_without_method_yield_uid_once() -> None:
    # comm-central__ext-messages-invite.eml carries the invite inline (text/calendar;
    # method="REQUEST", no METHOD property) and as an attached c141520.ics. Today the copies
    # are byte-identical and extract() folds them; make the attached one differ the way
    # Google's copies do (pykolab__itip_google_multipart.eml) and the UID must still count once.
    raw = (corpus_dir() / "comm-central__ext-messages-invite.eml").read_bytes()
    end = raw.rfind(b"END:VEVENT")
    raw = raw[:end] + b"LOCATION:Room 2\n" + raw[end:]
    parts = extract(raw).parts
    assert [p.header_method for p in parts] == ["REQUEST", None]
    objects = parse_parts(parts)
    assert [(o.method, o.uid) for o in objects] == [
        ("REQUEST", EXPECTED["comm-central__ext-messages-invite.eml"].uid)
    ]
