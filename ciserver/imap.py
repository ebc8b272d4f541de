"""IMAP poller: mail for create@ (or rsvp+...) that lives at another provider.

One :class:`Poller` per ``[imap] accounts`` entry runs as a task of the daemon. It connects
(implicit TLS, STARTTLS or plain), logs in, selects the mailbox and takes every unseen message
(with ``after = "move"``: every message) in UID order: the raw message is committed to the
durable inbox exactly like SMTP mail, and only after that commit is it flagged ``\\Seen`` or
moved to ``move_to`` (MOVE when the server has it, else COPY + ``\\Deleted`` + EXPUNGE). A
message whose commit fails stays untouched on the server and is taken again later; a message
committed but not yet flagged (the connection broke in between) is only flagged, not
committed twice, on the next connection of the same process. A message larger than
``[smtp] max_message_size`` is left untouched (and logged once).

New mail is noticed with IDLE when the server offers it, else by polling every
``poll_interval`` seconds; even in IDLE the mailbox is re-checked that often (at most every
25 minutes: servers drop IDLE after about 29). Any error closes the connection and the poller
reconnects after 1 s, doubling up to ``retry_max``; a broken account never affects the others
or the daemon. The daemon's ``stop`` event ends it cleanly (the message in hand is finished).

On PostgreSQL, where several instances share one database, a session advisory lock per
account lets exactly one instance poll it; the others stand by and take over when it goes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.parser
import email.policy
import email.utils
import hashlib
import logging
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Iterable
from email.message import Message
from typing import Any, TypeVar

import aioimaplib
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from .addresses import AddressBook, domain_of, normalize_email
from .config import ImapAccount
from .services import inbox
from .services.context import Services

log = logging.getLogger("ciserver.imap")

T = TypeVar("T")

RETRY_BASE = 1.0  # seconds before the first reconnect; doubles up to account.retry_max
IDLE_RENEW_MAX = 25 * 60  # servers end IDLE after ~29 minutes (RFC 2177)
LOGOUT_TIMEOUT = 5.0
SIZE_BATCH = 200  # UIDs per FETCH (RFC822.SIZE)
STANDBY_RECHECK = 60.0  # seconds between tries of a standby instance (PostgreSQL)
ENVELOPE_HEADERS = ("Delivered-To", "X-Original-To")
ADDRESS_HEADERS = ("To", "Cc")
_UIDVALIDITY = re.compile(rb"UIDVALIDITY (\d+)")
_FETCH_UID = re.compile(rb"\bUID (\d+)")
_FETCH_SIZE = re.compile(rb"\bRFC822\.SIZE (\d+)")
_IDLE_NEWS = re.compile(rb"\b(EXISTS|RECENT|EXPUNGE|FETCH)\b")


class ImapError(Exception):
    """The server refused something or the conversation broke; the poller reconnects."""


class CommitFailed(Exception):
    """The inbox could not store a message; it stays unflagged on the server."""


class _Stopped(Exception):
    """The daemon is stopping: the step in progress was abandoned (nothing was in hand)."""


# --------------------------------------------------------------------------------------------
# Pure helpers


def parse_headers(raw: bytes) -> Message:
    return email.parser.BytesParser(policy=email.policy.compat32).parsebytes(
        raw, headersonly=True)


def _addresses(headers: Message, names: Iterable[str]) -> list[str]:
    found: list[str] = []
    values = [str(v) for name in names for v in headers.get_all(name, [])]
    for _, addr in email.utils.getaddresses(values):
        addr = normalize_email(addr)
        if addr and "@" in addr and addr not in found:
            found.append(addr)
    return found


def recipients(book: AddressBook, headers: Message, fallback: str) -> list[str]:
    """Which of our addresses a fetched message was for.

    The envelope headers the provider adds at delivery (Delivered-To, X-Original-To) are the
    best evidence; failing those, our addresses among To and Cc. A message that names only
    addresses on our domain that are not ours (a forged or damaged token) keeps those: the
    inbox records that nothing could be applied, where SMTP would have refused them. A message
    naming nothing on our domain is for ``fallback`` (the account's ``deliver_to``)."""
    for names in (ENVELOPE_HEADERS, ADDRESS_HEADERS):
        ours = [a for a in _addresses(headers, names) if book.parse(a) is not None]
        if ours:
            return ours
    stray = [a for a in _addresses(headers, ENVELOPE_HEADERS + ADDRESS_HEADERS)
             if domain_of(a) == book.domain]
    return stray or [fallback]


def envelope_sender(headers: Message) -> str:
    """The envelope sender recorded at final delivery (Return-Path), or "" if none."""
    value = headers.get("Return-Path")
    if value is None:
        return ""
    return str(value).strip().strip("<>").strip()


def mailbox_name(name: str) -> str:
    """A folder name as an IMAP quoted string, in modified UTF-7 (RFC 3501 section 5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            b64 = base64.b64encode("".join(pending).encode("utf-16-be")).rstrip(b"=")
            out.append("&" + b64.replace(b"/", b",").decode() + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    encoded = "".join(out).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{encoded}"'


def _text(resp: Any) -> str:
    lines = [bytes(x) for x in getattr(resp, "lines", []) if isinstance(x, bytes | bytearray)]
    return lines[-1].decode(errors="replace").strip() if lines else ""


def _ok(resp: Any, what: str) -> None:
    if getattr(resp, "result", None) != "OK":
        raise ImapError(f"{what} refused: {getattr(resp, 'result', '?')} {_text(resp)}".strip())


def _describe(exc: BaseException) -> str:
    message = str(exc).strip()
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ImapError | CommitFailed):
        return message
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


# --------------------------------------------------------------------------------------------


class Poller:
    """Fetches one account's mailbox into the inbox until ``stop`` is set."""

    def __init__(self, svc: Services, account: ImapAccount) -> None:
        self.svc = svc
        self.account = account
        self.label = account.label
        self.fallback = account.deliver_to or svc.book.create
        # Observable state (tests, logs): connecting | sweeping | idle | waiting | backoff |
        # standby | stopped.
        self.state = "stopped"
        self.sessions = 0  # successful logins
        self.sweeps = 0  # completed mailbox checks
        self.handled = 0  # messages committed and flagged/moved
        self.failures = 0  # connection attempts or sessions that ended in an error
        self._client: Any = None
        self._lost = asyncio.Event()
        self._stop = asyncio.Event()
        self._committed: dict[tuple[int, int], int] = {}  # (uidvalidity, uid) -> inbox id
        self._too_big: set[tuple[int, int]] = set()

    # -- the outer loop ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        self._stop = stop
        delay = RETRY_BASE
        standby_logged = False
        while not stop.is_set():
            self.state = "connecting"
            sessions_before = self.sessions
            pause = delay
            try:
                async with self._exclusive() as mine:
                    if mine:
                        standby_logged = False
                        await self._session(stop)
                    else:
                        if not standby_logged:
                            log.info("imap %s: another instance polls this account; standing "
                                     "by", self.label)
                            standby_logged = True
                        self.state = "standby"
                        pause = min(float(self.account.poll_interval), STANDBY_RECHECK)
            except asyncio.CancelledError:
                self._close()
                self.state = "stopped"
                raise
            except _Stopped:
                pass
            except (OSError, TimeoutError, ImapError, aioimaplib.AioImapException,
                    SQLAlchemyError) as exc:
                self.failures += 1
                if self.sessions > sessions_before:
                    delay = pause = RETRY_BASE  # it had worked: start the backoff again
                log.warning("imap %s: %s; reconnecting in %g s", self.label, _describe(exc),
                            pause)
                delay = min(delay * 2, float(self.account.retry_max))
            except CommitFailed as exc:
                self.failures += 1
                log.error("imap %s: %s; reconnecting in %g s", self.label, exc, pause)
                delay = min(delay * 2, float(self.account.retry_max))
            except Exception:  # never let one account take the daemon down
                self.failures += 1
                log.exception("imap %s: unexpected error; reconnecting in %g s", self.label,
                              pause)
                delay = min(delay * 2, float(self.account.retry_max))
            finally:
                self._close()
            if stop.is_set():
                break
            if self.state != "standby":
                self.state = "backoff"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
        self.state = "stopped"

    @contextlib.asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[bool]:
        """Whether this instance may poll the account now. Always on SQLite (one daemon);
        on PostgreSQL, while it holds the account's session advisory lock."""
        if self.svc.dialect != "postgresql":
            yield True
            return
        a = self.account
        name = f"ciserver imap {a.username}@{a.host}:{a.effective_port}/{a.mailbox}"
        key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
        async with self.svc.engine.connect() as conn:
            got = bool((await conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                           {"k": key})).scalar())
            await conn.commit()  # the lock outlives the transaction; no idle transaction
            try:
                yield got
            finally:
                if got:
                    with contextlib.suppress(Exception):
                        await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                        await conn.commit()

    # -- one connection ----------------------------------------------------------------------
    async def _session(self, stop: asyncio.Event) -> None:
        a = self.account
        client = await self._connect()
        resp = await self._call(client.login(aioimaplib.quoted(a.username), a.password))
        if resp.result != "OK":
            raise ImapError(f"login as {a.username!r} refused: {_text(resp)}")
        await self._call(client.protocol.capability())  # the full list, after login
        resp = await self._call(client.select(mailbox_name(a.mailbox)))
        _ok(resp, f"SELECT {a.mailbox}")
        m = next((_UIDVALIDITY.search(bytes(x)) for x in resp.lines
                  if isinstance(x, bytes | bytearray) and _UIDVALIDITY.search(bytes(x))), None)
        uidvalidity = int(m.group(1)) if m else 0
        if a.after == "move":
            resp = await self._call(client.create(mailbox_name(a.move_to)))
            if resp.result == "OK":
                log.info("imap %s: created folder %s", self.label, a.move_to)
        use_idle = a.idle and client.has_capability("IDLE")
        self.sessions += 1
        log.info("imap %s: connected (%s); %s", self.label,
                 "TLS" if a.tls != "none" else "no TLS",
                 "waiting with IDLE" if use_idle else f"checking every {a.poll_interval} s")
        while not stop.is_set():
            self.state = "sweeping"
            await self._sweep(client, uidvalidity, stop)
            self.sweeps += 1
            if stop.is_set():
                break
            if use_idle:
                await self._idle(client, stop)
            else:
                self.state = "waiting"
                await self._pause(client, stop, a.poll_interval)
        self.state = "stopped"
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.logout(), LOGOUT_TIMEOUT)

    async def _connect(self) -> Any:
        a = self.account
        self._lost = asyncio.Event()
        lost = self._lost

        def on_lost(exc: Exception | None) -> None:
            lost.set()

        context = self._tls_context() if a.tls != "none" else None
        client = aioimaplib.IMAP4(host=a.host, port=a.effective_port, timeout=a.timeout,
                                  conn_lost_cb=on_lost,
                                  ssl_context=context if a.tls == "implicit" else None)
        self._client = client
        await self._call(client.wait_hello_from_server())
        if a.tls == "starttls" and context is not None:
            proto = client.protocol
            if "STARTTLS" not in proto.capabilities:
                raise ImapError('the server does not offer STARTTLS (tls = "starttls")')
            resp = await self._call(proto.execute(
                aioimaplib.Command("STARTTLS", proto.new_tag(), loop=proto.loop)))
            _ok(resp, "STARTTLS")
            loop = asyncio.get_running_loop()
            proto.transport = await self._call(loop.start_tls(
                proto.transport, proto, context, server_hostname=a.host))
            await self._call(proto.capability())  # capabilities may differ under TLS
        return client

    def _tls_context(self) -> ssl.SSLContext:
        a = self.account
        context = ssl.create_default_context(cafile=a.ca_file or None)
        if not a.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _close(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        waiter = getattr(client, "_idle_waiter", None)
        if waiter is not None:
            waiter.cancel()
        for task in list(getattr(client, "tasks", ())) + list(
                getattr(client.protocol, "tasks", ())):
            task.cancel()
        transport = getattr(client.protocol, "transport", None)
        if transport is not None:
            transport.close()

    async def _call(self, aw: Awaitable[T], *, finish: bool = False) -> T:
        """Await one step of the conversation, giving up when the connection is lost or the
        account's timeout passes (aioimaplib alone would wait for its own timeouts), and, unless
        ``finish`` (a message committed but not yet flagged), when the daemon stops."""
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self._lost.wait())
        stopper = asyncio.ensure_future(self._stop.wait())
        waiters = {task, lost} if finish else {task, lost, stopper}
        try:
            done, _ = await asyncio.wait(waiters, timeout=self.account.timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
            stopper.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        if lost in done:
            raise ImapError("connection lost")
        if stopper in done:
            raise _Stopped
        raise TimeoutError

    async def _pause(self, client: Any, stop: asyncio.Event, seconds: float) -> None:
        """Wait for ``seconds`` or stop; a dropped connection ends the wait with an error.
        Long waits are cut by a NOOP, so that the server does not log us out as idle."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (remaining := deadline - loop.time()) > 0:
            stopper = asyncio.ensure_future(stop.wait())
            lost = asyncio.ensure_future(self._lost.wait())
            try:
                done, _ = await asyncio.wait({stopper, lost},
                                             timeout=min(remaining, IDLE_RENEW_MAX),
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                lost.cancel()
            if stop.is_set():
                return
            if lost in done:
                raise ImapError("connection lost")
            if deadline - loop.time() > 1:
                _ok(await self._call(client.noop()), "NOOP")

    # -- one check of the mailbox ------------------------------------------------------------
    async def _sweep(self, client: Any, uidvalidity: int, stop: asyncio.Event) -> None:
        criteria = ("UNSEEN", "UNDELETED") if self.account.after == "seen" else ("UNDELETED",)
        resp = await self._call(client.uid_search(*criteria, charset=None))
        _ok(resp, "UID SEARCH")
        uids = sorted({int(tok) for line in resp.lines[:-1]
                       if isinstance(line, bytes | bytearray)
                       for tok in bytes(line).split() if tok.isdigit()})
        for start in range(0, len(uids), SIZE_BATCH):
            batch = uids[start:start + SIZE_BATCH]
            sizes = await self._sizes(client, batch)
            for uid in batch:
                if stop.is_set():
                    return
                if uid in sizes:  # else it went away meanwhile (another client expunged it)
                    await self._handle(client, uidvalidity, uid, sizes[uid])

    async def _sizes(self, client: Any, uids: list[int]) -> dict[int, int]:
        resp = await self._call(client.uid("fetch", ",".join(map(str, uids)),
                                           "(UID RFC822.SIZE)"))
        _ok(resp, "UID FETCH (RFC822.SIZE)")
        sizes: dict[int, int] = {}
        for line in resp.lines:
            if not isinstance(line, bytes | bytearray):
                continue
            uid, size = _FETCH_UID.search(line), _FETCH_SIZE.search(line)
            if uid and size:
                sizes[int(uid.group(1))] = int(size.group(1))
        return sizes

    async def _fetch(self, client: Any, uid: int) -> bytes | None:
        resp = await self._call(client.uid("fetch", str(uid), "(BODY.PEEK[])"))
        _ok(resp, f"UID FETCH {uid}")
        lines = resp.lines
        for i in range(1, len(lines)):
            if isinstance(lines[i], bytearray) and b"BODY[]" in bytes(lines[i - 1]):
                return bytes(lines[i])
        return None

    async def _handle(self, client: Any, uidvalidity: int, uid: int, size: int) -> None:
        key = (uidvalidity, uid)
        inbox_id = self._committed.get(key)
        note = ""
        if inbox_id is None:
            limit = self.svc.config.smtp.max_message_size
            if size > limit:
                if key not in self._too_big:
                    self._too_big.add(key)
                    log.warning("imap %s: uid %d is %d bytes, over [smtp] max_message_size "
                                "(%d); left untouched on the server", self.label, uid, size,
                                limit)
                return
            raw = await self._fetch(client, uid)
            if raw is None:
                return  # expunged meanwhile
            headers = parse_headers(raw)
            rcpts = recipients(self.svc.book, headers, self.fallback)
            message_id = " ".join(str(headers.get("Message-ID", "")).split())
            try:
                inbox_id = await inbox.accept(
                    self.svc, raw, envelope_sender(headers), rcpts, source="imap",
                    peer=f"{self.label} uid {uid}", message_id=message_id)
            except Exception as exc:
                raise CommitFailed(f"uid {uid} could not be stored in the inbox and stays "
                                   f"unflagged on the server: {_describe(exc)}") from exc
            self._committed[key] = inbox_id
            note = f" for {', '.join(rcpts)}, {message_id or 'no Message-ID'}"
        else:
            note = " (committed before the connection broke)"
        done = await self._settle(client, uid)
        del self._committed[key]
        self.handled += 1
        log.info("imap %s: uid %d -> inbox %d%s; %s", self.label, uid, inbox_id, note, done)

    async def _settle(self, client: Any, uid: int) -> str:
        """Flag or move a message whose commit is done; returns what was done. These steps
        are finished even when the daemon is stopping."""
        a = self.account

        async def step(what: str, *args: str) -> None:
            _ok(await self._call(client.uid(*args), finish=True), f"UID {what} {uid}")

        await step("STORE \\Seen", "store", str(uid), "+FLAGS.SILENT", r"(\Seen)")
        if a.after == "seen":
            return "flagged \\Seen"
        folder = mailbox_name(a.move_to)
        if client.has_capability("MOVE"):
            await step("MOVE", "move", str(uid), folder)
            return f"moved to {a.move_to}"
        await step("COPY", "copy", str(uid), folder)
        await step("STORE \\Deleted", "store", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
        if client.has_capability("UIDPLUS"):
            await step("EXPUNGE", "expunge", str(uid))
        else:  # expunges every \Deleted message of the folder: it belongs to ciserver
            _ok(await self._call(client.expunge(), finish=True), "EXPUNGE")
        return f"copied to {a.move_to} and expunged"

    # -- waiting for news --------------------------------------------------------------------
    async def _idle(self, client: Any, stop: asyncio.Event) -> None:
        """IDLE until the server reports a change, the renewal time comes, or stop."""
        queue = client.protocol.idle_queue
        while not queue.empty():  # news from an earlier IDLE: the sweep just saw it
            queue.get_nowait()
        loop = asyncio.get_running_loop()
        renew = float(min(self.account.poll_interval, IDLE_RENEW_MAX))
        deadline = loop.time() + renew
        idle = await self._call(client.idle_start(timeout=renew + 60))
        self.state = "idle"
        try:
            while (remaining := deadline - loop.time()) > 0:
                push = asyncio.ensure_future(queue.get())
                stopper = asyncio.ensure_future(stop.wait())
                lost = asyncio.ensure_future(self._lost.wait())
                try:
                    done, _ = await asyncio.wait({push, stopper, lost}, timeout=remaining,
                                                 return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for waiter in (push, stopper, lost):
                        waiter.cancel()
                if lost in done:
                    raise ImapError("connection lost during IDLE")
                if push not in done:
                    break  # stop, or time to renew
                lines = push.result()
                if lines == aioimaplib.STOP_WAIT_SERVER_PUSH:
                    break
                text = b" ".join(bytes(x) for x in lines if isinstance(x, bytes | bytearray))
                if text.startswith(b"BYE") or b" BYE " in text:
                    raise ImapError(f"server ended the session: {text.decode(errors='replace')}")
                if _IDLE_NEWS.search(text):
                    break
                # anything else ("OK Still here") is a keep-alive: go on waiting
        finally:
            self.state = "sweeping"
        if client.has_pending_idle():
            client.idle_done()
            await self._call(idle)


def start(svc: Services, stop: asyncio.Event) -> list[asyncio.Task[None]]:
    """One task per configured account (none when ``[imap] accounts`` is empty)."""
    return [asyncio.create_task(Poller(svc, account).run(stop), name=f"imap-{i}")
            for i, account in enumerate(svc.config.imap.accounts)]
