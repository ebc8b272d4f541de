"""Subscriptions: a customer asking for an event's invite, and stopping it."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ..addresses import normalize_email
from ..itip.build import header_safe
from ..store.models import Event, Subscription
from . import outbox
from .context import Services

# A pragmatic address check: one @, a dotted domain, no spaces or control characters.
# The local part: no controls (they would reach SMTP commands and headers) and no lone
# surrogates (not text: a JSON body's "\ud800" decodes to one, and UTF-8 cannot carry it).
_EMAIL_RE = re.compile(r"^[^@\s<>()\[\],;:\"\\\x00-\x1f\x7f-\x9f\ud800-\udfff]{1,64}"
                       r"@[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?"
                       r"(?:\.[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?)+$")


class InvalidAddress(ValueError):
    pass


class EventClosed(ValueError):
    pass


def check_email(value: str) -> str:
    """The address as we keep it (lower case; an international domain name in its ASCII
    form, "xn--…"), or InvalidAddress. Characters beyond ASCII before the @ are refused:
    our invites go out without SMTPUTF8, which few relays offer, so such an address could
    never get its invite."""
    email = normalize_email(value or "")
    local, at, domain = email.rpartition("@")
    if at and domain and not domain.isascii():
        try:
            email = f"{local}@{domain.encode('idna').decode('ascii')}"
        except UnicodeError:
            raise InvalidAddress(f"{value!r} is not a valid email address") from None
    if len(email) > 254 or not _EMAIL_RE.match(email):
        raise InvalidAddress(f"{value!r} is not a valid email address")
    if not local.isascii():
        raise InvalidAddress(f"{value!r}: addresses with characters beyond ASCII before the @ "
                             "are not supported")
    return email


def check_recipient(svc: Services, value: str) -> str:
    """check_email, and not one of this server's own addresses (create@, rsvp+…@): an
    invite sent there would come back to us as mail to process."""
    email = check_email(value)
    if email.rpartition("@")[2] == svc.book.domain:
        raise InvalidAddress(f"{value!r} is an address of this server ({svc.book.domain}), "
                             "not a customer's")
    return email


@dataclass(frozen=True)
class InviteResult:
    subscription: Subscription
    created: bool
    queued: bool


async def invite(svc: Services, session: AsyncSession, event: Event, email: str, name: str = "",
                 source: str = "page", forwarded_by: int | None = None,
                 send: bool = True, origin: str = "") -> InviteResult:
    """Subscribe ``email`` to ``event`` and queue its invite. Idempotent per event x address:
    asking again does not send again, unless the address had stopped or bounced."""
    email = check_recipient(svc, email)
    name = header_safe(name or "", 200)
    if event.status == "cancelled":
        raise EventClosed("the event is cancelled")
    now = svc.now()
    sub = (await session.execute(select(Subscription).where(
        Subscription.event_id == event.id, Subscription.email == email))).scalar_one_or_none()
    if sub is not None:
        if sub.status == "active" or not send:
            return InviteResult(sub, False, False)
        sub.status, sub.updated_at = "active", now  # they asked again themselves
        await outbox.enqueue_subscription(svc, session, sub, event.sequence)
        return InviteResult(sub, False, True)
    sub = Subscription(event_id=event.id, email=email, domain=email.rpartition("@")[2],
                       name=name, status="active", source=source, origin=origin[:200],
                       forwarded_by=forwarded_by,
                       partstat="NEEDS-ACTION", soft_bounces=0, created_at=now,
                       updated_at=now)
    session.add(sub)
    await session.flush()
    if send:
        await outbox.enqueue_subscription(svc, session, sub, event.sequence)
    else:
        sub.delivered_sequence = event.sequence
    return InviteResult(sub, True, send)


async def invite_many(svc: Services, session: AsyncSession, event: Event,
                      people: Iterable[tuple[str, str]], source: str = "api",
                      origin: str = "") -> tuple[int, int]:
    """Bulk add; returns (queued, already subscribed). Bad addresses raise before anything is
    written, so a list is taken whole or not at all."""
    checked = [(check_recipient(svc, e), n) for e, n in people]
    queued = existing = 0
    for email, name in checked:
        result = await invite(svc, session, event, email, name, source, origin=origin)
        if result.queued:
            queued += 1
        else:
            existing += 1
    return queued, existing


async def stop(svc: Services, session: AsyncSession, sub: Subscription, status: str) -> bool:
    """Unsubscribe or mark bounced: no more mail to this subscription."""
    if sub.status == status:
        return False
    sub.status, sub.updated_at = status, svc.now()
    await outbox.cancel_subscription_mail(session, sub.id, svc.now())
    return True
