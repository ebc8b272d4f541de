"""Direct delivery to each recipient domain's MX (no smarthost), against real SMTP servers.

aiosmtpd servers on loopback addresses (127.0.0.1, 127.0.0.3, ... all on [relay] mx_port)
play the remote MX hosts; the DNS of other domains is the one fake (an injected resolver with
dnspython's shape). Covered: MX preference and fallback, implicit MX, null MX and NXDOMAIN,
DNS failures, opportunistic STARTTLS, connection reuse, per-destination concurrency, the
Postfix-like retry schedule, 5xx, the queue lifetime, and rate limits (overall and per
domain) that make queued mail wait in the queue, never dropped. Time is moved with
``svc.clock`` where the schedule is tested; rate limits are measured in real time at the MX.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dns.exception
import dns.resolver
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from ciserver import relay
from ciserver.services import outbox
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import Event, Subscription

from .conftest import Sink, free_port, make_config, wait_for
from .test_relay import Clock, FakeResolver, _Mx, item_of, items, new_event, subscription, vevent

# --------------------------------------------------------------------------------------------
# Remote MX hosts: real aiosmtpd servers that count what a receiving MTA would see


class _MxSMTP(SMTP):
    """aiosmtpd's protocol, one instance per TCP connection; tells the handler when the
    connection ends so that simultaneous sessions can be counted."""

    mx_connection: int | None = None

    def connection_lost(self, error: Exception | None) -> None:
        handler = self.event_handler
        if isinstance(handler, Mx) and self.mx_connection is not None:
            handler.closed()
        super().connection_lost(error)


class _MxController(Controller):
    def factory(self) -> SMTP:
        return _MxSMTP(self.handler, **self.SMTP_kwargs)


@dataclass
class Mx(Sink):
    """A receiving MX: keeps the mail, counts connections (at EHLO, so the controller's own
    start-up probe is not one), simultaneous sessions, messages per connection, the TLS
    state at DATA and when each DATA arrived. ``delay`` slows every DATA down;
    ``data_answers`` maps a recipient to replies given at the end of DATA (then 250)."""

    delay: float = 0.0
    data_answers: dict[str, list[str]] = field(default_factory=dict)
    connections: int = 0
    active: int = 0
    max_active: int = 0
    per_connection: list[int] = field(default_factory=list)
    tls_at_data: list[str | None] = field(default_factory=list)
    stamps: list[tuple[float, str]] = field(default_factory=list)  # (monotonic, rcpt)

    async def handle_EHLO(self, server: _MxSMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does when no hook is present
        if server.mx_connection is None:  # EHLO comes again after STARTTLS
            with self.lock:
                server.mx_connection = len(self.per_connection)
                self.per_connection.append(0)
                self.connections += 1
                self.active += 1
                self.max_active = max(self.max_active, self.active)
        return responses

    def closed(self) -> None:
        with self.lock:
            self.active -= 1

    async def handle_DATA(self, server: _MxSMTP, session: Session,  # type: ignore[override]
                          envelope: Envelope) -> str:
        assert server.transport is not None
        ssl_object = server.transport.get_extra_info("ssl_object")
        rcpt = envelope.rcpt_tos[0].lower()
        with self.lock:
            self.stamps.append((time.monotonic(), rcpt))
        if self.delay:
            await asyncio.sleep(self.delay)
        with self.lock:
            queue = self.data_answers.get(rcpt)
            if queue:
                return queue.pop(0)
            self.tls_at_data.append(ssl_object.version() if ssl_object is not None else None)
            if server.mx_connection is not None:
                self.per_connection[server.mx_connection] += 1
        return await super().handle_DATA(server, session, envelope)

    def rcpts(self) -> list[str]:
        with self.lock:
            return [m.rcpt_tos[0].lower() for m in self.messages]


@contextmanager
def mx(ip: str, port: int, **kwargs: Any) -> Iterator[Mx]:
    """A remote MX on ``ip``:``port`` (SMTP options such as ``tls_context`` pass through)."""
    server = Mx(host=ip, port=port)
    controller = _MxController(server, hostname=ip, port=port, **kwargs)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


class Resolver(FakeResolver):
    """The fake DNS, also noting what was asked (the relay caches MX answers)."""

    def __init__(self, answers: dict[str, list[_Mx] | type[Exception]]) -> None:
        super().__init__(answers)
        self.asked: list[str] = []

    async def resolve(self, name: str, rdtype: str) -> list[_Mx]:
        self.asked.append(name)
        return await super().resolve(name, rdtype)


@pytest.fixture(scope="module")
def mx_tls(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A self-signed certificate (openssl CLI), as many MX hosts have: opportunistic
    STARTTLS encrypts without verifying, like Postfix's smtp_tls_security_level = may."""
    d = tmp_path_factory.mktemp("mx-tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", "mx.key", "-out", "mx.pem", "-days", "2",
         "-subj", "/CN=mx.example.com", "-addext", "subjectAltName=DNS:mx.example.com"],
        cwd=d, check=True, capture_output=True)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "mx.pem", d / "mx.key")
    return ctx


# --------------------------------------------------------------------------------------------
# Services without a smarthost

OpenDirect = Callable[..., Awaitable[Services]]


@pytest.fixture
async def direct(tmp_path: Path) -> AsyncIterator[OpenDirect]:
    """Open a Services on SQLite that delivers directly to MX hosts on ``mx_port``, with the
    given fake DNS and relay settings."""
    opened: list[Services] = []

    async def factory(port: int, resolver: FakeResolver, clock: Clock | None = None,
                      **relay_cfg: object) -> Services:
        cfg = make_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'direct.db'}", None,
                          relay={"mx_port": port, **relay_cfg})
        svc = Services.open(cfg)
        await db.ensure_schema(svc.engine, cfg.database_url)
        assert not svc.config.relay.smarthost
        svc.resolver = resolver
        if clock is not None:
            svc.clock = clock
        opened.append(svc)
        return svc

    yield factory
    for svc in opened:
        await svc.close()


async def drain(svc: Services) -> int:
    """Deliver what is due now, in this task (the CLI's way); returns items tried."""
    return await relay.Relay(svc).drain()


async def run_until_sent(svc: Services, count: int, timeout: float = 40.0) -> None:
    """The daemon's relay (feeder, ``workers`` senders, recorder) until ``count`` items are
    sent; then it is stopped as SIGTERM stops it."""
    stop = asyncio.Event()
    task = asyncio.create_task(relay.Relay(svc).run(stop, poll=0.05))
    try:
        async def sent() -> int:
            return sum(1 for i in await items(svc) if i.state == "sent")

        deadline = time.monotonic() + timeout
        while await sent() < count:
            assert not task.done(), task.exception()
            assert time.monotonic() < deadline, f"only {await sent()} of {count} sent"
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


async def subscribe_unchecked(svc: Services, event_id: int, email: str) -> int:
    """A subscription with its invite queued, for an address the web forms would not take
    (``fan@localhost``: the only name that resolves here without the fake DNS)."""
    now = svc.now()
    async with svc.sessions.begin() as session:
        event = await session.get(Event, event_id)
        assert event is not None
        sub = Subscription(event_id=event_id, email=email, domain=email.rpartition("@")[2],
                           name="", status="active", source="api", partstat="NEEDS-ACTION",
                           soft_bounces=0, created_at=now, updated_at=now)
        session.add(sub)
        await session.flush()
        await outbox.enqueue_subscription(svc, session, sub, event.sequence)
        return sub.id


def fans(domain: str, n: int) -> list[str]:
    return [f"fan{i}@{domain}" for i in range(n)]


# --------------------------------------------------------------------------------------------
# MX selection


async def test_mail_goes_to_the_most_preferred_mx(direct: OpenDirect) -> None:
    port = free_port()
    with mx("127.0.0.1", port) as primary, mx("127.0.0.3", port) as backup:
        # The answer lists the backup first: the preference decides, not the order.
        resolver = Resolver({"example.com": [_Mx(20, "127.0.0.3."), _Mx(10, "127.0.0.1.")]})
        svc = await direct(port, resolver)
        _, subs = await new_event(svc, *fans("example.com", 3))
        assert await drain(svc) == 3
        assert sorted(primary.rcpts()) == fans("example.com", 3)
        assert backup.messages == [] and backup.connections == 0
        assert primary.connections == 1
        for sub in subs:
            item = await item_of(svc, sub)
            assert item.state == "sent" and item.last_response.startswith("250")
        assert resolver.asked == ["example.com"]  # one lookup for the three


async def test_next_mx_is_tried_when_the_first_refuses_connections(direct: OpenDirect) -> None:
    port = free_port()
    # Nothing listens on 127.0.0.2: connections there are refused at once.
    with mx("127.0.0.3", port) as backup:
        svc = await direct(port, Resolver({
            "example.com": [_Mx(10, "127.0.0.2."), _Mx(20, "127.0.0.3.")]}))
        _, subs = await new_event(svc, *fans("example.com", 2))
        await drain(svc)
        assert sorted(backup.rcpts()) == fans("example.com", 2)
        for sub in subs:
            assert (await item_of(svc, sub)).state == "sent"


async def test_every_mx_down_defers_with_the_connection_error(direct: OpenDirect) -> None:
    clock = Clock()
    port = free_port()
    svc = await direct(port, Resolver({
        "example.com": [_Mx(10, "127.0.0.2."), _Mx(20, "127.0.0.4.")]}), clock, retry_base=300)
    _, (sub,) = await new_event(svc, "fan@example.com")
    await drain(svc)
    item = await item_of(svc, sub)
    assert item.state == "pending" and item.attempts == 1
    assert item.next_attempt_at == clock.now + timedelta(seconds=300)
    # The answer names the last host tried and why.
    assert "127.0.0.4" in item.last_response and str(port) in item.last_response


async def test_implicit_mx_uses_the_domains_own_address(direct: OpenDirect) -> None:
    """RFC 5321 §5.1: no MX records (NoAnswer) -> the domain's own A/AAAA. "localhost" is
    the one name the system resolves here (to 127.0.0.1, where the MX listens)."""
    port = free_port()
    with mx("127.0.0.1", port) as host:
        resolver = Resolver({"localhost": dns.resolver.NoAnswer})
        svc = await direct(port, resolver)
        event_id, _ = await new_event(svc)
        sub = await subscribe_unchecked(svc, event_id, "fan@localhost")
        assert await drain(svc) == 1
        assert host.rcpts() == ["fan@localhost"]
        assert (await item_of(svc, sub)).state == "sent"
        assert resolver.asked == ["localhost"]


async def test_null_mx_and_nxdomain_fail_at_once_with_a_clear_answer(
        direct: OpenDirect) -> None:
    port = free_port()
    with mx("127.0.0.1", port) as host:
        svc = await direct(port, Resolver({
            "nullmx.example": [_Mx(0, ".")],  # RFC 7505: this domain accepts no mail
            "nxdomain.example": dns.resolver.NXDOMAIN,
            "example.com": [_Mx(10, "127.0.0.1.")],
        }))
        _, (null, nx, ok) = await new_event(svc, "fan@nullmx.example", "fan@nxdomain.example",
                                            "fan@example.com")
        await drain(svc)
        assert host.rcpts() == ["fan@example.com"]
        assert (await item_of(svc, ok)).state == "sent"
        null_item, nx_item = await item_of(svc, null), await item_of(svc, nx)
        for item in (null_item, nx_item):
            assert item.state == "failed" and item.attempts == 1
            assert item.last_response.startswith("550 5.1.2")
        assert "nullmx.example" in null_item.last_response
        assert "null MX" in null_item.last_response
        assert "nxdomain.example" in nx_item.last_response
        assert "does not exist" in nx_item.last_response


async def test_a_failed_mx_lookup_defers_and_never_guesses(direct: OpenDirect) -> None:
    """A DNS timeout or SERVFAIL says nothing about the domain's MX: the message waits
    (like Postfix) instead of going to the domain's A record, and the failure is not
    cached. "localhost" has an A record here, so a guess would reach the server."""
    clock = Clock()
    port = free_port()
    with mx("127.0.0.1", port) as host:
        resolver = Resolver({"localhost": dns.exception.Timeout})
        svc = await direct(port, resolver, clock, retry_base=300)
        event_id, _ = await new_event(svc)
        sub = await subscribe_unchecked(svc, event_id, "fan@localhost")
        await drain(svc)
        assert host.messages == []
        item = await item_of(svc, sub)
        assert item.state == "pending" and item.attempts == 1
        assert item.last_response.startswith("451 4.4.3")
        assert "localhost" in item.last_response

        resolver.answers["localhost"] = dns.resolver.NoNameservers  # SERVFAIL everywhere
        clock.advance(seconds=300)
        await drain(svc)
        assert host.messages == []
        assert (await item_of(svc, sub)).attempts == 2

        # DNS answers again: no MX, so the implicit MX is right this time.
        resolver.answers["localhost"] = dns.resolver.NoAnswer
        clock.advance(seconds=600)
        await drain(svc)
        assert host.rcpts() == ["fan@localhost"]
        assert (await item_of(svc, sub)).state == "sent"
        assert resolver.asked == ["localhost"] * 3


# --------------------------------------------------------------------------------------------
# TLS, connection reuse, concurrency


async def test_opportunistic_starttls(direct: OpenDirect, mx_tls: ssl.SSLContext) -> None:
    """STARTTLS whenever the MX offers it (a self-signed certificate is fine, as with
    Postfix's "may" level); plain text when it does not."""
    port = free_port()
    with mx("127.0.0.1", port, tls_context=mx_tls) as secure, mx("127.0.0.3", port) as plain:
        svc = await direct(port, Resolver({
            "secure.example": [_Mx(10, "127.0.0.1.")],
            "plain.example": [_Mx(10, "127.0.0.3.")]}))
        _, subs = await new_event(svc, *fans("secure.example", 3), *fans("plain.example", 2))
        await drain(svc)
        assert sorted(secure.rcpts()) == fans("secure.example", 3)
        assert sorted(plain.rcpts()) == fans("plain.example", 2)
        assert len(secure.tls_at_data) == 3
        assert all(v in ("TLSv1.2", "TLSv1.3") for v in secure.tls_at_data)
        assert plain.tls_at_data == [None, None]
        assert secure.connections == 1 and plain.connections == 1
        for sub in subs:
            assert (await item_of(svc, sub)).state == "sent"


async def test_one_connection_carries_many_messages_to_one_domain(direct: OpenDirect) -> None:
    port = free_port()
    with mx("127.0.0.1", port) as host:
        svc = await direct(port, Resolver({"fans.example": [_Mx(10, "127.0.0.1.")]}))
        _, subs = await new_event(svc, *fans("fans.example", 150))
        assert await drain(svc) == 150
        assert sorted(host.rcpts()) == sorted(fans("fans.example", 150))
        # Kept open from chunk to chunk, renewed after MAX_PER_CONNECTION messages.
        assert relay.DirectMX.MAX_PER_CONNECTION == 100
        assert host.per_connection == [100, 50]
        assert {(await item_of(svc, s)).state for s in subs} == {"sent"}
        for msg in host.messages[:3]:
            assert int(vevent(msg)["SEQUENCE"]) == 0


async def test_daemon_relay_reuses_connections_and_caps_sessions_per_domain(
        direct: OpenDirect, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon's relay with six senders: each domain's MX never sees more than
    domain_concurrency (2) sessions at once, and does see two (work is parallel); other
    domains are not held back by it; few connections carry all the mail."""
    monkeypatch.setattr(relay.Relay, "CHUNK", 10)  # six chunks a domain, for six senders
    port = free_port()
    with mx("127.0.0.1", port) as a, mx("127.0.0.3", port) as b:
        a.delay = b.delay = 0.02  # a slowish receiver: sessions overlap
        svc = await direct(port, Resolver({
            "a.example": [_Mx(10, "127.0.0.1.")], "b.example": [_Mx(10, "127.0.0.3.")]}),
            workers=6, domain_concurrency=2)
        await new_event(svc, *fans("a.example", 60), *fans("b.example", 60))
        await run_until_sent(svc, 120)
        assert sorted(a.rcpts()) == sorted(fans("a.example", 60))
        assert sorted(b.rcpts()) == sorted(fans("b.example", 60))
        assert a.max_active == 2 and b.max_active == 2
        assert a.connections <= 12 and b.connections <= 12  # vs 60 messages each
        assert await wait_active_zero(a, b)  # every connection was closed (QUIT)


async def wait_active_zero(*servers: Mx) -> bool:
    await wait_for(lambda: all(s.active == 0 for s in servers), 5)
    return True


# --------------------------------------------------------------------------------------------
# Answers of the remote MX: 4xx, 5xx, queue lifetime


async def test_4xx_then_2xx_is_retried_on_the_postfix_schedule(direct: OpenDirect) -> None:
    """Greylisting: 4xx five times, then accepted. With Postfix's defaults
    (minimal_backoff_time 300 s, maximal_backoff_time 4000 s) the waits are 300, 600,
    1200, 2400, 4000 s; the message goes out on the sixth attempt."""
    clock = Clock()
    port = free_port()
    with mx("127.0.0.1", port) as host:
        svc = await direct(port, Resolver({"example.com": [_Mx(10, "127.0.0.1.")]}), clock,
                           retry_base=300, retry_max=4000)
        _, (busy, fine) = await new_event(svc, "busy@example.com", "fine@example.com")
        host.answers["busy@example.com"] = ["451 4.7.1 greylisted, come back later"] * 5
        await drain(svc)
        assert host.rcpts() == ["fine@example.com"]
        assert (await item_of(svc, fine)).state == "sent"

        waits = []
        for attempt in range(1, 6):
            item = await item_of(svc, busy)
            assert (item.state, item.attempts) == ("pending", attempt)
            assert item.last_response == "451 4.7.1 greylisted, come back later"
            assert item.claimed_until is None
            wait = (item.next_attempt_at - clock.now).total_seconds()
            waits.append(wait)
            clock.advance(seconds=wait - 1)
            assert await drain(svc) == 0  # not due before its time
            clock.advance(seconds=1)
            assert await drain(svc) == 1
        assert waits == [300, 600, 1200, 2400, 4000]
        item = await item_of(svc, busy)
        assert (item.state, item.attempts) == ("sent", 6)
        assert item.last_response.startswith("250")
        assert host.rcpts() == ["fine@example.com", "busy@example.com"]
        assert (await subscription(svc, busy)).delivered_sequence == 0


async def test_5xx_fails_at_once_with_the_remote_answer(direct: OpenDirect) -> None:
    clock = Clock()
    port = free_port()
    with mx("127.0.0.1", port) as host:
        svc = await direct(port, Resolver({"example.com": [_Mx(10, "127.0.0.1.")]}), clock)
        _, (unknown, spam, fine) = await new_event(
            svc, "nobody@example.com", "strict@example.com", "fine@example.com")
        host.answers["nobody@example.com"] = ["550 5.1.1 <nobody@example.com>: user unknown"]
        host.data_answers["strict@example.com"] = ["554 5.7.1 message refused by policy"]
        await drain(svc)
        item = await item_of(svc, unknown)
        assert (item.state, item.attempts) == ("failed", 1)
        assert item.last_response == "550 5.1.1 <nobody@example.com>: user unknown"
        item = await item_of(svc, spam)
        assert (item.state, item.attempts) == ("failed", 1)
        assert item.last_response == "554 5.7.1 message refused by policy"
        assert (await item_of(svc, fine)).state == "sent"
        assert host.rcpts() == ["fine@example.com"]
        clock.advance(days=30)
        assert await drain(svc) == 0  # never tried again
        assert host.rcpts() == ["fine@example.com"]


async def test_a_domain_down_for_five_days_fails_with_the_last_answer(
        direct: OpenDirect) -> None:
    """max_queue_lifetime (5 days by default): retried on the backoff schedule meanwhile,
    then failed with the last answer."""
    clock = Clock()
    port = free_port()
    svc = await direct(port, Resolver({"down.example": [_Mx(10, "127.0.0.2.")]}), clock,
                       retry_base=300, retry_max=4000)
    assert svc.config.relay.max_queue_lifetime == 5 * 86400
    _, (sub,) = await new_event(svc, "fan@down.example")
    queued = clock.now
    await drain(svc)
    while True:
        item = await item_of(svc, sub)
        if item.state != "pending":
            break
        assert clock.now - queued <= timedelta(days=5)
        assert item.next_attempt_at - clock.now <= timedelta(seconds=4000)
        clock.to(item.next_attempt_at)
        assert await drain(svc) == 1
    assert item.state == "failed"
    assert clock.now - queued > timedelta(days=5)
    assert clock.now - queued <= timedelta(days=5, seconds=4000)
    assert item.last_response.startswith("queue lifetime exceeded; last answer: ")
    assert "127.0.0.2" in item.last_response
    # 4 growing waits (300..2400 s), then one every 4000 s for the rest of the five days.
    assert item.attempts == 5 + (5 * 86400 - 4500) // 4000 + 1
    clock.advance(days=1)
    assert await drain(svc) == 0


# --------------------------------------------------------------------------------------------
# Rate limits


def assert_bucket(stamps: list[float], rate: float, burst: float, what: str) -> None:
    """At most ``burst + rate * t`` sends in any stretch of ``t`` seconds (a token bucket),
    with room for loopback jitter: 0.1 s and one message."""
    stamps = sorted(stamps)
    for i in range(len(stamps)):
        for j in range(i + 1, len(stamps)):
            count, span = j - i + 1, stamps[j] - stamps[i]
            assert count <= burst + rate * (span + 0.1) + 1, (
                f"{what}: {count} sends in {span:.2f} s exceed {rate}/s (burst {burst})")


async def test_rate_limits_space_the_sends(direct: OpenDirect,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """rate_limit 6/s overall and domain_rate_limit 4/s: two domains of 16 recipients each,
    spread over four senders, reach the MX spaced accordingly."""
    monkeypatch.setattr(relay.Relay, "CHUNK", 4)  # each domain spread over the senders
    port = free_port()
    with mx("127.0.0.1", port) as host:
        svc = await direct(port, Resolver({"a.example": [_Mx(10, "127.0.0.1.")],
                                           "b.example": [_Mx(10, "127.0.0.1.")]}),
                           workers=4, rate_limit=6, domain_rate_limit=4)
        await new_event(svc, *fans("a.example", 16), *fans("b.example", 16))
        start = time.monotonic()
        await run_until_sent(svc, 32)
        assert sorted(host.rcpts()) == sorted(fans("a.example", 16) + fans("b.example", 16))
        stamps = list(host.stamps)
        assert len(stamps) == 32
        assert_bucket([t for t, _ in stamps], 6, 6, "overall")
        for domain in ("a.example", "b.example"):
            assert_bucket([t for t, r in stamps if r.endswith(domain)], 4, 4, domain)
        # (32 - 6) / 6 s at least; without the limits this takes a fraction of a second.
        assert max(t for t, _ in stamps) - start >= 26 / 6 - 0.5
        assert {i.attempts for i in await items(svc)} == {1}


async def test_mail_beyond_the_wait_window_waits_in_the_queue(
        direct: OpenDirect, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message that would wait longer than MAX_CHUNK_WAIT in memory goes back to the
    queue, due when the limit lets it through; the postponement is not an attempt, and
    nothing is dropped."""
    monkeypatch.setattr(relay.Relay, "MAX_CHUNK_WAIT", 0.2)
    port = free_port()
    with mx("127.0.0.1", port) as host:
        svc = await direct(port, Resolver({"a.example": [_Mx(10, "127.0.0.1.")],
                                           "b.example": [_Mx(10, "127.0.0.1.")]}),
                           rate_limit=3, domain_rate_limit=2)
        _, subs = await new_event(svc, *fans("a.example", 4), *fans("b.example", 4))
        rel = relay.Relay(svc)  # one per process, as in the daemon: its buckets persist
        before = datetime.now(UTC)
        assert await rel.drain() == 8
        # The bursts went out (2 to a.example, then the third overall token to b.example);
        # the rest is back in the queue for later, not failed, not counted as an attempt.
        assert sorted(host.rcpts()) == ["fan0@a.example", "fan0@b.example", "fan1@a.example"]
        waiting = [i for i in await items(svc) if i.state != "sent"]
        assert len(waiting) == 5
        for item in waiting:
            assert item.state == "pending" and item.attempts == 0
            assert item.claimed_until is None
            assert item.next_attempt_at > before + timedelta(seconds=0.2)
        assert await rel.drain() == 0  # not due yet

        deadline = time.monotonic() + 30
        while len(host.messages) < 8:
            assert time.monotonic() < deadline, host.rcpts()
            await rel.drain()
            await asyncio.sleep(0.05)
        rcpts = host.rcpts()
        assert sorted(rcpts) == sorted(fans("a.example", 4) + fans("b.example", 4))
        assert len(rcpts) == len(set(rcpts))  # each exactly once
        for sub in subs:
            item = await item_of(svc, sub)
            assert (item.state, item.attempts) == ("sent", 1)
        stamps = list(host.stamps)
        assert_bucket([t for t, _ in stamps], 3, 3, "overall")
        for domain in ("a.example", "b.example"):
            assert_bucket([t for t, r in stamps if r.endswith(domain)], 2, 2, domain)
