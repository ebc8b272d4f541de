"""Organizer console sign-in: magic links, session cookies and CSRF tokens (no passwords).

Everything is HMAC-SHA256 with keys derived from the server secret, one key per purpose, so a
token of one kind can never be replayed as another:

* **Magic link token** (``/console/auth?token=...``): ``{email, expiry, nonce}`` signed; valid
  for :data:`LINK_LIFETIME`. The GET of the link only *shows* a button (mail scanners follow
  links); the POST consumes the nonce. Used nonces are remembered in memory until the token's
  own expiry (:class:`OneTime`), so within one process a link signs in once. With several
  ``ciserver serve`` instances behind a load balancer each instance keeps its own memory: a
  link could be replayed once on every *other* instance during its 15 minutes. The short
  lifetime, the mail being the only place the link lives, and ``Referrer-Policy: no-referrer``
  on the console keep that window small; a shared table would make it global.
* **Session cookie**: ``{email, expiry, session id}`` signed, ``[web] console_session_lifetime``
  seconds. Nothing is stored server-side; signing out clears the cookie and remembers the
  session id as revoked in this process's memory until it would have expired anyway.
* **CSRF token**: HMAC of the session id (signed in) or of a random pre-session cookie
  (sign-in forms), sent in a hidden field and compared on every POST.

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
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ..addresses import normalize_email
from ..store.models import Event
from . import notify, policy
from .context import Services

LINK_LIFETIME = timedelta(minutes=15)
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


class OneTime:
    """Ids that were used, each forgotten once the token it came from has expired anyway."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self._seen: dict[str, float] = {}  # id -> unix expiry
        self._max = max_entries

    def _prune(self, now: float) -> None:
        for key in [k for k, exp in self._seen.items() if exp <= now]:
            del self._seen[key]
        if len(self._seen) >= self._max:  # flooded: forget the ones expiring first
            for key in sorted(self._seen, key=self._seen.__getitem__)[: self._max // 2]:
                del self._seen[key]

    def seen(self, ident: str) -> bool:
        return ident in self._seen

    def use(self, ident: str, expires: datetime, now: datetime) -> bool:
        """Mark ``ident`` used; False if it already was."""
        if ident in self._seen:
            return False
        if len(self._seen) >= self._max:
            self._prune(now.timestamp())
        self._seen[ident] = expires.timestamp()
        return True


class ConsoleAuth:
    """One web process's sign-in state: the signer, used link nonces, revoked sessions."""

    def __init__(self, secret: bytes, session_lifetime: int) -> None:
        self.signer = Signer(secret)
        self.session_lifetime = timedelta(seconds=session_lifetime)
        self.used_links = OneTime()
        self.revoked_sessions = OneTime()

    # Magic links ---------------------------------------------------------------------------
    def link_token(self, email: str, now: datetime) -> str:
        return self.signer.sign("link", {"e": normalize_email(email),
                                         "x": _timestamp(now + LINK_LIFETIME),
                                         "n": secrets.token_hex(12)})

    def read_link(self, token: str, now: datetime) -> LinkClaims | None:
        """The link's claims if it is authentic and unexpired (whether used or not)."""
        got = _claims(self.signer.verify("link", token), now, "n")
        return LinkClaims(*got) if got else None

    def link_used(self, claims: LinkClaims) -> bool:
        return self.used_links.seen(claims.nonce)

    def consume_link(self, claims: LinkClaims, now: datetime) -> bool:
        """True the first time a link is used (in this process), False after."""
        return self.used_links.use(claims.nonce, claims.expires, now)

    # Sessions ------------------------------------------------------------------------------
    def new_session(self, email: str, now: datetime) -> tuple[str, SessionClaims]:
        claims = SessionClaims(normalize_email(email), now + self.session_lifetime,
                               secrets.token_hex(16))
        value = self.signer.sign("session", {"e": claims.email,
                                             "x": _timestamp(claims.expires),
                                             "s": claims.sid})
        return value, claims

    def read_session(self, value: str | None, now: datetime) -> SessionClaims | None:
        got = _claims(self.signer.verify("session", value or ""), now, "s")
        if got is None or self.revoked_sessions.seen(got[2]):
            return None
        return SessionClaims(*got)

    def end_session(self, claims: SessionClaims, now: datetime) -> None:
        self.revoked_sessions.use(claims.sid, claims.expires, now)

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
