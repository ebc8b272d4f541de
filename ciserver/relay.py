"""Relay workers: take due outbox items and deliver them (aiosmtplib).

Through ``[relay] smarthost`` (plain, STARTTLS or implicit TLS, optional AUTH) with one
reused connection per worker, or directly to each recipient domain's MX (opportunistic
STARTTLS). 2xx marks the item sent, 4xx and network errors retry with backoff, 5xx fails it
with the remote answer recorded. A refused AUTH at the smarthost (535) is about our
configuration, not the recipient, so it defers instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass

import aiosmtplib

from .config import split_hostport
from .services import outbox
from .services.context import Services
from .services.outbox import Delivery

log = logging.getLogger("ciserver.relay")


@dataclass(frozen=True)
class Result:
    ok: bool
    permanent: bool
    response: str


def _tls_context(svc: Services) -> ssl.SSLContext:
    cfg = svc.config.relay
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    if not cfg.tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SmarthostAuthError(aiosmtplib.SMTPResponseException):
    """The smarthost refused our credentials."""


def _classify(exc: Exception) -> Result:
    if isinstance(exc, SmarthostAuthError):
        # Our credentials, not the recipient: defer, like Postfix's default
        # smtp_sasl_auth_soft_bounce = yes, so the queue survives until the operator fixes
        # the password (the answer is recorded on every item it holds back).
        return Result(False, False, f"smarthost refused AUTH: {exc.code} {exc.message}")
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
        first = exc.recipients[0]
        return Result(False, 500 <= first.code < 600, f"{first.code} {first.message}")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return Result(False, 500 <= exc.code < 600, f"{exc.code} {exc.message}")
    return Result(False, False, f"{type(exc).__name__}: {exc}")


class Smarthost:
    """One worker's connection to the smarthost, reused from message to message."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.client: aiosmtplib.SMTP | None = None

    async def _connect(self) -> aiosmtplib.SMTP:
        cfg = self.svc.config.relay
        host, port = split_hostport(cfg.smarthost, "relay", "smarthost", self.svc.config.source)
        client = aiosmtplib.SMTP(
            hostname=host, port=port, timeout=cfg.timeout, use_tls=cfg.tls == "implicit",
            start_tls=cfg.tls == "starttls",
            tls_context=_tls_context(self.svc) if cfg.tls != "none" else None,
            local_hostname=self.svc.config.smtp_hostname)
        await client.connect()
        if cfg.username:
            try:
                await client.login(cfg.username, cfg.password)
            except aiosmtplib.SMTPAuthenticationError as exc:
                client.close()
                raise SmarthostAuthError(exc.code, exc.message) from exc
            except BaseException:
                client.close()  # e.g. AUTH not offered: do not leak the connection
                raise
        return client

    async def send(self, d: Delivery) -> Result:
        for attempt in (1, 2):
            try:
                if self.client is None or not self.client.is_connected:
                    self.client = await self._connect()
                errors, message = await self.client.sendmail(d.mail_from, [d.rcpt], d.raw)
                if errors:
                    code, text = next(iter(errors.values()))
                    return Result(False, 500 <= code < 600, f"{code} {text}")
                return Result(True, False, f"250 {message}")
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                await self.close()
                if attempt == 2:  # a reused connection may have timed out: retry once fresh
                    return _classify(exc)
            except Exception as exc:
                await self.close()
                return _classify(exc)
        return Result(False, False, "unreachable")

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except Exception:
                client.close()


class TokenBucket:
    """``rate`` sends per second on average, bursts up to ``rate`` (0 = unlimited)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def reserve(self) -> float:
        """Take a token; returns how long to wait before using it."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def cancel(self) -> None:
        if self.rate > 0:
            self.tokens += 1

    def deficit(self, now: float) -> float:
        """Seconds until a token would be free."""
        tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


class MxLookupError(Exception):
    """The MX hosts of a domain could not be learnt now (DNS timeout, SERVFAIL): retry."""


def relaying_processes(svc: Services) -> int:
    """How many processes of this instance relay (see daemon.serve)."""
    cfg = svc.config
    return 1 + cfg.server.inbox_processes if cfg.from_environ else 1


class Destinations:
    """What the workers of one instance share about destination domains: MX answers (cached
    for a while), connection slots (per-destination concurrency) and rate limits."""

    MX_TTL = 300.0

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        cfg = svc.config.relay
        # The daemon and its worker processes all relay: each takes its share of the limits,
        # so that together they keep to what is configured.
        self.share = relaying_processes(svc)
        self.overall = TokenBucket(cfg.rate_limit / self.share)
        self.rates: dict[str, TokenBucket] = {}
        self.slots: dict[str, asyncio.Semaphore] = {}
        self.mx: dict[str, tuple[float, list[str], str]] = {}  # expiry, hosts, why none

    def rate(self, domain: str) -> TokenBucket:
        bucket = self.rates.get(domain)
        if bucket is None:
            bucket = self.rates[domain] = TokenBucket(
                self.svc.config.relay.domain_rate_limit / self.share)
        return bucket

    def slot(self, domain: str) -> asyncio.Semaphore:
        sem = self.slots.get(domain)
        if sem is None:
            sem = self.slots[domain] = asyncio.Semaphore(
                max(1, self.svc.config.relay.domain_concurrency // self.share))
        return sem

    def busy(self) -> list[str]:
        """Domains every slot of which is taken, or whose rate limit is spent for more than
        a second: the next claim leaves them out (their mail waits in the queue)."""
        now = time.monotonic()
        return [d for d, sem in self.slots.items() if sem.locked()] + [
            d for d, b in self.rates.items() if b.rate > 0 and b.deficit(now) > 1.0]

    async def hosts(self, domain: str) -> tuple[list[str], str]:
        """The hosts to try, by preference; none (and why) if the domain takes no mail.
        Raises MxLookupError when DNS cannot tell now (not cached)."""
        cached = self.mx.get(domain)
        if cached and cached[0] > time.monotonic():
            return cached[1], cached[2]
        hosts, why = await self._lookup(domain)
        self.mx[domain] = (time.monotonic() + self.MX_TTL, hosts, why)
        return hosts, why

    async def _lookup(self, domain: str) -> tuple[list[str], str]:
        import dns.asyncresolver
        import dns.exception
        import dns.resolver

        resolver = self.svc.resolver or dns.asyncresolver.Resolver()
        try:
            answer = await resolver.resolve(domain, "MX")
            records = sorted(answer, key=lambda r: r.preference)
            hosts = [str(r.exchange).rstrip(".") for r in records]
            if hosts == [""]:
                return [], "accepts no mail (null MX, RFC 7505)"
            return hosts, ""
        except dns.resolver.NXDOMAIN:
            return [], "does not exist (NXDOMAIN)"
        except dns.resolver.NoAnswer:
            return [domain], ""  # RFC 5321 §5.1 implicit MX: the domain's own A/AAAA
        except dns.exception.DNSException as exc:
            # Timeout, SERVFAIL: nothing is known about the MX; guessing the A record
            # could hand the mail to the wrong host. Postfix defers too.
            raise MxLookupError(f"451 4.4.3 MX lookup for {domain} failed: {exc}") from exc


class DirectMX:
    """Delivery to the recipient domain's MX hosts (implicit MX, then A/AAAA), opportunistic
    STARTTLS, one connection kept open while consecutive messages go to the same domain."""

    MAX_PER_CONNECTION = 100

    def __init__(self, svc: Services, destinations: Destinations | None = None) -> None:
        self.svc = svc
        self.destinations = destinations or Destinations(svc)
        self.domain = ""
        self.client: aiosmtplib.SMTP | None = None
        self.slot: asyncio.Semaphore | None = None
        self.count = 0

    async def _open(self, domain: str) -> Result | None:
        """Connect to the first MX of ``domain`` that answers; a Result on failure."""
        try:
            hosts, why = await self.destinations.hosts(domain)
        except MxLookupError as exc:
            return Result(False, False, str(exc))
        if not hosts:
            return Result(False, True, f"550 5.1.2 domain {domain} {why}")
        cfg = self.svc.config.relay
        last = Result(False, False, "no MX host answered")
        slot = self.destinations.slot(domain)
        await slot.acquire()  # (self.slot only once held: close() releases it)
        self.slot = slot
        for host in hosts:
            client = aiosmtplib.SMTP(hostname=host, port=cfg.mx_port, timeout=cfg.timeout,
                                     start_tls=None, validate_certs=False,
                                     local_hostname=self.svc.config.smtp_hostname)
            try:
                await client.connect()
            except Exception as exc:
                last = _classify(exc)
                client.close()
                continue
            self.client, self.domain, self.count = client, domain, 0
            return None
        self.slot.release()
        self.slot = None
        return last

    async def send(self, d: Delivery) -> Result:
        domain = d.rcpt.rpartition("@")[2].lower()
        for attempt in (1, 2):
            reused = (self.client is not None and self.client.is_connected
                      and self.domain == domain and self.count < self.MAX_PER_CONNECTION)
            if not reused:
                await self.close()
                failure = await self._open(domain)
                if failure is not None:
                    return failure
            client = self.client
            assert client is not None
            try:
                errors, message = await client.sendmail(d.mail_from, [d.rcpt], d.raw)
                self.count += 1
                if errors:
                    code, text = next(iter(errors.values()))
                    return Result(False, 500 <= code < 600, f"{code} {text}")
                return Result(True, False, f"250 {message}")
            except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
                await self.close()
                if not reused or attempt == 2:
                    return _classify(exc)
            except Exception as exc:
                await self.close()
                return _classify(exc)
        return Result(False, False, "unreachable")

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None and client.is_connected:
            try:
                await client.quit()
            except Exception:
                client.close()
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class Relay:
    """The relay workers of this instance (one Relay shared by all of them).

    Each worker claims a batch (one statement), builds its messages from per-version
    templates, sends them over a kept connection and records the outcomes in one transaction
    per RECORD_EVERY results: the database is touched a few times per batch, not per
    message (bench/fanout). A delivery whose result is not yet recorded when the process
    dies is sent again after the claim expires: at most that window is sent twice.
    """

    BATCH = 200
    CHUNK = 25  # deliveries to one domain handed to one connection at a time
    RECORD_EVERY = 100
    RECORD_INTERVAL = 0.2  # seconds between writes of delivery outcomes
    MAX_CHUNK_WAIT = 1.0  # a longer wait for a rate limit: the chunk goes back to the queue

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.templates = outbox.TemplateCache()
        self.destinations = Destinations(svc)

    def _transport(self) -> Smarthost | DirectMX:
        if self.svc.config.relay.smarthost:
            return Smarthost(self.svc)
        return DirectMX(self.svc, self.destinations)

    async def _deliver(self, transport: Smarthost | DirectMX, item_id: int) -> None:
        """One item, the slow way (kept for tests of single deliveries)."""
        try:
            delivery = await outbox.prepare(self.svc, item_id)
        except Exception:
            log.exception("outbox item %s could not be prepared", item_id)
            await outbox.mark_failed(self.svc, Delivery(item_id, "", "", b"", None),
                                     "could not build the message", permanent=False)
            return
        if delivery is None:
            return
        result = await transport.send(delivery)
        if result.ok:
            await outbox.mark_sent(self.svc, delivery, result.response)
            log.info("sent item=%s to=%s seq=%s", item_id, delivery.rcpt, delivery.sequence)
        else:
            await outbox.mark_failed(self.svc, delivery, result.response, result.permanent)
            log.warning("delivery %s item=%s to=%s: %s",
                        "failed" if result.permanent else "deferred", item_id, delivery.rcpt,
                        result.response)

    def _rate_wait(self, domain: str) -> float:
        """Seconds to wait before the next message to ``domain``; a wait longer than
        MAX_CHUNK_WAIT is not taken (the token is given back) and the mail is postponed."""
        overall, per_domain = self.destinations.overall, self.destinations.rate(domain)
        wait = max(overall.reserve(), per_domain.reserve())
        if wait > self.MAX_CHUNK_WAIT:
            overall.cancel()
            per_domain.cancel()
        return wait

    async def _batch(self, transport: Smarthost | DirectMX, stop: asyncio.Event | None) -> int:
        """Claim, build, send and record one batch, in turn (drain(); the daemon uses run(),
        which overlaps these steps); returns how many items were claimed."""
        chunks = await self._fetch([])
        if chunks is None:
            return 0
        recorder = _Recorder(self.svc)
        for n, (claims, chunk) in enumerate(chunks):
            recorder.claims.update(claims)
            if stop is not None and stop.is_set():
                await outbox.release_many(self.svc, [d.item_id for _, c in chunks[n:]
                                                     for d in c])
                break
            await self._send_chunk(transport, chunk, recorder, stop)
        await recorder.flush()
        return sum(len(c) for _, c in chunks) or 1

    async def _fetch(self, busy: list[str]) -> list[tuple[dict[int, outbox.Claimed],
                                                          list[Delivery]]] | None:
        """One claimed batch as chunks of deliveries to one domain each (None: nothing)."""
        claimed = await outbox.claim_batch(self.svc, self.BATCH, busy)
        if not claimed:
            return None
        claims = {c.id: c for c in claimed}
        try:
            deliveries = await outbox.prepare_batch(self.svc, claimed, self.templates)
        except Exception:
            log.exception("a batch of %d could not be built; it is tried again later",
                          len(claimed))
            await outbox.postpone(self.svc, [(c.id, 60.0) for c in claimed])
            return []
        chunks: list[tuple[dict[int, outbox.Claimed], list[Delivery]]] = []
        for d in deliveries:
            domain = d.rcpt.rpartition("@")[2].lower()
            if chunks and chunks[-1][1][-1].rcpt.rpartition("@")[2].lower() == domain \
                    and len(chunks[-1][1]) < self.CHUNK:
                chunks[-1][1].append(d)
            else:
                chunks.append(({}, [d]))
            chunks[-1][0][d.item_id] = claims[d.item_id]
        return chunks

    async def _send_chunk(self, transport: Smarthost | DirectMX, chunk: list[Delivery],
                          recorder: _Recorder, stop: asyncio.Event | None = None) -> None:
        later: list[tuple[int, float]] = []
        for n, d in enumerate(chunk):
            if stop is not None and stop.is_set():  # shutting down: give back the rest
                await outbox.release_many(self.svc, [x.item_id for x in chunk[n:]])
                break
            wait = self._rate_wait(d.rcpt.rpartition("@")[2].lower())
            if wait > self.MAX_CHUNK_WAIT:
                # This domain's limit is spent: the rest of the chunk waits in the queue
                # instead of holding a connection (and other domains' mail) meanwhile.
                later += [(x.item_id, wait) for x in chunk[n:]]
                break
            if wait:
                await asyncio.sleep(wait)
            try:
                result = await transport.send(d)
            except Exception as exc:  # a bad item never kills the worker
                log.exception("outbox item %s: unexpected error", d.item_id)
                result = Result(False, False, f"{type(exc).__name__}: {exc}")
            if result.ok:
                log.info("sent item=%s sub=%s to=%s seq=%s", d.item_id,
                         d.subscription_id or "-", d.rcpt, d.sequence)
            else:
                log.warning("delivery %s item=%s sub=%s to=%s: %s",
                            "failed" if result.permanent else "deferred", d.item_id,
                            d.subscription_id or "-", d.rcpt, result.response)
            await recorder.add(d, result)
        if later:
            for item_id, _ in later:  # back in the queue: no outcome will be recorded
                recorder.claims.pop(item_id, None)
            await outbox.postpone(self.svc, later)

    async def run(self, stop: asyncio.Event, senders: int | None = None,
                  poll: float = 2.0) -> None:
        """The daemon's relay: one feeder claims and builds batches ahead, ``senders``
        connections send chunks from the queue, one recorder writes outcomes in groups.
        Building the next batch while the current one is on the wire keeps every
        connection busy (bench/fanout)."""
        n = senders or self.svc.config.relay.workers
        queue: asyncio.Queue[tuple[dict[int, outbox.Claimed], list[Delivery]] | None] = \
            asyncio.Queue(maxsize=max(4, 2 * self.BATCH // self.CHUNK))
        recorder = _Recorder(self.svc)

        async def feeder() -> None:
            while not stop.is_set():
                try:
                    busy = self.destinations.busy() if not self.svc.config.relay.smarthost \
                        else []
                    chunks = await self._fetch(busy)
                except Exception:
                    log.exception("relay claim failed; retrying")
                    await _sleep_or_stop(stop, poll)
                    continue
                if chunks is None:
                    self.svc.outbox_ready.clear()
                    waiter = asyncio.ensure_future(self.svc.outbox_ready.wait())
                    stopper = asyncio.ensure_future(stop.wait())
                    await asyncio.wait({waiter, stopper}, timeout=poll,
                                       return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    stopper.cancel()
                    continue
                for item in chunks:
                    recorder.claims.update(item[0])
                    await queue.put(item)
            for _ in range(n):
                await queue.put(None)

        async def sender() -> None:
            transport = self._transport()
            try:
                while True:
                    if queue.empty():
                        await transport.close()  # idle: do not hold connections open
                    item = await queue.get()
                    if item is None:
                        return
                    if stop.is_set():  # shutting down: give back what was not started
                        await outbox.release_many(self.svc, [d.item_id for d in item[1]])
                        continue
                    await self._send_chunk(transport, item[1], recorder, stop)
            finally:
                await transport.close()

        async def flusher() -> None:
            beat = max(1.0, self.svc.config.relay.claim_timeout / 3)
            next_beat = time.monotonic() + beat
            while not stop.is_set():
                await _sleep_or_stop(stop, self.RECORD_INTERVAL)
                await recorder.flush()
                if time.monotonic() >= next_beat:
                    # Claims we still hold (queued here, or on the wire) must not expire:
                    # expiry means "that instance died", and another would send them again.
                    next_beat = time.monotonic() + beat
                    try:
                        await outbox.extend_claims(self.svc, list(recorder.claims))
                    except Exception:
                        log.exception("could not extend %d claims", len(recorder.claims))

        tasks = [asyncio.create_task(feeder()), asyncio.create_task(flusher()),
                 *(asyncio.create_task(sender()) for _ in range(n))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await recorder.flush()

    async def worker(self, stop: asyncio.Event, poll: float = 2.0) -> None:
        """One sending connection with its own feeder (tests; the daemon uses run())."""
        await self.run(stop, senders=1, poll=poll)

    async def drain(self) -> int:
        """Deliver everything due now (tests and CLI). Returns how many items were tried."""
        transport = self._transport()
        count = 0
        try:
            while n := await self._batch(transport, None):
                count += n if n > 0 else 0
        finally:
            await transport.close()
        return count


class _Recorder:
    """Delivery outcomes, written to the outbox in groups (RECORD_EVERY or every
    RECORD_INTERVAL), so that the store is not the pace of sending."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.claims: dict[int, outbox.Claimed] = {}
        self.results: list[tuple[Delivery, bool, bool, str]] = []
        self.lock = asyncio.Lock()

    async def add(self, d: Delivery, result: Result) -> None:
        self.results.append((d, result.ok, result.permanent, result.response))
        if len(self.results) >= Relay.RECORD_EVERY:
            await self.flush()

    async def flush(self) -> None:
        async with self.lock:
            results, self.results = self.results, []
            if not results:
                return
            claims = {d.item_id: self.claims.pop(d.item_id) for d, *_ in results
                      if d.item_id in self.claims}
            try:
                await outbox.record(self.svc, results, claims)
            except Exception:
                log.exception("could not record %d delivery outcomes; their claims expire "
                              "and they are sent again", len(results))


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
