"""The outbox: what must be sent, claimed by relay workers, as a small state machine.

States: pending -> sending -> sent | pending (retry, or a newer version is wanted) | failed;
cancelled when the subscription stopped. An invite row exists once per subscription and
carries the wanted SEQUENCE; the message is built from the event's latest version when the row
is claimed, so ten quick edits send one mail. Claims use SELECT ... FOR UPDATE SKIP LOCKED on
PostgreSQL (ignored by SQLite, which has one writer), and a claim that outlives its deadline
(crashed worker) is taken again: delivery is at-least-once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, case, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from .. import metrics
from ..addresses import Kind, domain_of
from ..itip import build
from ..store.models import Answer, Event, OutboxItem, Subscription, UTCDateTime
from .context import Services

log = logging.getLogger(__name__)

CLAIM_TIMEOUT = timedelta(minutes=10)  # the default of [relay] claim_timeout


def claim_timeout(svc: Services) -> timedelta:
    """How long a claim holds before another instance may take the item (crash recovery on
    PostgreSQL; on SQLite the daemon releases its own claims when it starts)."""
    return timedelta(seconds=svc.config.relay.claim_timeout)


def _insert(svc: Services) -> Any:
    return postgresql.insert if svc.dialect == "postgresql" else sqlite.insert


def _requeue(wanted: Any, now: Any) -> dict[str, Any]:
    """The upsert's update of an existing invite row: a new version is wanted now.

    A row in 'sending' stays with the worker that is sending it (only the wanted version
    rises): mark_sent sees wanted > sent and queues it again, so the newer version goes out
    right after, and no second worker puts a copy on the wire meanwhile."""
    sending = OutboxItem.state == "sending"
    return {
        "wanted_sequence": wanted,
        "state": case((sending, OutboxItem.state), else_=literal("pending")),
        "attempts": case((sending, OutboxItem.attempts), else_=literal(0)),
        "queued_at": now,
        "next_attempt_at": case((sending, OutboxItem.next_attempt_at), else_=now),
        "updated_at": now,
        "last_response": case((sending, OutboxItem.last_response), else_=literal("")),
    }


async def enqueue_event(svc: Services, session: AsyncSession, event: Event) -> None:
    """Every active subscriber of ``event`` must get its current version (one statement)."""
    now = svc.now()
    ins = _insert(svc)(OutboxItem)
    ts = literal(now, UTCDateTime())
    source = select(
        literal("invite"), Subscription.id, literal(event.sequence), Subscription.email,
        Subscription.domain, literal("pending"), literal(0), ts, ts, ts, literal(""),
        literal(""),
    ).where(Subscription.event_id == event.id, Subscription.status == "active")
    stmt = ins.from_select(
        ["kind", "subscription_id", "wanted_sequence", "rcpt_to", "rcpt_domain", "state",
         "attempts", "queued_at", "next_attempt_at", "updated_at", "mail_from",
         "last_response"], source)
    stmt = stmt.on_conflict_do_update(
        index_elements=["subscription_id"],
        set_=_requeue(stmt.excluded.wanted_sequence, stmt.excluded.queued_at),
    )
    await session.execute(stmt)
    svc.wake_outbox()


async def enqueue_subscription(svc: Services, session: AsyncSession, sub: Subscription,
                               sequence: int) -> None:
    """One subscriber must get version ``sequence`` (new subscriber, REFRESH)."""
    now = svc.now()
    stmt = _insert(svc)(OutboxItem).values(
        kind="invite", subscription_id=sub.id, wanted_sequence=sequence, rcpt_to=sub.email,
        rcpt_domain=sub.domain, state="pending", attempts=0, queued_at=now,
        next_attempt_at=now, updated_at=now, mail_from="", last_response="")
    stmt = stmt.on_conflict_do_update(
        index_elements=["subscription_id"],
        set_=_requeue(literal(sequence), literal(now, UTCDateTime())))
    await session.execute(stmt)
    svc.wake_outbox()


async def enqueue_message(svc: Services, session: AsyncSession, mail_from: str, rcpt: str,
                          raw: bytes) -> None:
    """A prebuilt message (notices and reports to organizers)."""
    now = svc.now()
    session.add(OutboxItem(kind="message", mail_from=mail_from, rcpt_to=rcpt,
                           rcpt_domain=domain_of(rcpt), raw=raw, state="pending", attempts=0,
                           wanted_sequence=0, queued_at=now, next_attempt_at=now,
                           updated_at=now, last_response=""))
    svc.wake_outbox()


async def cancel_subscription_mail(session: AsyncSession, sub_id: int, now: datetime) -> None:
    await session.execute(
        update(OutboxItem)
        .where(OutboxItem.subscription_id == sub_id, OutboxItem.state.in_(("pending",)))
        .values(state="cancelled", updated_at=now))


# --------------------------------------------------------------------------------------------
# Relay side


@dataclass(frozen=True)
class Delivery:
    item_id: int
    mail_from: str
    rcpt: str
    raw: bytes
    sequence: int | None  # invite version being sent
    subscription_id: int | None = None


async def claim(svc: Services, limit: int) -> list[int]:
    """Take up to ``limit`` due items for this worker."""
    now = svc.now()
    async with svc.sessions.begin() as session:
        due = or_(
            and_(OutboxItem.state == "pending", OutboxItem.next_attempt_at <= now),
            and_(OutboxItem.state == "sending", OutboxItem.claimed_until < now),
        )
        rows = (await session.execute(
            select(OutboxItem.id).where(due).order_by(OutboxItem.next_attempt_at)
            .limit(limit).with_for_update(skip_locked=True))).scalars().all()
        if rows:
            await session.execute(
                update(OutboxItem).where(OutboxItem.id.in_(rows))
                .values(state="sending", claimed_until=now + claim_timeout(svc),
                        attempts=OutboxItem.attempts + 1, updated_at=now))
        return list(rows)


async def prepare(svc: Services, item_id: int) -> Delivery | None:
    """The message to send for a claimed item, or None if nothing is to be sent any more."""
    now = svc.now()
    async with svc.sessions.begin() as session:
        item = await session.get(OutboxItem, item_id)
        if item is None or item.state != "sending":
            return None
        if item.kind == "message":
            return Delivery(item.id, item.mail_from, item.rcpt_to, sign(svc, item.raw or b""),
                            None)
        sub = await session.get(Subscription, item.subscription_id)
        event = await session.get(Event, sub.event_id) if sub else None
        if sub is None or event is None or sub.status != "active":
            item.state, item.updated_at = "cancelled", now
            item.last_response = "subscription is no longer active"
            return None
        occurrences: dict[str, str] = {}
        if "RECURRENCE-ID" in event.content:  # overrides: answers to single occurrences
            occurrences = {occ: partstat for occ, partstat in (await session.execute(
                select(Answer.occurrence, Answer.partstat).where(
                    Answer.subscription_id == sub.id, Answer.occurrence != ""))).all()}
        book = svc.book
        token = book.token(sub.id)
        raw = build.render_invite(
            build.OutboundEvent(
                uid=event.uid, sequence=event.sequence, cancelled=event.status == "cancelled",
                content=event.content, organizer_name=event.organizer_name,
                organizer_email=event.organizer_email, page_url=svc.page_url(event.public_id)),
            build.OutboundRecipient(
                email=sub.email, name=sub.name, partstat=sub.partstat,
                rsvp_address=book.address(Kind.RSVP, sub.id),
                unsubscribe_address=book.address(Kind.UNSUBSCRIBE, sub.id),
                unsubscribe_url=svc.unsubscribe_url(token), occurrences=occurrences),
            now=now, message_id=new_message_id(svc), domain=book.domain)
        return Delivery(item.id, book.address(Kind.BOUNCE, sub.id), sub.email, sign(svc, raw),
                        event.sequence)


def new_message_id(svc: Services) -> str:
    return f"<{secrets.token_hex(12)}@{svc.book.domain}>"


def sign(svc: Services, raw: bytes) -> bytes:
    """``raw`` as it goes on the wire: DKIM-signed when [dkim] is configured (CRLF line
    endings, signatures on top), else untouched. Every built message passes here."""
    if svc.signer is None:
        return raw
    return svc.signer.sign(raw, int(svc.now().timestamp()))


async def mark_sent(svc: Services, delivery: Delivery, response: str) -> None:
    now = svc.now()
    async with svc.sessions.begin() as session:
        item = await session.get(OutboxItem, delivery.item_id)
        if item is None:
            return
        item.last_response, item.updated_at, item.sent_at = response[:1000], now, now
        item.claimed_until = None
        metrics.delivered(item.queued_at, now)
        if delivery.sequence is None:
            item.state = "sent"
            return
        item.sent_sequence = delivery.sequence
        # A newer version was wanted while this one was on the wire: send again.
        item.state = "pending" if item.wanted_sequence > delivery.sequence else "sent"
        item.next_attempt_at = now
        sub = await session.get(Subscription, item.subscription_id)
        if sub is not None:
            sub.delivered_sequence = max(sub.delivered_sequence or 0, delivery.sequence)


def retry_delay(attempts: int, base: int, maximum: int) -> timedelta:
    """Exponential backoff like Postfix's: base, 2x base, ... capped at maximum."""
    return timedelta(seconds=min(maximum, base * 2 ** max(0, attempts - 1)))


async def mark_failed(svc: Services, delivery: Delivery, response: str, permanent: bool) -> None:
    now = svc.now()
    cfg = svc.config.relay
    async with svc.sessions.begin() as session:
        item = await session.get(OutboxItem, delivery.item_id)
        if item is None:
            return
        item.last_response, item.updated_at, item.claimed_until = response[:1000], now, None
        expired = now - item.queued_at > timedelta(seconds=cfg.max_queue_lifetime)
        if permanent or expired:
            item.state = "failed"
            if expired and not permanent:
                item.last_response = f"queue lifetime exceeded; last answer: {response}"[:1000]
        else:
            item.state = "pending"
            item.next_attempt_at = now + retry_delay(item.attempts, cfg.retry_base,
                                                     cfg.retry_max)
        metrics.not_delivered(item.state)


async def release(svc: Services, item_id: int) -> None:
    """Give a claimed item back untouched (shutdown)."""
    async with svc.sessions.begin() as session:
        await session.execute(
            update(OutboxItem).where(OutboxItem.id == item_id, OutboxItem.state == "sending")
            .values(state="pending", claimed_until=None,
                    attempts=func.max(OutboxItem.attempts - 1, 0)
                    if svc.dialect == "sqlite" else func.greatest(OutboxItem.attempts - 1, 0)))


# --------------------------------------------------------------------------------------------
# Batches: what the relay workers use at volume (one claim, one load, one record per batch)


@dataclass(frozen=True)
class Claimed:
    id: int
    kind: str
    subscription_id: int | None
    rcpt_to: str
    rcpt_domain: str
    mail_from: str
    raw: bytes | None
    attempts: int
    queued_at: datetime


_OUTBOX = cast(Table, OutboxItem.__table__)
_SUBS = cast(Table, Subscription.__table__)
_EVENTS = cast(Table, Event.__table__)
_ANSWERS = cast(Table, Answer.__table__)


async def claim_batch(svc: Services, limit: int,
                      exclude_domains: Collection[str] = ()) -> list[Claimed]:
    """Take up to ``limit`` due items in one statement (UPDATE ... RETURNING over a SKIP
    LOCKED selection), grouped by destination so connections can be reused."""
    now = svc.now()
    o = _OUTBOX.c
    # Two index-friendly selections (ix_outbox_state_next) rather than one OR: with 100,000
    # items queued, the OR made every claim scan the table.
    pending = and_(o.state == "pending", o.next_attempt_at <= now)
    expired = and_(o.state == "sending", o.claimed_until < now)
    async with svc.engine.begin() as conn:
        ids: list[int] = []
        for due in (pending, expired):
            if len(ids) >= limit:
                break
            if exclude_domains:
                due = and_(due, o.rcpt_domain.not_in(list(exclude_domains)))
            ids += (await conn.execute(
                select(o.id).where(due).order_by(o.next_attempt_at, o.id)
                .limit(limit - len(ids)).with_for_update(skip_locked=True))).scalars().all()
        if not ids:
            return []
        rows = (await conn.execute(
            update(_OUTBOX).where(o.id.in_(ids))
            .values(state="sending", claimed_until=now + claim_timeout(svc),
                    attempts=o.attempts + 1, updated_at=now)
            .returning(o.id, o.kind, o.subscription_id, o.rcpt_to, o.rcpt_domain, o.mail_from,
                       o.raw, o.attempts, o.queued_at))).all()
    claimed = [Claimed(*r) for r in rows]
    claimed.sort(key=lambda c: (c.rcpt_domain, c.id))
    return claimed


@dataclass
class TemplateCache:
    """Rendered invite templates per event version (a fan-out renders each once)."""

    size: int = 64
    items: dict[tuple[int, int, str, datetime], build.InviteTemplate] = field(
        default_factory=dict)

    def get(self, svc: Services, event: Any) -> build.InviteTemplate:
        key = (event.id, event.sequence, event.status, event.updated_at)
        template = self.items.get(key)
        if template is None:
            if len(self.items) >= self.size:
                self.items.pop(next(iter(self.items)))
            template = self.items[key] = build.InviteTemplate(
                build.OutboundEvent(
                    uid=event.uid, sequence=event.sequence,
                    cancelled=event.status == "cancelled", content=event.content,
                    organizer_name=event.organizer_name,
                    organizer_email=event.organizer_email,
                    page_url=svc.page_url(event.public_id)),
                svc.book.domain, svc.now())
        return template


async def prepare_batch(svc: Services, claimed: list[Claimed],
                        templates: TemplateCache) -> list[Delivery]:
    """The messages for claimed items; items whose subscription stopped are cancelled."""
    now = svc.now()
    sub_ids = [c.subscription_id for c in claimed if c.subscription_id is not None]
    subs: dict[int, Any] = {}
    events: dict[int, Any] = {}
    if sub_ids:
        async with svc.engine.connect() as conn:
            s = _SUBS.c
            for row in (await conn.execute(
                    select(s.id, s.event_id, s.email, s.name, s.partstat, s.status)
                    .where(s.id.in_(sub_ids)))).all():
                subs[row.id] = row
            e = _EVENTS.c
            wanted = {r.event_id for r in subs.values()}
            if wanted:
                for ev in (await conn.execute(
                        select(e.id, e.uid, e.public_id, e.sequence, e.status, e.content,
                               e.organizer_name, e.organizer_email, e.updated_at)
                        .where(e.id.in_(wanted)))).all():
                    events[ev.id] = ev
    # Answers to single occurrences, for events with overrides only (one query; most
    # events have none, and a fan-out must not pay for it).
    per_occurrence: dict[int, dict[str, str]] = {}
    with_overrides = [sid for sid, row in subs.items()
                      if row.event_id in events and "RECURRENCE-ID" in events[row.event_id].content]
    if with_overrides:
        a = _ANSWERS.c
        async with svc.engine.connect() as conn:
            for sid, occ, partstat in (await conn.execute(
                    select(a.subscription_id, a.occurrence, a.partstat).where(
                        a.subscription_id.in_(with_overrides), a.occurrence != ""))).all():
                per_occurrence.setdefault(sid, {})[occ] = partstat
    book = svc.book
    out: list[Delivery] = []
    gone: list[int] = []
    broken: list[tuple[int, str]] = []
    for c in claimed:
        if c.kind == "message":
            out.append(Delivery(c.id, c.mail_from, c.rcpt_to, c.raw or b"", None))
            continue
        sub = subs.get(c.subscription_id or 0)
        event = events.get(sub.event_id) if sub is not None else None
        if sub is None or event is None or sub.status != "active":
            gone.append(c.id)
            continue
        token = book.token(sub.id)  # one HMAC for the three addresses
        try:
            raw = templates.get(svc, event).render(
                build.OutboundRecipient(
                    email=sub.email, name=sub.name, partstat=sub.partstat,
                    rsvp_address=f"rsvp+{token}@{book.domain}",
                    unsubscribe_address=f"unsubscribe+{token}@{book.domain}",
                    unsubscribe_url=svc.unsubscribe_url(token),
                    occurrences=per_occurrence.get(sub.id, {})),
                now=now, message_id=new_message_id(svc))
        except Exception as exc:
            # One item that cannot be built (an address stored before it would have been
            # refused, say) fails alone; the batch's other mail goes out.
            log.warning("outbox item %d: the message could not be built", c.id, exc_info=True)
            broken.append((c.id, f"the message could not be built: {exc}"[:500]))
            continue
        out.append(Delivery(c.id, f"bounce+{token}@{book.domain}", sub.email, raw,
                            event.sequence, sub.id))
    if gone:
        async with svc.engine.begin() as conn:
            await conn.execute(
                update(_OUTBOX).where(_OUTBOX.c.id.in_(gone))
                .values(state="cancelled", updated_at=now, claimed_until=None,
                        last_response="subscription is no longer active"))
    if broken:
        async with svc.engine.begin() as conn:
            for item_id, reason in broken:
                await conn.execute(
                    update(_OUTBOX).where(_OUTBOX.c.id == item_id)
                    .values(state="failed", updated_at=now, claimed_until=None,
                            last_response=reason))
    if svc.signer is not None and out:
        # RSA signing is the costliest step of a signed fan-out; `cryptography` releases
        # the GIL while it signs, so a thread lets the loop keep sending meanwhile.
        signed = await asyncio.to_thread(lambda: [sign(svc, d.raw) for d in out])
        out = [replace(d, raw=raw) for d, raw in zip(out, signed, strict=True)]
    return out


async def record(svc: Services, results: list[tuple[Delivery, bool, bool, str]],
                 claims: dict[int, Claimed]) -> None:
    """Write the outcome of many deliveries at once: (delivery, ok, permanent, answer)."""
    if not results:
        return
    now = svc.now()
    cfg = svc.config.relay
    o = _OUTBOX.c
    sent_invites, sent_messages, failed = [], [], []
    delivered = []
    for d, ok, permanent, response in results:
        if ok and d.sequence is not None:
            sent_invites.append({"b_id": d.item_id, "b_seq": d.sequence,
                                 "b_resp": response[:1000], "b_now": now})
            if d.subscription_id is not None:
                delivered.append({"b_sub": d.subscription_id, "b_seq": d.sequence})
        elif ok:
            sent_messages.append({"b_id": d.item_id, "b_resp": response[:1000], "b_now": now})
        else:
            claim = claims.get(d.item_id)
            attempts = claim.attempts if claim else 1
            expired = claim is not None and \
                now - claim.queued_at > timedelta(seconds=cfg.max_queue_lifetime)
            if permanent or expired:
                state, nxt = "failed", now
                if expired and not permanent:
                    response = f"queue lifetime exceeded; last answer: {response}"
            else:
                state = "pending"
                nxt = now + retry_delay(attempts, cfg.retry_base, cfg.retry_max)
            failed.append({"b_id": d.item_id, "b_state": state, "b_next": nxt,
                           "b_resp": response[:1000], "b_now": now})
    async with svc.engine.begin() as conn:
        if sent_invites:
            # A newer version wanted while this one was on the wire: send again.
            await conn.execute(
                update(_OUTBOX).where(o.id == bindparam("b_id")).values(
                    state=case((o.wanted_sequence > bindparam("b_seq"), "pending"),
                               else_="sent"),
                    sent_sequence=bindparam("b_seq"), last_response=bindparam("b_resp"),
                    updated_at=bindparam("b_now"), sent_at=bindparam("b_now"),
                    next_attempt_at=bindparam("b_now"), claimed_until=None),
                sent_invites)
        if sent_messages:
            await conn.execute(
                update(_OUTBOX).where(o.id == bindparam("b_id")).values(
                    state="sent", last_response=bindparam("b_resp"),
                    updated_at=bindparam("b_now"), sent_at=bindparam("b_now"),
                    claimed_until=None), sent_messages)
        if failed:
            await conn.execute(
                update(_OUTBOX).where(o.id == bindparam("b_id")).values(
                    state=bindparam("b_state"), next_attempt_at=bindparam("b_next"),
                    last_response=bindparam("b_resp"), updated_at=bindparam("b_now"),
                    claimed_until=None), failed)
        if delivered:
            s = _SUBS.c
            await conn.execute(
                update(_SUBS).where(s.id == bindparam("b_sub"), or_(
                    s.delivered_sequence.is_(None),
                    s.delivered_sequence < bindparam("b_seq")))
                .values(delivered_sequence=bindparam("b_seq")), delivered)
    metrics.deliveries_recorded(now, results, claims, failed)


async def release_many(svc: Services, ids: list[int]) -> None:
    """Give claimed items back untouched (shutdown, or a destination that must wait)."""
    if not ids:
        return
    async with svc.engine.begin() as conn:
        await conn.execute(
            update(_OUTBOX).where(_OUTBOX.c.id.in_(ids), _OUTBOX.c.state == "sending")
            .values(state="pending", claimed_until=None,
                    attempts=case((_OUTBOX.c.attempts > 0, _OUTBOX.c.attempts - 1),
                                  else_=0)))


async def postpone(svc: Services, waits: list[tuple[int, float]]) -> None:
    """Claimed items a rate limit holds back: due again after the wait, attempt not counted."""
    now = svc.now()
    o = _OUTBOX.c
    async with svc.engine.begin() as conn:
        await conn.execute(
            update(_OUTBOX).where(o.id == bindparam("b_id"), o.state == "sending").values(
                state="pending", claimed_until=None, next_attempt_at=bindparam("b_next"),
                attempts=case((o.attempts > 0, o.attempts - 1), else_=0)),
            [{"b_id": i, "b_next": now + timedelta(seconds=w)} for i, w in waits])


async def extend_claims(svc: Services, ids: list[int]) -> None:
    """Keep the claims of items this process still holds (a heartbeat)."""
    if not ids:
        return
    until = svc.now() + claim_timeout(svc)
    async with svc.engine.begin() as conn:
        for start in range(0, len(ids), 500):
            await conn.execute(
                update(_OUTBOX).where(_OUTBOX.c.id.in_(ids[start:start + 500]),
                                      _OUTBOX.c.state == "sending")
                .values(claimed_until=until))
