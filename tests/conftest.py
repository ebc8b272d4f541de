"""Shared test parts: a real capturing smarthost, fresh databases (SQLite and the machine's
PostgreSQL), and a Services object wired to them."""

from __future__ import annotations

import asyncio
import email
import email.message
import os
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from ciserver import config as config_mod
from ciserver.services.context import Services
from ciserver.store import db

DOMAIN = "invites.example.com"
ORGANIZER = "zach@team.example"
PG_ADMIN_DSN = os.environ.get("CISERVER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Captured:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes

    @property
    def message(self) -> email.message.Message:
        return email.message_from_bytes(self.raw)

    def text(self) -> str:
        """The first text/plain part, decoded."""
        for part in self.message.walk():
            if part.get_content_type() == "text/plain":
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                return payload.decode(part.get_content_charset() or "utf-8")
        raise AssertionError("no text/plain part")

    def calendar(self) -> str:
        for part in self.message.walk():
            if part.get_content_type() == "text/calendar":
                payload = part.get_payload(decode=True)
                assert isinstance(payload, bytes)
                return payload.decode()
        raise AssertionError("no text/calendar part")


@dataclass
class Sink:
    """A real SMTP server (aiosmtpd in its own thread) that keeps what it receives.

    ``answers`` maps a recipient to a list of SMTP replies to give (then 250)."""

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[Captured] = field(default_factory=list)
    answers: dict[str, list[str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        with self.lock:
            queue = self.answers.get(address.lower())
            if queue:
                return queue.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        with self.lock:
            self.messages.append(Captured(envelope.mail_from or "", list(envelope.rcpt_tos),
                                          raw))
        return "250 2.0.0 captured"

    def to(self, rcpt: str) -> list[Captured]:
        with self.lock:
            return [m for m in self.messages if rcpt.lower() in
                    [r.lower() for r in m.rcpt_tos]]

    def wait(self, count: int, timeout: float = 15.0) -> list[Captured]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= count:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"smarthost got {len(self.messages)} messages, wanted {count}")

    def invites(self) -> list[Captured]:
        """What customers got (envelope bounce+TOKEN), not the notices to organizers."""
        with self.lock:
            return [m for m in self.messages if m.mail_from.startswith("bounce+")]

    def clear(self) -> None:
        with self.lock:
            self.messages.clear()


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink(port=free_port())
    controller = Controller(s, hostname="127.0.0.1", port=s.port)
    controller.start()
    try:
        yield s
    finally:
        controller.stop()


# --------------------------------------------------------------------------------------------
# Databases


def _pg_available() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def _pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_DSN)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database on the machine's server, dropped afterwards."""
    if not _pg_available():
        pytest.skip("PostgreSQL is not running on 127.0.0.1:5432")
    name = f"cis_{uuid.uuid4().hex[:12]}"
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    try:
        yield f"{base}/{name}"
    finally:
        _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'ciserver.db'}"
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'ciserver.db'}"


def make_config(tmp_path: Path, db_url: str, sink: Sink | None, **sections: dict[str, object]
                ) -> config_mod.Config:
    env = {
        "CISERVER_SERVER__DOMAIN": DOMAIN,
        "CISERVER_SERVER__STATE_DIR": str(tmp_path / "state"),
        "CISERVER_SERVER__PUBLIC_URL": "https://invites.example.com",
        "CISERVER_SERVER__SECRET_KEY": "test-secret",
        "CISERVER_DATABASE__URL": db_url,
        "CISERVER_SMTP__LISTEN": f"127.0.0.1:{free_port()}",
        "CISERVER_WEB__LISTEN": f"127.0.0.1:{free_port()}",
        "CISERVER_ORGANIZERS__ALLOW": f'["{ORGANIZER}", "*@nba.example"]',
        "CISERVER_RELAY__RETRY_BASE": "1",
    }
    if sink is not None:
        env["CISERVER_RELAY__SMARTHOST"] = f"{sink.host}:{sink.port}"
        env["CISERVER_RELAY__TLS"] = "none"
    for section, values in sections.items():
        for key, value in values.items():
            env[f"CISERVER_{section.upper()}__{key.upper()}"] = str(value)
    return config_mod.load(None, env)


@pytest.fixture
async def svc(tmp_path: Path, db_url: str, sink: Sink) -> AsyncIterator[Services]:
    cfg = make_config(tmp_path, db_url, sink)
    services = Services.open(cfg)
    await db.ensure_schema(services.engine, cfg.database_url)
    try:
        yield services
    finally:
        await services.close()


@pytest.fixture
async def sqlite_svc(tmp_path: Path, sqlite_url: str, sink: Sink) -> AsyncIterator[Services]:
    cfg = make_config(tmp_path, sqlite_url, sink)
    services = Services.open(cfg)
    await db.ensure_schema(services.engine, cfg.database_url)
    try:
        yield services
    finally:
        await services.close()


async def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


# --------------------------------------------------------------------------------------------
# The mail pipeline as the world drives it (tests/test_replies.py, test_organizer.py,
# test_corpus_ingest.py): a real SMTP listener in front of the inbox, the inbox processor,
# the relay into the capturing smarthost, and the API app for what users read back.

import re  # noqa: E402
from contextlib import asynccontextmanager  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from email.message import EmailMessage  # noqa: E402
from email.policy import SMTP as SMTP_POLICY  # noqa: E402
from typing import Any  # noqa: E402

import aiosmtplib  # noqa: E402
import httpx  # noqa: E402
from sqlalchemy import select  # noqa: E402

from ciserver import relay as relay_mod  # noqa: E402
from ciserver import smtp as smtp_mod  # noqa: E402
from ciserver.services import apikeys as apikeys_mod  # noqa: E402
from ciserver.services import inbox as inbox_mod  # noqa: E402
from ciserver.store import models  # noqa: E402
from ciserver.web.app import create_app  # noqa: E402

# Before the fixtures' "Game night" series (weekly from 2026-03-04 19:00 New York): answers
# received now are inside the RSVP window.
FEB_20 = datetime(2026, 2, 20, 15, 0, tzinfo=UTC)


class Refused(Exception):
    """The SMTP listener refused a message; ``code`` and ``text`` are its answer."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text


@dataclass
class Pipeline:
    svc: Services
    sink: Sink
    port: int
    http: httpx.AsyncClient
    now: datetime = FEB_20
    _auth: dict[str, str] = field(default_factory=dict)

    async def send(self, rcpt: str, raw: bytes, sender: str = "someone@example.org") -> str:
        """One SMTP transaction to our listener; returns the final reply text or raises
        :class:`Refused` with the code the client saw."""
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.port, start_tls=False)
        await client.connect()
        try:
            _, message = await client.sendmail(sender, [rcpt], raw)
            return message
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            raise Refused(first.code, first.message) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise Refused(exc.code, exc.message) from None
        finally:
            if client.is_connected:
                await client.quit()

    async def process(self) -> None:
        """Apply everything in the inbox, then deliver everything in the outbox."""
        await inbox_mod.drain(self.svc)
        await relay_mod.Relay(self.svc).drain()

    async def deliver(self, rcpt: str, raw: bytes, sender: str = "someone@example.org"
                      ) -> models.InboxMessage:
        """Send, process, and return the message's inbox row."""
        reply = await self.send(rcpt, raw, sender)
        m = re.search(r"queued as (\d+)", reply)
        assert m, reply
        await self.process()
        row = await self.inbox(int(m.group(1)))
        return row

    async def inbox(self, inbox_id: int) -> models.InboxMessage:
        async with self.svc.sessions() as session:
            row = await session.get(models.InboxMessage, inbox_id)
            assert row is not None
            return row

    async def rows(self, model: Any, *where: Any) -> list[Any]:
        async with self.svc.sessions() as session:
            q = select(model).where(*where).order_by(model.id)
            return list((await session.execute(q)).scalars().all())

    async def events(self) -> list[models.Event]:
        return await self.rows(models.Event)

    async def event(self, public_id: str) -> models.Event:
        found = await self.rows(models.Event, models.Event.public_id == public_id)
        assert len(found) == 1, public_id
        return found[0]  # type: ignore[no-any-return]

    async def subscription(self, public_id: str, email: str) -> models.Subscription:
        event = await self.event(public_id)
        found = await self.rows(models.Subscription, models.Subscription.event_id == event.id,
                                models.Subscription.email == email.lower())
        assert len(found) == 1, email
        return found[0]  # type: ignore[no-any-return]

    async def auth(self) -> dict[str, str]:
        if not self._auth:
            _, key = await apikeys_mod.create(self.svc, organizer=ORGANIZER)
            self._auth = {"Authorization": f"Bearer {key}"}
        return self._auth

    async def attendees(self, public_id: str) -> dict[str, dict[str, Any]]:
        r = await self.http.get(f"/api/v1/events/{public_id}/attendees",
                                headers=await self.auth())
        assert r.status_code == 200, r.text
        return {a["email"]: a for a in r.json()}

    async def report(self, public_id: str) -> list[dict[str, str]]:
        import csv
        import io

        r = await self.http.get(f"/api/v1/events/{public_id}/report.csv",
                                headers=await self.auth())
        assert r.status_code == 200, r.text
        return list(csv.DictReader(io.StringIO(r.text.lstrip("\ufeff"))))

    async def subscribe(self, public_id: str, *emails: str) -> dict[str, str]:
        """Customers ask for the invite on the public API; returns email -> rsvp token, read
        from the ORGANIZER of the invite each one received."""
        for address in emails:
            r = await self.http.post(f"/api/v1/events/{public_id}/invites",
                                     json={"email": address})
            assert r.status_code == 202, r.text
        self.sink.clear()
        await self.process()
        got = self.sink.wait(len(emails))
        tokens = {m.rcpt_tos[0].lower(): invite_token(m) for m in got}
        assert sorted(tokens) == sorted(e.lower() for e in emails)
        self.sink.clear()
        return tokens


def invite_token(msg: Captured) -> str:
    from icalendar import Calendar

    cal = Calendar.from_ical(msg.calendar())
    organizer = str(cal.walk("VEVENT")[0]["ORGANIZER"])
    m = re.match(r"mailto:rsvp\+([a-z2-7]+)@" + re.escape(DOMAIN), organizer)
    assert m, organizer
    return m.group(1)


def page_id(notice: Captured) -> str:
    """The event id in an "Event ready" notice's page URL."""
    body = notice.text()
    m = re.search(r"https://invites\.example\.com/e/([a-z2-7]+)", body)
    assert m, body
    return m.group(1)


def calendar_mail(ical: str, *, from_addr: str, to: str, subject: str = "Invitation",
                  method: str | None = "REQUEST", date: str = "Fri, 20 Feb 2026 10:00:00 +0000",
                  headers: dict[str, str] | None = None) -> bytes:
    """A plain message carrying ``ical`` as its text/calendar part (method= when given)."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = from_addr
    msg["To"] = to
    msg["Subject"] = subject
    msg["Date"] = date
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@{from_addr.rpartition('@')[2].strip('>')}>"
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content("A calendar message.\n")
    part = EmailMessage(policy=SMTP_POLICY)
    part.set_content(ical, subtype="calendar", cte="base64")
    if method:
        part.set_param("method", method)
    msg.make_mixed()
    msg.attach(part)
    return msg.as_bytes()


@asynccontextmanager
async def open_pipeline(svc: Services, sink: Sink) -> AsyncIterator[Pipeline]:
    port = int(svc.config.smtp.listen.rsplit(":", 1)[1])
    server = await smtp_mod.start(svc)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                             base_url="http://t")
    p = Pipeline(svc, sink, port, http)
    svc.clock = lambda: p.now
    try:
        yield p
    finally:
        await http.aclose()
        server.close()
        await server.wait_closed()


@pytest.fixture
async def pipeline(svc: Services, sink: Sink) -> AsyncIterator[Pipeline]:
    """The pipeline on SQLite and on PostgreSQL."""
    async with open_pipeline(svc, sink) as p:
        yield p


@pytest.fixture
async def sqlite_pipeline(sqlite_svc: Services, sink: Sink) -> AsyncIterator[Pipeline]:
    async with open_pipeline(sqlite_svc, sink) as p:
        yield p
