"""API keys: shown once, stored as SHA-256 hashes, scoped to an organizer, a domain or all."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import or_, select, update

from ..addresses import normalize_email
from ..store.models import ApiKey
from .context import Services

KEY_PREFIX = "cis_"


@dataclass(frozen=True)
class Principal:
    """Who an API request acts for."""

    key_id: int
    scope: str  # organizer | domain | admin
    organizer: str | None = None
    domain: str | None = None
    prefix: str = ""  # the key's public prefix (shown by `ciserver apikey list`)

    def may_see(self, organizer_email: str, organizer_domain: str) -> bool:
        if self.scope == "admin":
            return True
        if self.scope == "domain":
            return organizer_domain == self.domain
        return organizer_email == self.organizer


def _hash(key: str) -> str:
    # The key has 256 bits of entropy: a plain SHA-256 is enough (no password stretching).
    return hashlib.sha256(key.encode()).hexdigest()


async def create(svc: Services, *, organizer: str | None = None, domain: str | None = None,
                 admin: bool = False, label: str = "") -> tuple[ApiKey, str]:
    if sum(bool(x) for x in (organizer, domain, admin)) != 1:
        raise ValueError("give exactly one of --organizer, --domain or --admin")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    scope = "admin" if admin else "domain" if domain else "organizer"
    row = ApiKey(prefix=key[:12], key_hash=_hash(key), scope=scope,
                 organizer_email=normalize_email(organizer) if organizer else None,
                 domain=domain.lower().lstrip("@") if domain else None, label=label,
                 created_at=svc.now())
    async with svc.sessions.begin() as session:
        session.add(row)
    return row, key


# last_used_at is written at most this often per key, not on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)


async def authenticate(svc: Services, key: str) -> Principal | None:
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    async with svc.sessions() as session:
        row = (await session.execute(
            select(ApiKey).where(ApiKey.key_hash == _hash(key), ApiKey.revoked_at.is_(None))
        )).scalar_one_or_none()
        if row is None:
            return None
        who = Principal(row.id, row.scope, row.organizer_email, row.domain, row.prefix)
        now = svc.now()
        if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
            # Conditional, so concurrent requests of one key write it once.
            stale = now - LAST_USED_RESOLUTION
            await session.execute(
                update(ApiKey).where(ApiKey.id == row.id, or_(ApiKey.last_used_at.is_(None),
                                                               ApiKey.last_used_at <= stale))
                .values(last_used_at=now).execution_options(synchronize_session=False))
            await session.commit()
    return who


async def listing(svc: Services) -> Sequence[ApiKey]:
    async with svc.sessions() as session:
        return (await session.execute(select(ApiKey).order_by(ApiKey.id))).scalars().all()


async def revoke(svc: Services, ref: str) -> bool:
    async with svc.sessions.begin() as session:
        q = select(ApiKey).where(ApiKey.revoked_at.is_(None))
        q = q.where(ApiKey.id == int(ref)) if ref.isdigit() else q.where(ApiKey.prefix == ref)
        row = (await session.execute(q)).scalar_one_or_none()
        if row is None:
            return False
        row.revoked_at = svc.now()
        return True
