"""Our mail addresses and the HMAC tokens inside them (pure: no I/O).

A token names one subscription (event x customer): the subscription id and an HMAC-SHA256
tag over it, base32 in lower case, because some MTAs lower-case local parts. 6 bytes of id
and 10 bytes of tag give 26 characters, so ``unsubscribe+TOKEN`` stays far below the
64-character local-part limit of RFC 5321.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

_ID_BYTES = 6
_TAG_BYTES = 10
TOKEN_LENGTH = 26


class Kind(StrEnum):
    CREATE = "create"
    RSVP = "rsvp"
    BOUNCE = "bounce"
    UNSUBSCRIBE = "unsubscribe"


TOKEN_KINDS = (Kind.RSVP, Kind.BOUNCE, Kind.UNSUBSCRIBE)


def _tag(secret: bytes, sub_id: int) -> bytes:
    msg = b"sub:" + sub_id.to_bytes(_ID_BYTES, "big")
    return hmac.new(secret, msg, hashlib.sha256).digest()[:_TAG_BYTES]


def make_token(secret: bytes, sub_id: int) -> str:
    # Tag first: tokens then differ from their first character (ids are mostly zeros).
    raw = _tag(secret, sub_id) + sub_id.to_bytes(_ID_BYTES, "big")
    return base64.b32encode(raw).decode().rstrip("=").lower()


def verify_token(secret: bytes, token: str) -> int | None:
    """The subscription id if ``token`` is authentic, else None."""
    if len(token) != TOKEN_LENGTH:
        return None
    try:
        raw = base64.b32decode(token.upper() + "======")
    except (ValueError, TypeError):
        return None
    if len(raw) != _ID_BYTES + _TAG_BYTES:
        return None
    sub_id = int.from_bytes(raw[_TAG_BYTES:], "big")
    if not hmac.compare_digest(raw[:_TAG_BYTES], _tag(secret, sub_id)):
        return None
    if make_token(secret, sub_id) != token:  # the last character has 2 spare bits: one spelling
        return None
    return sub_id


@dataclass(frozen=True)
class Recipient:
    kind: Kind
    token: str = ""
    subscription_id: int = 0


def normalize_email(addr: str) -> str:
    """Compare addresses case-insensitively, with or without a mailto: scheme."""
    addr = addr.strip().strip("<>").strip()
    if addr[:7].lower() == "mailto:":
        addr = addr[7:]
    return addr.strip().strip("<>").lower()


def domain_of(addr: str) -> str:
    return normalize_email(addr).rpartition("@")[2]


class AddressBook:
    """Builds and recognises our four address kinds on one domain."""

    def __init__(self, domain: str, secret: bytes, create_local_part: str = "create") -> None:
        self.domain = domain.lower()
        self.secret = secret
        self.create_local = create_local_part.lower()
        # One message's recipients are parsed at RCPT, at DATA and when it is processed; an
        # HMAC each time showed up in profiles of bench/inbound.
        self.parse = lru_cache(maxsize=8192)(self._parse)  # type: ignore[method-assign]

    @property
    def create(self) -> str:
        return f"{self.create_local}@{self.domain}"

    def token(self, sub_id: int) -> str:
        return make_token(self.secret, sub_id)

    def address(self, kind: Kind, sub_id: int) -> str:
        if kind is Kind.CREATE:
            return self.create
        return f"{kind.value}+{self.token(sub_id)}@{self.domain}"

    def parse(self, addr: str) -> Recipient | None:
        """The recipient kind of ``addr`` if it is one of ours with a valid token, else None
        (replaced per instance by a cached version of _parse)."""
        return self._parse(addr)

    def _parse(self, addr: str) -> Recipient | None:
        """The recipient kind of ``addr`` if it is one of ours with a valid token, else None."""
        addr = normalize_email(addr)
        local, at, dom = addr.rpartition("@")
        if not at or dom != self.domain:
            return None
        if local == self.create_local:
            return Recipient(Kind.CREATE)
        prefix, plus, token = local.partition("+")
        if not plus:
            return None
        try:
            kind = Kind(prefix)
        except ValueError:
            return None
        if kind is Kind.CREATE:
            return None
        sub_id = verify_token(self.secret, token)
        if sub_id is None:
            return None
        return Recipient(kind, token, sub_id)
