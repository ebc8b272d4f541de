"""The hand-written REPLY reader agrees with the general one wherever it answers."""

from __future__ import annotations

import pytest
from icalendar import Calendar

from ciserver.itip.fastreply import parse_reply
from ciserver.itip.mime import extract
from ciserver.itip.parse import ItipObject

from .fixtures import DATA_DIR, load_fixture
from .test_corpus import corpus_dir


def general(text: str) -> list[ItipObject]:
    """The general reader alone (parse_calendar would take the fast path first)."""
    from ciserver.itip import parse

    cal = Calendar.from_ical(text)
    out: dict[str, ItipObject] = {}
    for ev in cal.walk("VEVENT"):
        comp = parse._component(ev)
        obj = out.setdefault(comp.uid, ItipObject("REPLY", comp.uid, [], set()))
        if any(c.recurrence_id == comp.recurrence_id for c in obj.components):
            continue
        obj.components.append(comp)
        obj.organizers.update(o.email for o in comp.organizers if o.email)
    return list(out.values())


def summary(objs: list[ItipObject]) -> list[object]:
    return [(o.method, o.uid, sorted(o.organizers),
             [(c.uid, c.recurrence_id, c.start, c.end, c.sequence, c.dtstamp, c.reply_time,
               c.summary, c.location, c.description, c.status, c.rrule, c.comment,
               c.attendees, c.organizer) for c in o.components]) for o in objs]


def reply_texts() -> list[tuple[str, str]]:
    out = []
    for path in sorted(DATA_DIR.glob("*.eml")):
        for part in extract(load_fixture(path.name, token="a" * 26)).parts:
            out.append((path.name, part.text))
    corpus = corpus_dir()
    if corpus.is_dir():
        for path in sorted(corpus.glob("*.eml")):
            for part in extract(path.read_bytes()).parts:
                out.append((path.name, part.text))
    return out


CASES = reply_texts()


@pytest.mark.parametrize(("name", "text"), CASES, ids=[f"{n}-{i}" for i, (n, _) in
                                                        enumerate(CASES)])
def test_fast_reader_agrees_with_the_general_one(name: str, text: str) -> None:
    quick = parse_reply(text)
    if "METHOD:REPLY" not in text.replace("\r\n ", "").upper():
        assert quick is None
        return
    if quick is None:
        return  # a shape it leaves to the general reader
    objs = general(text)
    for o in objs:
        o.method = "REPLY"
    assert summary(quick) == summary(objs), name


def test_fast_reader_takes_the_common_replies() -> None:
    taken = [n for n, t in CASES if "METHOD:REPLY" in t.upper() and parse_reply(t) is not None]
    assert {"outlook_reply_accept.eml", "google_reply_tentative.eml",
            "apple_reply_accept.eml", "apple_reply_declined_utc_occurrence.eml",
            "google_reply_declined_occurrence.eml"} <= set(taken)


@pytest.mark.parametrize("text", [
    "BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:x\r\n"
    "ATTENDEE;CN=\"a^'b\";PARTSTAT=ACCEPTED:mailto:a@b.c\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n",
    "BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:x\r\nDTSTAMP:2026\r\n"
    "END:VEVENT\r\nEND:VCALENDAR\r\n",
    "BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VTODO\r\nUID:x\r\nEND:VTODO\r\nEND:VCALENDAR\r\n",
    "BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:x\r\n"
    "RECURRENCE-ID;TZID=Nowhere/Special:20260304T190000\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n",
    "BEGIN:VCALENDAR\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\nUID:x\r\nEND:VEVENT\r\n"
    "END:VCALENDAR\r\n",
    "BEGIN:VCALENDAR\r\nMETHOD:REPLY\r\nBEGIN:VEVENT\r\nUID:x\r\nEND:VEVENT\r\n",
])
def test_unusual_shapes_go_to_the_general_reader(text: str) -> None:
    assert parse_reply(text) is None


