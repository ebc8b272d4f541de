"""The SQLite sign-up writer (store/sqlite_signups.py): its one-statement common case, the
careful path a batch takes when that statement is refused, and rows that read back through
the ORM exactly as the ORM path writes them."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from ciserver.services import events, subscriptions
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import Event, OutboxItem, Subscription
from ciserver.store.sqlite_signups import Item, SqliteSignupWriter
from ciserver.web.app import create_app

from .conftest import ORGANIZER, Sink, make_config

START = datetime(2027, 3, 4, 0, 30, tzinfo=UTC)
NOW = datetime(2026, 11, 24, 12, 0, 0, 123456, tzinfo=UTC)


async def make_event(svc: Services, summary: str) -> Event:
    async with svc.sessions.begin() as session:
        return await events.create_via_api(
            svc, session, organizer=ORGANIZER, organizer_name="Org", summary=summary,
            start=START, end=START + timedelta(hours=2))


def writer(svc: Services) -> SqliteSignupWriter:
    assert svc.engine.url.database
    return SqliteSignupWriter(svc.engine.url.database)


async def rows(svc: Services) -> list[tuple[Subscription, OutboxItem]]:
    async with svc.sessions() as session:
        return [(s, o) for s, o in (await session.execute(
            select(Subscription, OutboxItem).join(
                OutboxItem, OutboxItem.subscription_id == Subscription.id, isouter=True)
            .order_by(Subscription.id))).all()]


async def test_new_addresses_in_one_statement(sqlite_svc: Services) -> None:
    a, b = await make_event(sqlite_svc, "A"), await make_event(sqlite_svc, "B")
    names = ["Zoë 😀 名前", 'Quote " and \\ backslash', ""]
    items = [Item([a.id], "one@example.com", names[0], "page", "button https://x.example"),
             Item([a.id, b.id], "two@example.org", names[1], "api", ""),
             Item([b.id], "three@example.net", names[2], "cta", "public api")]
    assert await writer(sqlite_svc).write(items, NOW) == [("ok", 1)] * 3

    got = await rows(sqlite_svc)
    assert [(s.event_id, s.email, s.name) for s, _ in got] == [
        (a.id, "one@example.com", names[0]), (a.id, "two@example.org", names[1]),
        (b.id, "two@example.org", names[1]), (b.id, "three@example.net", "")]
    for sub, invite in got:
        # as subscriptions.invite and outbox.enqueue_subscription write them
        assert (sub.status, sub.partstat, sub.soft_bounces, sub.forwarded_by) == (
            "active", "NEEDS-ACTION", 0, None)
        assert sub.domain == sub.email.rpartition("@")[2]
        assert sub.created_at == sub.updated_at == NOW
        assert invite is not None, sub.email  # one invite queued per subscription
        assert (invite.kind, invite.state, invite.attempts, invite.rcpt_to,
                invite.rcpt_domain, invite.wanted_sequence, invite.mail_from) == (
            "invite", "pending", 0, sub.email, sub.domain, 0, "")
        assert invite.queued_at == invite.next_attempt_at == invite.updated_at == NOW
    assert [s.source for s, _ in got] == ["page", "api", "api", "cta"]
    assert got[0][0].origin == "button https://x.example"


async def test_a_refused_batch_is_sorted_out_with_nothing_half_written(
        sqlite_svc: Services) -> None:
    svc = sqlite_svc
    a, b = await make_event(svc, "A"), await make_event(svc, "B")
    closed = await make_event(svc, "Closed")
    async with svc.sessions.begin() as session:
        await events.cancel(svc, session, await events.find(session, closed.public_id),
                            origin="api")
        await subscriptions.invite(svc, session, await events.find(session, a.public_id),
                                   "known@example.com")
    items = [Item([a.id], "new1@example.com", "", "page", ""),
             Item([a.id], "known@example.com", "", "page", ""),
             Item([b.id, closed.id], "half@example.com", "", "page", ""),
             Item([a.id, 999_999], "gone@example.com", "", "page", ""),
             Item([a.id, b.id], "new2@example.com", "", "page", ""),
             Item([b.id], "new2@example.com", "", "page", ""),  # twice in one batch
             Item([b.id, b.id], "new3@example.com", "", "page", ""),  # an event twice
             # what SQLite's JSON would not keep (the callers' checks refuse it): left alone
             Item([b.id], "nul@example.com", "a\x00b", "page", ""),
             Item([b.id], "sur@example.com", "a\ud800", "page", "")]
    assert await writer(svc).write(items, NOW) == [
        ("ok", 1), ("again", 0), ("closed", closed.id), ("missing", 999_999), ("ok", 1),
        ("again", 0), ("ok", 1), ("again", 0), ("again", 0)]
    got = [(s.event_id, s.email) for s, _ in await rows(svc)]
    assert got == [(a.id, "known@example.com"), (a.id, "new1@example.com"),
                   (a.id, "new2@example.com"), (b.id, "new2@example.com"),
                   (b.id, "new3@example.com")]
    # one invite each, the one queued by the ORM path before included: the writer's trigger
    # queues for its own inserts only
    assert all(invite is not None for _, invite in await rows(svc))
    async with svc.sessions() as session:
        assert len((await session.execute(select(OutboxItem))).all()) == 5

    # the ORM path, on its own connection, after the writer's: still one invite each
    async with svc.sessions.begin() as session:
        await subscriptions.invite(svc, session, await events.find(session, b.public_id),
                                   "orm@example.com")
    async with svc.sessions() as session:
        outbox = (await session.execute(select(OutboxItem))).scalars().all()
    assert len(outbox) == 6 and len({o.subscription_id for o in outbox}) == 6


async def test_public_endpoint_refuses_control_characters_and_lone_surrogates(
        sqlite_svc: Services) -> None:
    """A JSON body can carry control characters and lone surrogates ("\\ud800", not text):
    none reaches the database, a mail header or an SMTP command."""
    event = await make_event(sqlite_svc, "A")
    app = create_app(sqlite_svc)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://test") as client:
        url = f"/api/v1/events/{event.public_id}/invites"
        json_type = {"Content-Type": "application/json"}
        r = await client.post(url, json={"email": "fan@example.com", "name": "Zoë Fan"})
        assert r.status_code == 202, r.text
        for bad in ("a\\u0001b@example.com", "a\\u007f@example.com", "a\\u0085@example.com"):
            r = await client.post(url, content=f'{{"email": "{bad}"}}', headers=json_type)
            assert r.status_code == 422, bad
            error = r.json()["error"]  # the model refuses C0 controls, check_email C1 ones
            assert error["code"] in ("invalid", "invalid_email"), r.text
            assert "email" in error["message"], r.text
        for body in ('{"email": "a\\ud800@example.com"}',
                     '{"email": "b@example.com", "name": "Zo\\udc00e"}',
                     '{"email": "c@example.com", "name": "Zo\\u0000e \\u0007Fan"}'):
            r = await client.post(url, content=body, headers=json_type)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid", body
    [(sub, invite)] = await rows(sqlite_svc)
    assert sub.email == "fan@example.com" and sub.name == "Zoë Fan" and invite is not None


def test_the_checks_themselves_refuse_what_json_can_carry() -> None:
    """Behind the API's models (which refuse these), the checks hold alone: page forms, the
    call-to-action link, the console and the CLI call them with any str."""
    from ciserver.itip.build import header_safe

    assert header_safe("Zo\ud800e\x00 \x85Fan") == "Zo e Fan"
    for bad in ("a\ud800@example.com", "a\x01@example.com", "a\x9f@example.com"):
        try:
            subscriptions.check_email(bad)
        except subscriptions.InvalidAddress:
            continue
        raise AssertionError(f"{bad!r} was accepted")
    # no SMTPUTF8 on our side: refused, saying why; a domain name beyond ASCII is kept in
    # its ASCII form
    try:
        subscriptions.check_email("Zoë@Example.com")
    except subscriptions.InvalidAddress as exc:
        assert "beyond ASCII before the @" in str(exc)
    else:
        raise AssertionError("a local part beyond ASCII was accepted")
    assert subscriptions.check_email("Fan@Exämple.NET") == "fan@xn--exmple-cua.net"
    assert subscriptions.check_email(" <mailto:Fan@Example.com> ") == "fan@example.com"


async def test_a_failed_batch_is_done_one_by_one_keeping_its_refusals(
        tmp_path: Path, sink: Sink, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer fails (say the database stays locked past busy_timeout): the batch's
    requests are done one by one through the ORM; a request the per-event limit refused
    stays refused, and the others' hits on that limit are not counted twice."""
    cfg = make_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'ciserver.db'}", sink,
                      web={"rate_limit": 100, "rate_limit_per_address": 100,
                           "rate_limit_per_event": 3})
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    failed: list[int] = []

    async def locked(self: SqliteSignupWriter, items: list[Item], now: datetime) -> None:
        failed.append(len(items))
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(SqliteSignupWriter, "write", locked)
    try:
        event = await make_event(svc, "A")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                     base_url="http://test") as client:
            url = f"/api/v1/events/{event.public_id}/invites"
            got = await asyncio.gather(*(client.post(url, json={"email": f"f{i}@example.com"})
                                         for i in range(4)))
            assert sorted(r.status_code for r in got) == [202, 202, 202, 429]
            assert failed and sum(failed) == 3  # the refused one never reached the writer
            r = await client.post(url, json={"email": "late@example.com"})
            assert r.status_code == 429  # three counted, not six: the limit is 3
        got_rows = await rows(svc)
        assert len(got_rows) == 3 and all(invite is not None for _, invite in got_rows)
    finally:
        await svc.close()
