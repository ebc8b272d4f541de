"""Outbox and relay against real SMTP servers on loopback (aiosmtpd in a thread).

Delivery through a smarthost in plain text, STARTTLS and implicit TLS, with AUTH; retries of
4xx answers with exponential backoff; permanent 5xx failures; queue lifetime; coalescing of
rapid edits; claims of dead workers; no re-send after a restart; envelope senders. Time is
moved with ``svc.clock``, never slept on.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dns.resolver
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from icalendar import Calendar
from sqlalchemy import select

from ciserver import relay
from ciserver.addresses import Kind
from ciserver.itip import content as content_mod
from ciserver.services import events, notify, outbox, subscriptions
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import Event, OutboxItem, Subscription

from .conftest import DOMAIN, ORGANIZER, Captured, Sink, free_port, make_config

START = datetime(2030, 6, 1, 23, 0, tzinfo=UTC)
T0 = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Test PKI (openssl CLI): a CA and a server certificate for 127.0.0.1 / localhost


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server certificate

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        return ctx


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN=ciserver test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    _make_ca(d, "ca")
    _make_ca(d, "other")
    (d / "server.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n")
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost", cwd=d)
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "server.ext",
             cwd=d)
    return Pki(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key",
               other_ca=d / "other.pem")


# --------------------------------------------------------------------------------------------
# Smarthosts


@dataclass
class Smarthost(Sink):
    """The capturing sink, also noting each connection's greeting and TLS state at DATA."""

    ehlos: int = 0
    tls_at_data: list[str | None] = field(default_factory=list)
    gate: threading.Event | None = None  # when set: DATA waits for it (a slow smarthost)
    in_data: threading.Event = field(default_factory=threading.Event)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does when no hook is present
        with self.lock:
            self.ehlos += 1
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert server.transport is not None
        ssl_object = server.transport.get_extra_info("ssl_object")
        with self.lock:
            self.tls_at_data.append(ssl_object.version() if ssl_object is not None else None)
        if self.gate is not None:
            self.in_data.set()
            await asyncio.to_thread(self.gate.wait, 10)
        return await super().handle_DATA(server, session, envelope)


@dataclass
class Authenticator:
    user: str = "relay-user"
    password: str = "correct horse"
    seen: list[tuple[str, str, bool]] = field(default_factory=list)  # mechanism, login, tls
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, server: SMTP, session: Session, envelope: Envelope, mechanism: str,
                 auth_data: Any) -> AuthResult:
        assert server.transport is not None
        tls = server.transport.get_extra_info("ssl_object") is not None
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login.decode() == self.user
              and auth_data.password.decode() == self.password)
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else "?"
        with self.lock:
            self.seen.append((mechanism, login, tls))
        return AuthResult(success=ok, handled=False)


@contextmanager
def smarthost(port: int = 0, **kwargs: Any) -> Iterator[Smarthost]:
    """A real aiosmtpd server on loopback. ``ssl_context`` = implicit TLS; SMTP options
    (``tls_context``, ``require_starttls``, ``authenticator``, ...) pass through."""
    server = Smarthost(port=port or free_port())
    controller = Controller(server, hostname="127.0.0.1", port=server.port, **kwargs)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


# --------------------------------------------------------------------------------------------
# Services, events, queue inspection


class Clock:
    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)

    def to(self, when: datetime) -> None:
        self.now = when


OpenSvc = Callable[..., Awaitable[Services]]


@pytest.fixture
async def open_svc(tmp_path: Path, db_url: str) -> AsyncIterator[OpenSvc]:
    """Open a Services on the test database (SQLite or PostgreSQL) with a relay config;
    several may be opened on the same database (a restart)."""
    opened: list[Services] = []

    async def factory(sink: Sink | None, clock: Clock | None = None,
                      **relay_cfg: object) -> Services:
        cfg = make_config(tmp_path, db_url, sink, relay=relay_cfg)
        svc = Services.open(cfg)
        await db.ensure_schema(svc.engine, cfg.database_url)
        if clock is not None:
            svc.clock = clock
        opened.append(svc)
        return svc

    yield factory
    for svc in opened:
        await svc.close()


@pytest.fixture
async def sqlite_open_svc(tmp_path: Path) -> AsyncIterator[OpenSvc]:
    """The same on SQLite only: for transport tests where the database does not matter."""
    opened: list[Services] = []
    url = f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}"

    async def factory(sink: Sink | None, clock: Clock | None = None,
                      **relay_cfg: object) -> Services:
        cfg = make_config(tmp_path, url, sink, relay=relay_cfg)
        svc = Services.open(cfg)
        await db.ensure_schema(svc.engine, cfg.database_url)
        if clock is not None:
            svc.clock = clock
        opened.append(svc)
        return svc

    yield factory
    for svc in opened:
        await svc.close()


async def new_event(svc: Services, *emails: str) -> tuple[int, list[int]]:
    """An event (as the API creates it) with ``emails`` subscribed; invites queued."""
    async with svc.sessions.begin() as session:
        event = await events.create_via_api(
            svc, session, organizer=ORGANIZER, organizer_name="Zach Lowe",
            summary="Knicks vs Celtics", start=START, end=START + timedelta(hours=3),
            location="Madison Square Garden")
        subs = []
        for addr in emails:
            result = await subscriptions.invite(svc, session, event, addr, source="api")
            assert result.queued
            subs.append(result.subscription.id)
        return event.id, subs


async def edit(svc: Services, event_id: int, location: str) -> int:
    """The organizer moves the event to ``location``; returns the new SEQUENCE."""
    async with svc.sessions.begin() as session:
        event = await session.get(Event, event_id)
        assert event is not None
        new = content_mod.new_content(summary="Knicks vs Celtics", start=START,
                                      end=START + timedelta(hours=3), location=location)
        assert await events.change(svc, session, event, new, origin="api")
        return event.sequence


async def item_of(svc: Services, sub_id: int) -> OutboxItem:
    async with svc.sessions() as session:
        return (await session.execute(
            select(OutboxItem).where(OutboxItem.subscription_id == sub_id))).scalar_one()


async def items(svc: Services) -> list[OutboxItem]:
    async with svc.sessions() as session:
        return list((await session.execute(
            select(OutboxItem).order_by(OutboxItem.id))).scalars().all())


async def subscription(svc: Services, sub_id: int) -> Subscription:
    async with svc.sessions() as session:
        sub = await session.get(Subscription, sub_id)
        assert sub is not None
        return sub


def vevent(msg: Captured) -> Any:
    return Calendar.from_ical(msg.calendar()).events[0]


async def drain(svc: Services) -> int:
    return await relay.Relay(svc).drain()


# --------------------------------------------------------------------------------------------
# 1. Transports: plain, STARTTLS, implicit TLS, AUTH


async def test_plain_smarthost_delivers_each_subscriber_one_personal_invite(
        open_svc: OpenSvc) -> None:
    with smarthost() as server:
        svc = await open_svc(server, tls="none")
        _, subs = await new_event(svc, "fan.one@example.com", "fan.two@example.org",
                                  "fan.three@example.net")
        assert await drain(svc) == 3
        got = server.wait(3)
        assert len(got) == 3
        assert server.ehlos == 1  # one connection, reused from message to message
        assert server.tls_at_data == [None, None, None]
        by_rcpt = {m.rcpt_tos[0]: m for m in got}
        for sub_id, addr in zip(subs, ["fan.one@example.com", "fan.two@example.org",
                                       "fan.three@example.net"], strict=True):
            msg = by_rcpt[addr]
            ev = vevent(msg)
            assert str(ev["ATTENDEE"]).lower() == f"mailto:{addr}"
            assert int(ev["SEQUENCE"]) == 0
            item = await item_of(svc, sub_id)
            assert item.state == "sent"
            assert item.attempts == 1
            assert item.sent_sequence == 0 and item.wanted_sequence == 0
            assert item.last_response.startswith("250")
            assert item.claimed_until is None and item.sent_at is not None
            assert (await subscription(svc, sub_id)).delivered_sequence == 0
        # Nothing is due any more: draining again sends nothing.
        assert await drain(svc) == 0
        assert len(server.messages) == 3


async def test_starttls_with_verified_certificate(sqlite_open_svc: OpenSvc, pki: Pki) -> None:
    with smarthost(tls_context=pki.server_context(), require_starttls=True) as server:
        svc = await sqlite_open_svc(server, tls="starttls", tls_verify=True,
                                    ca_file=str(pki.ca))
        _, (sub,) = await new_event(svc, "fan@example.com")
        await drain(svc)
        assert len(server.wait(1)) == 1
        assert server.tls_at_data[0] in ("TLSv1.2", "TLSv1.3")
        assert (await item_of(svc, sub)).state == "sent"


async def test_starttls_refuses_a_certificate_it_cannot_verify(sqlite_open_svc: OpenSvc,
                                                               pki: Pki) -> None:
    """tls_verify with the wrong CA: deferred (an operator can fix the CA), nothing sent."""
    clock = Clock()
    with smarthost(tls_context=pki.server_context()) as server:
        svc = await sqlite_open_svc(server, clock, tls="starttls", tls_verify=True,
                                    ca_file=str(pki.other_ca))
        _, (sub,) = await new_event(svc, "fan@example.com")
        await drain(svc)
        assert server.messages == []
        item = await item_of(svc, sub)
        assert item.state == "pending"
        assert "CERTIFICATE_VERIFY_FAILED" in item.last_response
        assert item.next_attempt_at > clock.now


async def test_starttls_without_verification_still_encrypts(sqlite_open_svc: OpenSvc,
                                                            pki: Pki) -> None:
    with smarthost(tls_context=pki.server_context(), require_starttls=True) as server:
        svc = await sqlite_open_svc(server, tls="starttls", tls_verify=False)
        _, (sub,) = await new_event(svc, "fan@example.com")
        await drain(svc)
        server.wait(1)
        assert server.tls_at_data[0] is not None
        assert (await item_of(svc, sub)).state == "sent"


async def test_starttls_required_but_not_offered_never_falls_back_to_plain(
        sqlite_open_svc: OpenSvc) -> None:
    with smarthost() as server:  # no tls_context: no STARTTLS in EHLO
        svc = await sqlite_open_svc(server, tls="starttls")
        _, (sub,) = await new_event(svc, "fan@example.com")
        await drain(svc)
        assert server.messages == []
        item = await item_of(svc, sub)
        assert item.state == "pending"
        assert "STARTTLS" in item.last_response


async def test_implicit_tls(sqlite_open_svc: OpenSvc, pki: Pki) -> None:
    with smarthost(ssl_context=pki.server_context()) as server:
        svc = await sqlite_open_svc(server, tls="implicit", tls_verify=True,
                                    ca_file=str(pki.ca))
        _, subs = await new_event(svc, "fan.one@example.com", "fan.two@example.com")
        await drain(svc)
        assert len(server.wait(2)) == 2
        assert all(v in ("TLSv1.2", "TLSv1.3") for v in server.tls_at_data)
        for sub in subs:
            assert (await item_of(svc, sub)).state == "sent"


async def test_auth_over_starttls(sqlite_open_svc: OpenSvc, pki: Pki) -> None:
    auth = Authenticator()
    # auth_require_tls (aiosmtpd's default): AUTH is only offered after STARTTLS;
    # auth_required: mail without AUTH is refused, so delivery proves we logged in.
    with smarthost(tls_context=pki.server_context(), require_starttls=True,
                   authenticator=auth, auth_required=True) as server:
        svc = await sqlite_open_svc(server, tls="starttls", ca_file=str(pki.ca),
                                    username=auth.user, password=auth.password)
        _, subs = await new_event(svc, "fan.one@example.com", "fan.two@example.com")
        await drain(svc)
        assert len(server.wait(2)) == 2
        assert len(auth.seen) == 1  # one login for the reused connection
        mechanism, login, tls = auth.seen[0]
        assert (login, tls) == (auth.user, True)
        assert mechanism in ("PLAIN", "LOGIN")
        for sub in subs:
            assert (await item_of(svc, sub)).state == "sent"


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_auth_over_implicit_tls(sqlite_open_svc: OpenSvc, pki: Pki) -> None:
    auth = Authenticator()
    # The whole connection is TLS; aiosmtpd only counts STARTTLS as TLS for
    # auth_require_tls, so that check is off here and the authenticator records TLS itself.
    with smarthost(ssl_context=pki.server_context(), authenticator=auth,
                   auth_require_tls=False, auth_required=True) as server:
        svc = await sqlite_open_svc(server, tls="implicit", ca_file=str(pki.ca),
                                    username=auth.user, password=auth.password)
        _, (sub,) = await new_event(svc, "fan@example.com")
        await drain(svc)
        server.wait(1)
        assert [(login, tls) for _, login, tls in auth.seen] == [(auth.user, True)]
        assert (await item_of(svc, sub)).state == "sent"


async def test_wrong_password_is_recorded_and_deferred(sqlite_open_svc: OpenSvc,
                                                       pki: Pki) -> None:
    """A 535 from the smarthost is about our credentials, not the recipient: like Postfix
    (smtp_sasl_auth_soft_bounce = yes) the item is deferred with the answer recorded, so mail
    queued meanwhile goes out once the operator fixes the password."""
    clock = Clock()
    auth = Authenticator()
    with smarthost(tls_context=pki.server_context(), require_starttls=True,
                   authenticator=auth, auth_required=True) as server:
        svc = await sqlite_open_svc(server, clock, tls="starttls", ca_file=str(pki.ca),
                                    username=auth.user, password="wrong", retry_base=60)
        _, (sub,) = await new_event(svc, "fan@example.com")
        await drain(svc)
        assert server.messages == []
        # aiosmtplib tries each offered mechanism (PLAIN, LOGIN) before giving up.
        assert auth.seen and all(login == auth.user for _, login, _ in auth.seen)
        item = await item_of(svc, sub)
        assert item.state == "pending"
        assert "535" in item.last_response
        assert item.attempts == 1
        assert item.next_attempt_at == clock.now + timedelta(seconds=60)

        # The operator fixes the password; the next try goes out.
        svc.config.relay.password = auth.password
        clock.advance(seconds=60)
        await drain(svc)
        server.wait(1)
        assert (await item_of(svc, sub)).state == "sent"


async def test_auth_is_never_attempted_in_clear_text(sqlite_open_svc: OpenSvc) -> None:
    auth = Authenticator()
    with smarthost(authenticator=auth, auth_required=True) as server:  # no TLS at all
        svc = await sqlite_open_svc(server, tls="none", username=auth.user,
                                    password=auth.password)
        _, (sub,) = await new_event(svc, "fan@example.com")
        await drain(svc)
        assert server.messages == [] and auth.seen == []
        item = await item_of(svc, sub)
        assert item.state == "pending"
        assert "AUTH" in item.last_response


async def test_reused_connection_closed_by_the_smarthost_is_reopened(
        sqlite_open_svc: OpenSvc) -> None:
    port = free_port()
    with smarthost(port) as first:
        svc = await sqlite_open_svc(first, tls="none")
        event_id, (sub,) = await new_event(svc, "fan@example.com")
        transport = relay.Smarthost(svc)
        rel = relay.Relay(svc)
        (item_id,) = await outbox.claim(svc, 10)
        await rel._deliver(transport, item_id)
        assert len(first.messages) == 1
    # The smarthost restarts; our kept connection is dead. The next send reconnects.
    with smarthost(port) as second:
        await edit(svc, event_id, "Barclays Center")
        (item_id,) = await outbox.claim(svc, 10)
        await rel._deliver(transport, item_id)
        await transport.close()
        assert len(second.messages) == 1
        assert int(vevent(second.messages[0])["SEQUENCE"]) == 1
        assert (await item_of(svc, sub)).state == "sent"


async def test_unreachable_smarthost_defers(sqlite_open_svc: OpenSvc) -> None:
    clock = Clock()
    dead = Sink(port=free_port())  # nothing listens there
    svc = await sqlite_open_svc(dead, clock, tls="none", retry_base=30)
    _, (sub,) = await new_event(svc, "fan@example.com")
    await drain(svc)
    item = await item_of(svc, sub)
    assert item.state == "pending" and item.attempts == 1
    assert item.next_attempt_at == clock.now + timedelta(seconds=30)
    assert item.last_response


# --------------------------------------------------------------------------------------------
# 2. Temporary and permanent failures


async def test_4xx_is_retried_with_exponential_backoff_then_delivered(
        open_svc: OpenSvc) -> None:
    clock = Clock()
    with smarthost() as server:
        svc = await open_svc(server, clock, tls="none", retry_base=60, retry_max=200)
        _, (sub, other) = await new_event(svc, "busy@example.com", "fine@example.com")
        server.answers["busy@example.com"] = ["450 4.2.1 mailbox busy, try later"] * 3

        await drain(svc)
        assert [m.rcpt_tos for m in server.messages] == [["fine@example.com"]]
        assert (await item_of(svc, other)).state == "sent"

        delays = []
        for attempt in (1, 2, 3):
            item = await item_of(svc, sub)
            assert item.state == "pending"
            assert item.attempts == attempt
            assert item.last_response == "450 4.2.1 mailbox busy, try later"
            assert item.claimed_until is None
            delay = item.next_attempt_at - clock.now
            delays.append(delay.total_seconds())
            # Not due before its time.
            clock.advance(seconds=delay.total_seconds() - 1)
            assert await drain(svc) == 0
            clock.advance(seconds=1)
            assert await drain(svc) == 1
        assert delays == [60, 120, 200]  # base, 2x base, capped at retry_max

        item = await item_of(svc, sub)
        assert item.state == "sent" and item.attempts == 4
        assert item.last_response.startswith("250")
        assert len(server.to("busy@example.com")) == 1


async def test_5xx_fails_at_once_with_the_remote_answer(open_svc: OpenSvc) -> None:
    clock = Clock()
    with smarthost() as server:
        svc = await open_svc(server, clock, tls="none")
        _, (bad, good) = await new_event(svc, "nobody@example.com", "fan@example.com")
        server.answers["nobody@example.com"] = ["550 5.1.1 <nobody@example.com>: no such user"]
        await drain(svc)
        item = await item_of(svc, bad)
        assert item.state == "failed"
        assert item.attempts == 1
        assert item.last_response == "550 5.1.1 <nobody@example.com>: no such user"
        assert item.claimed_until is None
        assert (await item_of(svc, good)).state == "sent"
        # A failed item is never tried again by itself.
        clock.advance(days=30)
        assert await drain(svc) == 0
        assert server.to("nobody@example.com") == []


async def test_queue_lifetime_turns_a_deferred_item_into_failed(open_svc: OpenSvc) -> None:
    clock = Clock()
    with smarthost() as server:
        svc = await open_svc(server, clock, tls="none", retry_base=60, retry_max=600,
                             max_queue_lifetime=3600)
        _, (sub,) = await new_event(svc, "busy@example.com")
        server.answers["busy@example.com"] = ["451 4.3.0 temporary local problem"] * 100
        await drain(svc)
        assert (await item_of(svc, sub)).state == "pending"
        # Still within the lifetime: deferred again.
        clock.advance(seconds=1800)
        await drain(svc)
        item = await item_of(svc, sub)
        assert item.state == "pending" and item.attempts == 2
        # Past it: the next temporary failure is final.
        clock.advance(seconds=1801)
        await drain(svc)
        item = await item_of(svc, sub)
        assert item.state == "failed" and item.attempts == 3
        assert item.last_response.startswith("queue lifetime exceeded")
        assert "451 4.3.0 temporary local problem" in item.last_response
        clock.advance(days=1)
        assert await drain(svc) == 0
        assert server.messages == []


# --------------------------------------------------------------------------------------------
# 3. Coalescing


async def test_rapid_edits_coalesce_into_one_message_with_the_latest_sequence(
        open_svc: OpenSvc) -> None:
    with smarthost() as server:
        svc = await open_svc(server, tls="none")
        event_id, subs = await new_event(svc, "fan.one@example.com", "fan.two@example.com")
        for n, place in enumerate(["Court 1", "Court 2", "Court 3"], start=1):
            assert await edit(svc, event_id, place) == n
        assert await drain(svc) == 2
        got = server.wait(2)
        assert sorted(m.rcpt_tos[0] for m in got) == ["fan.one@example.com",
                                                       "fan.two@example.com"]
        for msg in got:
            ev = vevent(msg)
            assert int(ev["SEQUENCE"]) == 3
            assert str(ev["LOCATION"]) == "Court 3"
        for sub in subs:
            item = await item_of(svc, sub)
            assert (item.state, item.wanted_sequence, item.sent_sequence) == ("sent", 3, 3)
            assert (await subscription(svc, sub)).delivered_sequence == 3
        assert len(await items(svc)) == 2  # one row per subscription, ever


async def test_edit_while_sending_sends_the_newer_version_once_more(open_svc: OpenSvc) -> None:
    with smarthost() as server:
        svc = await open_svc(server, tls="none")
        event_id, (sub,) = await new_event(svc, "fan@example.com")
        (item_id,) = await outbox.claim(svc, 10)
        delivery = await outbox.prepare(svc, item_id)
        assert delivery is not None and delivery.sequence == 0

        # The organizer edits while version 0 is on the wire.
        assert await edit(svc, event_id, "Barclays Center") == 1
        item = await item_of(svc, sub)
        assert item.wanted_sequence == 1
        # The item stays with the worker that is sending it: no second worker takes it
        # meanwhile (that would put two copies on the wire at once).
        assert item.state == "sending"
        assert await outbox.claim(svc, 10) == []

        transport = relay.Smarthost(svc)
        result = await transport.send(delivery)
        await transport.close()
        assert result.ok
        await outbox.mark_sent(svc, delivery, result.response)
        item = await item_of(svc, sub)
        assert (item.state, item.wanted_sequence, item.sent_sequence) == ("pending", 1, 0)
        assert (await subscription(svc, sub)).delivered_sequence == 0

        assert await drain(svc) == 1
        got = server.wait(2)
        assert [int(vevent(m)["SEQUENCE"]) for m in got] == [0, 1]
        assert str(vevent(got[1])["LOCATION"]) == "Barclays Center"
        item = await item_of(svc, sub)
        assert (item.state, item.sent_sequence) == ("sent", 1)
        assert (await subscription(svc, sub)).delivered_sequence == 1
        assert await drain(svc) == 0


async def test_edit_while_a_retry_waits_resets_the_wait(open_svc: OpenSvc) -> None:
    """A deferred item that gets a newer version is due at once and carries the new one."""
    clock = Clock()
    with smarthost() as server:
        svc = await open_svc(server, clock, tls="none", retry_base=600)
        event_id, (sub,) = await new_event(svc, "fan@example.com")
        server.answers["fan@example.com"] = ["421 4.7.0 try again later"]
        await drain(svc)
        assert (await item_of(svc, sub)).state == "pending"
        await edit(svc, event_id, "Court 9")
        assert await drain(svc) == 1
        (msg,) = server.wait(1)
        assert int(vevent(msg)["SEQUENCE"]) == 1


# --------------------------------------------------------------------------------------------
# 4. Dead workers, restarts, unsubscribes


async def test_claim_of_a_dead_worker_is_taken_again(open_svc: OpenSvc) -> None:
    clock = Clock()
    with smarthost() as server:
        svc = await open_svc(server, clock, tls="none")
        _, (sub,) = await new_event(svc, "fan@example.com")
        (item_id,) = await outbox.claim(svc, 10)  # this worker dies here
        item = await item_of(svc, sub)
        assert item.id == item_id
        assert item.state == "sending" and item.claimed_until is not None
        assert await outbox.claim(svc, 10) == []  # the claim still holds
        clock.to(item.claimed_until - timedelta(seconds=1))
        assert await outbox.claim(svc, 10) == []
        clock.to(item.claimed_until + timedelta(seconds=1))
        assert await drain(svc) == 1
        server.wait(1)
        item = await item_of(svc, sub)
        assert item.state == "sent" and item.attempts == 2
        assert len(server.messages) == 1


async def test_restart_does_not_resend_what_was_delivered(open_svc: OpenSvc) -> None:
    with smarthost() as server:
        first = await open_svc(server, tls="none")
        event_id, subs = await new_event(first, "fan.one@example.com", "fan.two@example.com")
        await drain(first)
        server.wait(2)
        await first.close()

        # A new process on the same database, running its relay workers.
        second = await open_svc(server, tls="none")
        stop = asyncio.Event()
        rel = relay.Relay(second)
        workers = [asyncio.create_task(rel.worker(stop, poll=0.05)) for _ in range(2)]
        await asyncio.sleep(0.3)
        assert len(server.messages) == 2
        # The workers still deliver what is new, woken by the enqueue.
        await edit(second, event_id, "Court 2")
        await asyncio.to_thread(server.wait, 4)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*workers), 10)
        assert len(server.messages) == 4
        for sub in subs:
            assert (await item_of(second, sub)).sent_sequence == 1
            assert len(server.to((await subscription(second, sub)).email)) == 2


async def test_worker_stop_finishes_the_message_in_flight_and_gives_back_the_rest(
        open_svc: OpenSvc) -> None:
    with smarthost() as server:
        server.gate = threading.Event()
        svc = await open_svc(server, tls="none")
        _, subs = await new_event(svc, "a@example.com", "b@example.com", "c@example.com")
        stop = asyncio.Event()
        worker = asyncio.create_task(relay.Relay(svc).worker(stop, poll=0.05))
        assert await asyncio.to_thread(server.in_data.wait, 10)
        stop.set()  # SIGTERM while the first message is on the wire
        server.gate.set()
        await asyncio.wait_for(worker, 10)
        assert len(server.messages) == 1
        states = sorted([(i.state, i.attempts, i.claimed_until) for i in await items(svc)],
                        key=lambda t: t[0])
        assert states == [("pending", 0, None), ("pending", 0, None), ("sent", 1, None)]
        # The next start delivers the rest, and only the rest.
        server.gate = None
        assert await drain(svc) == 2
        assert sorted(m.rcpt_tos[0] for m in server.wait(3)) == [
            "a@example.com", "b@example.com", "c@example.com"]
        for sub in subs:
            assert (await item_of(svc, sub)).state == "sent"


async def test_two_instances_never_take_the_same_item(open_svc: OpenSvc) -> None:
    """Several `ciserver serve` on one database (DESIGN §6): claims are disjoint, and
    draining from both at once sends each subscriber exactly one message."""
    with smarthost() as server:
        a = await open_svc(server, tls="none")
        b = await open_svc(server, tls="none")
        fans = [f"fan{n}@example.com" for n in range(30)]
        await new_event(a, *fans)
        claims = await asyncio.gather(*(outbox.claim(s, 4) for s in (a, b, a, b, a, b)))
        taken = [i for c in claims for i in c]
        assert len(taken) == len(set(taken)) == 24
        for item_id in taken:
            await outbox.release(a, item_id)
        await asyncio.gather(relay.Relay(a).drain(), relay.Relay(b).drain(),
                             relay.Relay(a).drain(), relay.Relay(b).drain())
        got = server.wait(30)
        assert sorted(m.rcpt_tos[0] for m in got) == sorted(fans)
        assert {i.state for i in await items(a)} == {"sent"}


async def test_release_gives_a_claim_back_untouched(open_svc: OpenSvc) -> None:
    with smarthost() as server:
        svc = await open_svc(server, tls="none")
        _, (sub,) = await new_event(svc, "fan@example.com")
        (item_id,) = await outbox.claim(svc, 10)
        await outbox.release(svc, item_id)
        item = await item_of(svc, sub)
        assert (item.state, item.attempts, item.claimed_until) == ("pending", 0, None)
        assert await drain(svc) == 1
        assert len(server.wait(1)) == 1


async def test_unsubscribed_subscribers_get_nothing(open_svc: OpenSvc) -> None:
    with smarthost() as server:
        svc = await open_svc(server, tls="none")
        event_id, (stays, leaves, leaves_late) = await new_event(
            svc, "stays@example.com", "leaves@example.com", "late@example.com")

        async def unsubscribe(sub_id: int) -> None:
            async with svc.sessions.begin() as session:
                sub = await session.get(Subscription, sub_id)
                assert sub is not None
                assert await subscriptions.stop(svc, session, sub, "unsubscribed")

        await unsubscribe(leaves)
        assert (await item_of(svc, leaves)).state == "cancelled"
        # Unsubscribed after a worker claimed the item, before the message was built.
        ids = await outbox.claim(svc, 10)
        late_item = (await item_of(svc, leaves_late)).id
        assert late_item in ids
        await unsubscribe(leaves_late)
        assert await outbox.prepare(svc, late_item) is None
        late = await item_of(svc, leaves_late)
        assert late.state == "cancelled" and "no longer active" in late.last_response
        for item_id in ids:
            if item_id != late_item:
                await outbox.release(svc, item_id)

        await drain(svc)
        # Later edits reach only the remaining subscriber.
        await edit(svc, event_id, "Court 2")
        await drain(svc)
        assert [m.rcpt_tos for m in server.messages] == [["stays@example.com"]] * 2
        assert (await item_of(svc, leaves)).state == "cancelled"
        assert (await item_of(svc, leaves_late)).state == "cancelled"
        assert (await item_of(svc, stays)).sent_sequence == 1


async def test_asking_again_after_unsubscribing_sends_the_current_version(
        open_svc: OpenSvc) -> None:
    with smarthost() as server:
        svc = await open_svc(server, tls="none")
        event_id, (sub,) = await new_event(svc, "fan@example.com")
        await drain(svc)
        async with svc.sessions.begin() as session:
            row = await session.get(Subscription, sub)
            assert row is not None
            await subscriptions.stop(svc, session, row, "unsubscribed")
        await edit(svc, event_id, "Court 2")
        assert await drain(svc) == 0
        async with svc.sessions.begin() as session:
            event = await session.get(Event, event_id)
            assert event is not None
            again = await subscriptions.invite(svc, session, event, "fan@example.com")
            assert again.queued and again.subscription.id == sub
        item = await item_of(svc, sub)
        assert (item.state, item.wanted_sequence, item.attempts) == ("pending", 1, 0)
        assert await drain(svc) == 1
        assert [int(vevent(m)["SEQUENCE"]) for m in server.wait(2)] == [0, 1]


# --------------------------------------------------------------------------------------------
# 5. Envelope senders


async def test_envelope_senders(open_svc: OpenSvc) -> None:
    with smarthost() as server:
        svc = await open_svc(server, tls="none")
        _, (sub,) = await new_event(svc, "Fan@Example.com")
        async with svc.sessions.begin() as session:
            await notify.send(svc, session, to=ORGANIZER, subject="Event ready",
                              text="Your event is live.\n",
                              in_reply_to="<invite@team.example>")
        await drain(svc)
        server.wait(2)
        (invite,) = server.to("fan@example.com")
        (notice,) = server.to(ORGANIZER)

        token = svc.book.token(sub)
        assert invite.mail_from == f"bounce+{token}@{DOMAIN}"
        assert token == token.lower() and len(invite.mail_from.partition("@")[0]) <= 64
        parsed = svc.book.parse(invite.mail_from)
        assert parsed is not None
        assert (parsed.kind, parsed.subscription_id) == (Kind.BOUNCE, sub)

        # MAIL FROM:<>, the null reverse-path (aiosmtpd keeps it as "<>")
        assert notice.mail_from == "<>"
        assert notice.message["Auto-Submitted"] == "auto-replied"
        (note_item,) = [i for i in await items(svc) if i.kind == "message"]
        assert note_item.state == "sent" and note_item.sent_sequence is None


# --------------------------------------------------------------------------------------------
# Direct delivery to MX (no smarthost): DNS is the one part faked here


@dataclass
class _Mx:
    preference: int
    exchange: str


class FakeResolver:
    def __init__(self, answers: dict[str, list[_Mx] | type[Exception]]) -> None:
        self.answers = answers

    async def resolve(self, name: str, rdtype: str) -> list[_Mx]:
        assert rdtype == "MX"
        answer = self.answers[name]
        if isinstance(answer, type):
            raise answer()
        return answer


async def test_direct_mx_delivery(sqlite_open_svc: OpenSvc) -> None:
    with smarthost() as mx:
        svc = await sqlite_open_svc(None, mx_port=mx.port)
        assert not svc.config.relay.smarthost
        svc.resolver = FakeResolver({
            "example.com": [_Mx(20, "127.0.0.2."), _Mx(10, "127.0.0.1.")],
            "nullmx.example": [_Mx(0, ".")],
            "nxdomain.example": dns.resolver.NXDOMAIN,
        })
        _, (ok, null, nx) = await new_event(svc, "fan@example.com", "fan@nullmx.example",
                                            "fan@nxdomain.example")
        await drain(svc)
        assert [m.rcpt_tos for m in mx.wait(1)] == [["fan@example.com"]]
        assert mx.messages[0].mail_from.startswith("bounce+")
        assert (await item_of(svc, ok)).state == "sent"
        for sub in (null, nx):
            item = await item_of(svc, sub)
            assert item.state == "failed"
            assert item.last_response.startswith("550 5.1.2")


async def test_a_message_that_cannot_be_built_fails_alone(open_svc: OpenSvc) -> None:
    """An address stored before check_email refused it (a local part beyond ASCII: no
    SMTPUTF8 on our side) cannot be put in a header. Its item fails with the reason; the
    batch's other invites go out, at once, not after endless retries."""
    with smarthost() as server:
        svc = await open_svc(server, tls="none")
        _, subs = await new_event(svc, "one@example.com", "two@example.org",
                                  "three@example.net")
        async with svc.sessions.begin() as session:  # as stored by an older version
            sub = await session.get(Subscription, subs[1])
            assert sub is not None
            sub.email = "jörg@example.org"
        assert await drain(svc) == 2  # the ones built
        assert sorted(m.rcpt_tos[0] for m in server.wait(2)) == [
            "one@example.com", "three@example.net"]
        broken = await item_of(svc, subs[1])
        assert broken.state == "failed" and broken.claimed_until is None
        assert broken.last_response.startswith("the message could not be built")
        assert await drain(svc) == 0  # nothing left to retry
