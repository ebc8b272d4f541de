"""The real-client corpus (../shared/corpus) through the whole inbound pipeline: SMTP to
create@, the inbox, the processor, the store.

tests/test_corpus.py checks the pure core file by file against a table of hand-computed
expectations; this module reuses that table (EXPECTED) and checks what the running server
does with each file: every REQUEST creates an event with the expected start instant (its
ORGANIZER, or the From address when there is none, is the organizer), a REQUEST without UID
is rejected, a CANCEL cancels the event its REQUEST created, and bounces and non-invites create
nothing. The organizer policy allows the corpus' senders and organizers. SQLite only, except
one representative chain that also runs on PostgreSQL.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from ciserver.itip.mime import extract
from ciserver.itip.parse import parse_calendar, parse_parts
from ciserver.services.context import Services
from ciserver.store import db, models

from .conftest import DOMAIN, Pipeline, Sink, calendar_mail, make_config, open_pipeline
from .test_corpus import CORPUS, EXPECTED, INVITE_METHODS, Expect

CREATE = f"create@{DOMAIN}"
# Who "sends" the bare .ics files of the corpus when they name no ORGANIZER.
ICS_SENDER = "calendar@corpus.example.org"

pytestmark = pytest.mark.skipif(
    not CORPUS.is_dir(),
    reason=f"iMIP corpus not found at {CORPUS} (it lives in ../shared/corpus beside the "
           "checkout and is not part of the repository)")

REQUESTS = [n for n, e in EXPECTED.items() if e.invite and e.method == "REQUEST"]
CANCELS = [n for n, e in EXPECTED.items() if e.invite and e.method == "CANCEL"]
NOT_INVITES = [n for n, e in EXPECTED.items() if not e.invite]
# The REQUEST that created the event each CANCEL of the corpus cancels (same UID, organizer).
CANCELLED_BY = {
    "comm-central__cancel-single-event.eml": "comm-central__single-event.eml",
    "comm-central__cancel-repeat-event.eml": "comm-central__repeat-event.eml",
}


@functools.cache
def message(name: str) -> tuple[bytes, str]:
    """The corpus file as mail to create@, and its From address. Bare .ics files are
    wrapped the way a calendar program would send them, From their ORGANIZER if any."""
    path = CORPUS / name
    if path.suffix != ".ics":
        raw = path.read_bytes()
        return raw, extract(raw).from_addr
    text = path.read_text(encoding="utf-8")
    objects = parse_calendar(text)
    organizers = sorted({o for obj in objects for o in obj.organizers})
    sender = organizers[0] if organizers else ICS_SENDER
    method = next((o.method for o in objects if o.method), None)
    return calendar_mail(text, from_addr=sender, to=CREATE, subject=name,
                         method=method), sender


@functools.cache
def allowed_addresses() -> list[str]:
    """Every From and ORGANIZER address of the corpus: the operator's allow-list."""
    out = {ICS_SENDER}
    for name in EXPECTED:
        raw, sender = message(name)
        out.add(sender)
        ex = extract(raw)
        for obj in parse_parts(ex.parts):
            out |= obj.organizers
    return sorted(a for a in out if a)


def organizers_in(name: str) -> set[str]:
    raw, _ = message(name)
    return {o for obj in parse_parts(extract(raw).parts) for o in obj.organizers}


def instant(expected: datetime | date) -> datetime:
    if isinstance(expected, datetime):
        return expected
    return datetime(expected.year, expected.month, expected.day, tzinfo=UTC)


async def _open(tmp_path: Path, url: str, sink: Sink) -> AsyncIterator[Pipeline]:
    allow = json.dumps(allowed_addresses())
    cfg = make_config(tmp_path, url, sink, organizers={"allow": allow})
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    try:
        async with open_pipeline(svc, sink) as p:
            yield p
    finally:
        await svc.close()


@pytest.fixture
async def corpus_sqlite(tmp_path: Path, sqlite_url: str, sink: Sink) -> AsyncIterator[Pipeline]:
    async for p in _open(tmp_path, sqlite_url, sink):
        yield p


@pytest.fixture
async def corpus_any(tmp_path: Path, db_url: str, sink: Sink) -> AsyncIterator[Pipeline]:
    """On SQLite and on the machine's PostgreSQL."""
    async for p in _open(tmp_path, db_url, sink):
        yield p


async def ingest(p: Pipeline, name: str) -> models.InboxMessage:
    raw, sender = message(name)
    return await p.deliver(CREATE, raw, sender or "someone@example.org")


def test_the_table_covers_requests_cancels_and_the_rest() -> None:
    assert REQUESTS and CANCELS and NOT_INVITES
    assert sorted(CANCELLED_BY) == sorted(CANCELS), "map every corpus CANCEL to its REQUEST"
    assert all(EXPECTED[n].method in INVITE_METHODS for n in REQUESTS + CANCELS)
    assert any(EXPECTED[n].dsn for n in NOT_INVITES)


@pytest.mark.parametrize("name", REQUESTS)
async def test_request_creates_the_event_at_its_start(corpus_sqlite: Pipeline, name: str) -> None:
    p = corpus_sqlite
    exp: Expect = EXPECTED[name]
    row = await ingest(p, name)
    events = await p.events()
    if not exp.uid:
        assert row.status == "rejected" and "no UID" in row.result, (row.status, row.result)
        assert events == []
        return
    assert row.status == "done" and "created event" in row.result, (row.status, row.result,
                                                                      row.error)
    [event] = events
    assert event.organizer_uid == exp.uid
    assert exp.start is not None
    assert event.start_at == instant(exp.start)
    assert event.all_day is (not isinstance(exp.start, datetime))
    assert event.status == "confirmed" and event.sequence == 0
    organizers = organizers_in(name)
    _, sender = message(name)
    if organizers:
        assert {event.organizer_email} == organizers
    else:  # no ORGANIZER: the sender is the organizer
        assert event.organizer_email == sender
    # The organizer is told where the event's page is.
    [notice] = p.sink.to(event.organizer_email)
    assert event.public_id in notice.text()


@pytest.mark.parametrize("name", CANCELS)
async def test_cancel_cancels_the_event_its_request_created(corpus_sqlite: Pipeline,
                                                            name: str) -> None:
    p = corpus_sqlite
    # Alone, a CANCEL names nothing we know: nothing is created.
    row = await ingest(p, name)
    assert row.status == "ignored" and "unknown event" in row.result
    assert await p.events() == []

    request = CANCELLED_BY[name]
    assert (await ingest(p, request)).status == "done"
    [event] = await p.events()
    start = EXPECTED[request].start
    assert start is not None and event.start_at == instant(start)
    row = await ingest(p, name)
    assert row.status == "done" and row.result == f"cancelled event {event.public_id}"
    [event] = await p.events()
    assert event.status == "cancelled" and event.sequence == 1


@pytest.mark.parametrize("name", NOT_INVITES)
async def test_bounces_and_non_invites_create_nothing(corpus_sqlite: Pipeline,
                                                      name: str) -> None:
    p = corpus_sqlite
    row = await ingest(p, name)
    assert row.status == "ignored", (row.status, row.result, row.error)
    if EXPECTED[name].dsn:
        assert "delivery status report" in row.result
    assert await p.events() == []
    assert p.sink.messages == []  # and nobody is mailed about it


async def test_thunderbird_update_chain(corpus_any: Pipeline) -> None:
    """single-event, then a minor update (same SEQUENCE, newer DTSTAMP, new SUMMARY), a major
    one (SEQUENCE 2, new time), and a CANCEL with SEQUENCE 1 that is now stale."""
    p = corpus_any
    assert (await ingest(p, "comm-central__single-event.eml")).status == "done"
    [event] = await p.events()
    assert (event.summary, event.start_at) == ("Single Event", datetime(2022, 3, 16, 11,
                                                                         tzinfo=UTC))
    p.sink.clear()
    p.now = datetime(2022, 3, 1, tzinfo=UTC)  # a fan signs up before the (2022) event
    r = await p.http.post(f"/api/v1/events/{event.public_id}/invites",
                          json={"email": "fan@example.net"})
    assert r.status_code == 202, r.text
    await p.process()
    assert [m.rcpt_tos for m in p.sink.messages] == [["fan@example.net"]]
    p.sink.clear()

    row = await ingest(p, "comm-central__update-minor.eml")
    assert row.status == "done" and "SUMMARY" in row.result
    [event] = await p.events()
    assert (event.summary, event.sequence) == ("Updated Event", 1)

    row = await ingest(p, "comm-central__update-major.eml")
    assert row.status == "done" and "DTSTART" in row.result
    [event] = await p.events()
    assert event.start_at == EXPECTED["comm-central__update-major.eml"].start
    assert (event.sequence, event.organizer_sequence) == (2, 2)

    row = await ingest(p, "comm-central__cancel-single-event.eml")
    assert row.status == "ignored" and row.result.startswith("stale CANCEL")
    [event] = await p.events()
    assert event.status == "confirmed"
    # The fan got each applied change, and nothing for the stale CANCEL.
    sent = [m for m in p.sink.messages if m.rcpt_tos == ["fan@example.net"]]
    assert len(sent) == 2


async def test_override_only_exception_updates_one_occurrence(corpus_sqlite: Pipeline) -> None:
    p = corpus_sqlite
    assert (await ingest(p, "comm-central__repeat-event.eml")).status == "done"
    row = await ingest(p, "comm-central__exception-major.eml")
    assert row.status == "done" and "updated event" in row.result, row.result
    [event] = await p.events()
    assert event.start_at == EXPECTED["comm-central__repeat-event.eml"].start
    assert "RECURRENCE-ID:20220317T110000Z" in event.content
    assert "DTSTART:20220317T050000Z" in event.content
