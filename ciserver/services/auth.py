"""Organizer console sign-in: magic links, session cookies and CSRF tokens (no passwords).

Everything is HMAC-SHA256 with keys derived from the server secret, one key per purpose, so a
token of one kind can never be replayed as another:

* **Magic link token** (``/console/auth?token=...``): ``{email, expiry, nonce}`` signed; valid
  for :data:`LINK_LIFETIME`. The GET of the link only *shows* a button (mail scanners follow
  links); the POST consumes the nonce by inserting it into the ``console_tokens`` table
  (:class:`~ciserver.store.models.ConsoleToken`, kind ``link``). The primary key makes the
  insert succeed once: a second use, on this or any other ``ciserver serve`` instance sharing
  the database, or two at the same moment, hits the primary key and is refused. So a link signs
  in once, across instances and restarts.
* **Session cookie**: ``{email, expiry, session id}`` signed, ``[web] console_session_lifetime``
  seconds. Signing out clears the cookie and inserts the session id into ``console_tokens``
  (kind ``session``); every console request with an authentic, unexpired session cookie looks
  its id up there (one primary-key lookup), so a signed-out cookie is refused by every
  instance, also after a restart. Each process remembers the ids it has found revoked (never
  the ones it found valid), so a revoked cookie replayed to it costs no query.
* **CSRF token**: HMAC of the session id (signed in) or of a random pre-session cookie
  (sign-in forms), sent in a hidden field and compared on every POST.

Rows are kept until the token they came from has expired, plus :data:`PURGE_GRACE` for
instances whose clocks differ; a sign-in deletes rows past that (a bounded batch, at most
once per :data:`PURGE_INTERVAL` seconds per process). The limits on sign-in *requests* (per client
address, per email address) stay in each process's memory (:mod:`ciserver.web.console`).

Whether an address may sign in is checked again on every request (:func:`may_organize`): an
operator who takes an organizer off the allow-list (and who owns no events) locks them out at
once, whatever cookie they hold.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, delete, insert, select, tuple_
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..addresses import normalize_email
from ..store.models import ConsoleToken, Event
from . import notify, policy
from .context import Services

log = logging.getLogger("ciserver.console")

LINK_LIFETIME = timedelta(minutes=15)
LINK, SESSION = "link", "session"  # console_tokens.kind
PURGE_GRACE = timedelta(hours=1)  # rows outlive their token by this (clocks of instances)
PURGE_INTERVAL = 60.0  # seconds between purges, per process
PURGE_BATCH = 1000  # rows deleted at most per purge
_TOKENS = cast(Table, ConsoleToken.__table__)
_VERSION = "1"
_MAX_TOKEN = 2000  # characters; anything longer is not ours


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Sign and verify small JSON payloads, one derived key per purpose."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def key(self, purpose: str) -> bytes:
        return hmac.new(self._secret, b"ciserver-console/" + purpose.encode(),
                        hashlib.sha256).digest()

    def mac(self, purpose: str, data: str) -> str:
        return _b64(hmac.new(self.key(purpose), data.encode(), hashlib.sha256).digest())

    def sign(self, purpose: str, payload: dict[str, Any]) -> str:
        body = _VERSION + "." + _b64(json.dumps(payload, separators=(",", ":"),
                                                sort_keys=True).encode())
        return body + "." + self.mac(purpose, body)

    def verify(self, purpose: str, token: str) -> dict[str, Any] | None:
        if not token or len(token) > _MAX_TOKEN:
            return None
        version, _, rest = token.partition(".")
        data, _, tag = rest.rpartition(".")
        if version != _VERSION or not data or not tag:
            return None
        if not hmac.compare_digest(tag, self.mac(purpose, f"{version}.{data}")):
            return None
        try:
            payload = json.loads(_unb64(data))
        except (ValueError, binascii.Error):
            return None
        return payload if isinstance(payload, dict) else None


def _timestamp(dt: datetime) -> int:
    return int(dt.timestamp())


def _claims(payload: dict[str, Any] | None, now: datetime, id_key: str
            ) -> tuple[str, datetime, str] | None:
    """(email, expiry, id) from a verified payload that has not expired."""
    if payload is None:
        return None
    email, exp, ident = payload.get("e"), payload.get("x"), payload.get(id_key)
    if not isinstance(email, str) or not isinstance(exp, int) or not isinstance(ident, str):
        return None
    expires = datetime.fromtimestamp(exp, UTC)
    if expires <= now:
        return None
    return email, expires, ident


@dataclass(frozen=True)
class LinkClaims:
    email: str
    expires: datetime
    nonce: str


@dataclass(frozen=True)
class SessionClaims:
    email: str
    expires: datetime
    sid: str


class _Revoked:
    """Session ids this process has seen revoked, each forgotten once its session has expired
    anyway. Only revocations are remembered: they are final, a valid answer is not."""

    def __init__(self, max_entries: int = 10_000) -> None:
        self._ids: dict[str, float] = {}  # id -> unix expiry
        self._max = max_entries

    def __contains__(self, ident: str) -> bool:
        return ident in self._ids

    def add(self, ident: str, expires: datetime, now: datetime) -> None:
        if len(self._ids) >= self._max:
            stamp = now.timestamp()
            for key in [k for k, exp in self._ids.items() if exp <= stamp]:
                del self._ids[key]
            if len(self._ids) >= self._max:  # flooded: forget the ones expiring first
                for key in sorted(self._ids, key=self._ids.__getitem__)[: self._max // 2]:
                    del self._ids[key]
        self._ids[ident] = expires.timestamp()


async def _stored(session: AsyncSession, kind: str, ident: str) -> bool:
    """Is (kind, ident) in console_tokens (a primary-key lookup)."""
    found = await session.execute(
        select(_TOKENS.c.kind).where(_TOKENS.c.kind == kind, _TOKENS.c.ident == ident))
    return found.first() is not None


async def _store_once(sessions: async_sessionmaker[AsyncSession], kind: str, ident: str,
                      expires: datetime) -> bool:
    """Insert (kind, ident) in its own transaction; False if it was there already.

    The primary key decides, so concurrent inserts of one id on any number of instances
    (SQLite or PostgreSQL) let exactly one succeed."""
    try:
        async with sessions.begin() as session:
            await session.execute(insert(_TOKENS).values(kind=kind, ident=ident,
                                                         expires_at=expires))
    except IntegrityError:
        return False
    return True


class ConsoleAuth:
    """The signer, and the used links and revoked sessions kept in the database (shared by
    every instance); one per web app, which also keeps a cache of revoked session ids."""

    def __init__(self, secret: bytes, session_lifetime: int) -> None:
        self.signer = Signer(secret)
        self.session_lifetime = timedelta(seconds=session_lifetime)
        self._revoked = _Revoked()
        self._next_purge = 0.0  # time.monotonic() of the next purge

    # Magic links ---------------------------------------------------------------------------
    def link_token(self, email: str, now: datetime) -> str:
        return self.signer.sign("link", {"e": normalize_email(email),
                                         "x": _timestamp(now + LINK_LIFETIME),
                                         "n": secrets.token_hex(12)})

    def read_link(self, token: str, now: datetime) -> LinkClaims | None:
        """The link's claims if it is authentic and unexpired (whether used or not)."""
        got = _claims(self.signer.verify("link", token), now, "n")
        return LinkClaims(*got) if got else None

    async def link_used(self, session: AsyncSession, claims: LinkClaims) -> bool:
        return await _stored(session, LINK, claims.nonce)

    async def consume_link(self, sessions: async_sessionmaker[AsyncSession],
                           claims: LinkClaims, now: datetime) -> bool:
        """True the first time a link is used (on any instance), False after. Commits in a
        transaction of its own: open no other session of ``sessions`` meanwhile."""
        first = await _store_once(sessions, LINK, claims.nonce, claims.expires)
        await self.purge(sessions, now)
        return first

    # Sessions ------------------------------------------------------------------------------
    def new_session(self, email: str, now: datetime) -> tuple[str, SessionClaims]:
        claims = SessionClaims(normalize_email(email), now + self.session_lifetime,
                               secrets.token_hex(16))
        value = self.signer.sign("session", {"e": claims.email,
                                             "x": _timestamp(claims.expires),
                                             "s": claims.sid})
        return value, claims

    async def read_session(self, session: AsyncSession, value: str | None, now: datetime
                           ) -> SessionClaims | None:
        """The claims of an authentic, unexpired session cookie that was not signed out."""
        got = _claims(self.signer.verify("session", value or ""), now, "s")
        if got is None:
            return None
        claims = SessionClaims(*got)
        if claims.sid in self._revoked:
            return None
        if await _stored(session, SESSION, claims.sid):
            self._revoked.add(claims.sid, claims.expires, now)
            return None
        return claims

    async def end_session(self, sessions: async_sessionmaker[AsyncSession],
                          claims: SessionClaims, now: datetime) -> None:
        """Revoke the session everywhere (commits in a transaction of its own)."""
        await _store_once(sessions, SESSION, claims.sid, claims.expires)  # again: fine
        self._revoked.add(claims.sid, claims.expires, now)

    # Housekeeping --------------------------------------------------------------------------
    async def purge(self, sessions: async_sessionmaker[AsyncSession], now: datetime,
                    force: bool = False) -> int:
        """Delete up to :data:`PURGE_BATCH` rows that expired more than :data:`PURGE_GRACE`
        ago; at most once per :data:`PURGE_INTERVAL` seconds unless ``force``. Returns how
        many went; a failure (a concurrent purge, say) is logged and left to the next one."""
        clock = time.monotonic()
        if not force and clock < self._next_purge:
            return 0
        self._next_purge = clock + PURGE_INTERVAL
        expired = (select(_TOKENS.c.kind, _TOKENS.c.ident)
                   .where(_TOKENS.c.expires_at < now - PURGE_GRACE)
                   .limit(PURGE_BATCH))
        try:
            async with sessions.begin() as session:
                result = await session.execute(delete(_TOKENS).where(
                    tuple_(_TOKENS.c.kind, _TOKENS.c.ident).in_(expired)))
        except DBAPIError as exc:
            log.warning("console sign-in: purging expired tokens failed: %s", exc)
            return 0
        return int(getattr(result, "rowcount", 0) or 0)

    # CSRF ----------------------------------------------------------------------------------
    def csrf_token(self, binding: str) -> str:
        return self.signer.mac("csrf", binding)

    def csrf_ok(self, binding: str | None, token: str | None) -> bool:
        if not binding or not token:
            return False
        return hmac.compare_digest(token.encode(), self.csrf_token(binding).encode())


def new_binding() -> str:
    """A random value for the pre-session cookie that sign-in forms' CSRF tokens bind to."""
    return secrets.token_urlsafe(18)


async def may_organize(svc: Services, session: AsyncSession, email: str) -> bool:
    """May ``email`` use the console: allowed by [organizers] allow, or owns events."""
    email = normalize_email(email)
    # The query runs either way, so allowed and not-allowed addresses take similar time.
    owns = (await session.execute(
        select(Event.id).where(Event.organizer_email == email).limit(1))).first() is not None
    return owns or policy.matches(email, svc.config.organizers.allow)


async def mail_link(svc: Services, session: AsyncSession, email: str, url: str) -> None:
    """Queue the sign-in mail (the relay delivers it)."""
    minutes = int(LINK_LIFETIME.total_seconds() // 60)
    text = (
        f"Someone (hopefully you) asked to sign in to the organizer console of\n"
        f"{svc.config.base_url} as {email}.\n\n"
        f"Open this link within {minutes} minutes and press the \"Sign in\" button:\n\n"
        f"{url}\n\n"
        "The link works once. If you did not ask for it, ignore this message: nobody can\n"
        "sign in without the link.\n")
    await notify.send(svc, session, to=email, subject="Your sign-in link for the ciserver console",
                      text=text)
