"""The SMTP listener (aiosmtpd, on the daemon's own loop): accept only our addresses.

Recipients are checked at RCPT: create@, and rsvp+/bounce+/unsubscribe+ with a valid token;
anything else is 550 5.1.1, so the server is never an open relay and never has to bounce.
The message is committed to the inbox before the client hears "250".
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import re
import ssl
import types
from email.utils import parseaddr
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from . import metrics
from .addresses import Kind
from .config import split_hostport
from .itip.mime import header_text, parse_message
from .services import inbox
from .services.context import Services
from .services.policy import OrganizerPolicy

log = logging.getLogger("ciserver.smtp")
# Only create@ mail needs its headers parsed before the answer; for the rest the Message-ID
# (kept for `ciserver inbox`) is enough, and a full header parse cost ~10% of ingest.
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(<[^>\r\n]{1,390}>)", re.IGNORECASE | re.MULTILINE)


class Handler:
    """aiosmtpd handler hooks."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.policy = OrganizerPolicy(svc.config.organizers)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        rcpt = self.svc.book.parse(address)
        if rcpt is None:
            log.info("refused rcpt %s from %s", address, session.peer)
            metrics.smtp_refused("unknown_recipient")
            return f"550 5.1.1 <{address}>: no such address here (not a relay)"
        if len(envelope.rcpt_tos) >= self.svc.config.smtp.max_recipients:
            metrics.smtp_refused("too_many_recipients")
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(envelope.content, bytes) and not raw:
            raw = envelope.content
        head = raw.split(b"\r\n\r\n", 1)[0]
        found = _MESSAGE_ID.search(head)
        message_id = found.group(1).decode("ascii", "replace") if found else ""
        creates = [r for r in envelope.rcpt_tos
                   if (p := self.svc.book.parse(r)) is not None and p.kind is Kind.CREATE]
        if creates and self.svc.config.organizers.allow:
            headers = parse_message(head + b"\r\n\r\n")
            sender = parseaddr(header_text(headers, "From"))[1]
            if not self.policy.sender_allowed(sender):
                log.info("refused create@ mail from %s (peer %s)", sender, session.peer)
                metrics.smtp_refused("sender_not_allowed")
                return (f"550 5.7.1 {sender or 'this sender'} is not allowed to create events "
                        "on this server")
        try:
            inbox_id = await inbox.accept(
                self.svc, raw, envelope.mail_from or "", list(envelope.rcpt_tos),
                source="smtp", peer=str(session.peer[0]) if session.peer else "",
                message_id=message_id)
        except Exception:
            log.exception("could not store a message; asking the client to retry")
            metrics.smtp_refused("storage_error")
            return "451 4.3.0 Temporary failure storing the message, try again later"
        return f"250 2.0.0 OK queued as {inbox_id}"


class ConnectionLimits:
    """Concurrent connections, in all and per client IP, for one listener."""

    def __init__(self, total: int, per_ip: int) -> None:
        self.total, self.per_ip = total, per_ip
        self.open: dict[str, int] = {}
        self.count = 0

    def acquire(self, ip: str) -> bool:
        if self.count >= self.total or self.open.get(ip, 0) >= self.per_ip:
            return False
        self.count += 1
        self.open[ip] = self.open.get(ip, 0) + 1
        return True

    def release(self, ip: str) -> None:
        self.count -= 1
        left = self.open.get(ip, 1) - 1
        if left:
            self.open[ip] = left
        else:
            self.open.pop(ip, None)


class CiSMTP(SMTP):
    """aiosmtpd's protocol with connection limits, a whole-session deadline (a slow client
    cannot hold a connection by trickling bytes under the idle timeout) and enhanced status
    codes on aiosmtpd's own size refusals."""

    def __init__(self, handler: Handler, *, limits: ConnectionLimits, session_timeout: float,
                 **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.session_timeout = session_timeout

    async def _handle_client(self) -> None:
        peer = self.session.peer if self.session is not None else None
        ip = str(peer[0]) if peer else "?"
        if not self.limits.acquire(ip):
            log.info("refused connection from %s: too many connections", ip)
            metrics.smtp_refused("too_many_connections")
            await self.push("421 4.7.0 Too many connections, try again later")
            if self.transport is not None:
                self.transport.close()
            return
        deadline = self.loop.call_later(self.session_timeout, self._session_expired)
        try:
            await super()._handle_client()
        finally:
            deadline.cancel()
            self.limits.release(ip)

    def _session_expired(self) -> None:
        log.info("closing SMTP session from %s: session time limit",
                 self.session.peer if self.session else "?")
        metrics.smtp_refused("session_timeout")
        if self.transport is not None and not self.transport.is_closing():
            with contextlib.suppress(Exception):
                self._writer.write(b"421 4.4.2 Session time limit exceeded\r\n")
            self.transport.close()

    async def push(self, status: str | bytes) -> None:
        if status[:10] in ("552 Error:", b"552 Error:"):
            limit = self.data_size_limit
            metrics.smtp_refused("too_big")
            await super().push(f"552 5.3.4 Message too big: this server takes at most "
                               f"{limit} bytes")
        elif isinstance(status, bytes):
            await super().push(status)
        else:
            await super().push(status)


def _func(bound: Any) -> Any:
    return bound.__func__


class ProtocolFactory:
    """One protocol per connection, copied from a template built once.

    aiosmtpd's SMTP.__init__ introspects the class and the handler (inspect.getmembers,
    dir) on every connection: 15% of the SMTP loop's CPU in bench/inbound. A copy of a
    never-connected instance has the same initial state; the stream plumbing is made anew and
    the command methods are re-bound to the copy, which is all __init__ ties to the instance.
    """

    def __init__(self, template: SMTP) -> None:
        self.template = template

    def __call__(self) -> SMTP:
        t = self.template
        proto: SMTP = copy.copy(t)
        asyncio.StreamReaderProtocol.__init__(
            proto, asyncio.StreamReader(loop=t.loop, limit=t.line_length_limit),
            client_connected_cb=proto._cb_client_connected, loop=t.loop)
        proto._smtp_methods = {name: types.MethodType(_func(method), proto)
                               for name, method in t._smtp_methods.items()}
        proto._auth_methods = {
            name: attr._replace(method=types.MethodType(_func(attr.method), proto))
            if attr.is_builtin else attr for name, attr in t._auth_methods.items()}
        return proto


def tls_context(svc: Services) -> ssl.SSLContext | None:
    cfg = svc.config.smtp
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except OSError as exc:  # a bare "[Errno 2] No such file or directory" names nothing
        raise OSError(f"[smtp] tls_cert = {cfg.tls_cert!r}, tls_key = {cfg.tls_key!r}: "
                      f"{exc.strerror or exc}") from None
    return ctx


def make_smtp(svc: Services, limits: ConnectionLimits, tls: ssl.SSLContext | None) -> SMTP:
    cfg = svc.config.smtp
    return CiSMTP(Handler(svc), limits=limits, session_timeout=cfg.session_timeout,
                  data_size_limit=cfg.max_message_size, hostname=svc.config.smtp_hostname,
                  enable_SMTPUTF8=True, decode_data=False, timeout=cfg.data_timeout,
                  tls_context=tls, require_starttls=False, ident="ciserver ESMTP",
                  command_call_limit=100)


async def start(svc: Services, listen: str | None = None) -> asyncio.Server:
    host, port = split_hostport(listen or svc.config.smtp.listen, "smtp", "listen",
                                svc.config.source)
    loop = asyncio.get_running_loop()
    cfg = svc.config.smtp
    limits = ConnectionLimits(cfg.max_connections, cfg.max_connections_per_ip)
    tls = tls_context(svc)  # loaded once: a bad certificate stops the start, loudly

    factory = ProtocolFactory(make_smtp(svc, limits, tls))

    try:
        server = await loop.create_server(factory, host=host, port=port, reuse_address=True)
    except OSError as exc:  # name the setting: "address already in use" alone says little
        raise OSError(f"[smtp] listen = {host}:{port!s}: {exc.strerror or exc}") from None
    log.info("SMTP listening on %s:%s for %s", host, port, svc.book.domain)
    return server
