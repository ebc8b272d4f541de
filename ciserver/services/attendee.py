"""Mail to rsvp+, bounce+ and unsubscribe+ addresses: what customers and MTAs send back."""

from __future__ import annotations

import email.message
import logging
from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from .. import metrics
from ..addresses import Kind, Recipient, normalize_email
from ..itip import build
from ..itip import content as content_mod
from ..itip.mime import parse_message
from ..itip.parse import Component, ItipError, ItipObject
from ..itip.rules import AnswerStamp, answer_stamp, in_window, reply_is_current
from ..store.models import Answer, Event, RsvpHistory, Subscription
from . import batch as batches
from . import notify, outbox, subscriptions
from .context import Services
from .organizer import Incoming
from .outcome import Outcome, done, ignored, quarantined, rejected

log = logging.getLogger("ciserver.attendee")


async def handle(svc: Services, session: AsyncSession, msg: Incoming,
                 rcpt: Recipient) -> list[Outcome]:
    sub = await session.get(Subscription, rcpt.subscription_id)
    event = await session.get(Event, sub.event_id) if sub is not None else None
    if sub is None or event is None:
        return [quarantined(f"token {rcpt.token} names a subscription that no longer exists")]
    if rcpt.kind is Kind.UNSUBSCRIBE:
        changed = await subscriptions.stop(svc, session, sub, "unsubscribed")
        return [done(f"{sub.email} unsubscribed from event {event.public_id}"
                     if changed else f"{sub.email} was already unsubscribed")]
    if rcpt.kind is Kind.BOUNCE:
        return [await _bounce(svc, session, msg, sub)]
    return await _rsvp(svc, session, msg, sub, event)


# --------------------------------------------------------------------------------------------
# Bounces (RFC 3464)


_SUCCESS_ACTIONS = ("delivered", "relayed", "expanded")


def _dsn_fields(raw: bytes) -> list[tuple[str, str]]:
    """(Action, Status) of each recipient block of a delivery-status report."""
    out: list[tuple[str, str]] = []
    for part in parse_message(raw).walk():
        if part.get_content_type() != "message/delivery-status":
            continue
        payload = part.get_payload()
        blocks = payload if isinstance(payload, list) else []
        for block in blocks:
            if isinstance(block, email.message.Message) and block.get("Action"):
                out.append((str(block.get("Action", "")).strip().lower(),
                            str(block.get("Status", "")).strip()))
    return out


async def _bounce(svc: Services, session: AsyncSession, msg: Incoming,
                  sub: Subscription) -> Outcome:
    if msg.ex.auto_reply and not msg.ex.is_dsn:
        return ignored("an automatic reply to the bounce address")
    fields = _dsn_fields(msg.raw)
    hard = [s for a, s in fields if a == "failed" and s.startswith("5")]
    if hard:
        await subscriptions.stop(svc, session, sub, "bounced")
        log.info("hard bounce sub=%s status=%s", sub.id, hard[0])
        return done(f"hard bounce ({hard[0]}): {sub.email} marked bounced")
    if fields and all(a in _SUCCESS_ACTIONS for a, _ in fields):
        # RFC 3464 also reports success (NOTIFY=SUCCESS, list expansion): not a bounce.
        return ignored(f"a delivery report without failure for {sub.email} "
                       f"({', '.join(a for a, _ in fields)})")
    if fields or msg.ex.is_dsn:
        sub.soft_bounces += 1
        return done(f"soft bounce for {sub.email} "
                    f"({', '.join(f'{a} {s}'.strip() for a, s in fields) or 'DSN'})")
    return ignored("mail to the bounce address that is not a delivery report")


# --------------------------------------------------------------------------------------------
# Replies


async def _rsvp(svc: Services, session: AsyncSession, msg: Incoming, sub: Subscription,
                event: Event) -> list[Outcome]:
    ex = msg.ex
    if ex.is_dsn:
        return [ignored("a delivery report sent to the reply address")]
    if not ex.parts:
        if ex.auto_reply:
            return [ignored("an automatic reply (out of office), not an answer")]
        if ex.problems:
            return [rejected("no calendar data could be read: " + "; ".join(ex.problems))]
        return [await _forward_plain(svc, session, msg, sub, event)]
    # Unreadable calendar data from a customer's client is `rejected`, with the reason: it is
    # bad input, not our failure, and `failed` (what unreadable organizer mail gets) would
    # make `ciserver status` report the server unhealthy for anyone's junk.
    try:
        objects = msg.objects()
    except ItipError as exc:
        return [rejected(f"unreadable calendar data: {exc}")]
    outcomes: list[Outcome] = []
    for obj in objects:
        if obj.uid.strip().lower() != event.uid.lower():
            outcomes.append(quarantined(
                f"{obj.method} for UID {obj.uid!r}, but the token belongs to event "
                f"{event.public_id} (UID {event.uid})"))
            continue
        if obj.method == "REPLY":
            outcomes.extend(await _reply(svc, session, msg, sub, event, obj))
        elif obj.method == "REFRESH":
            if sub.status != "active":
                outcomes.append(ignored(f"REFRESH from {sub.email}, whose subscription is "
                                        f"{sub.status}: nothing sent"))
                continue
            await outbox.enqueue_subscription(svc, session, sub, event.sequence)
            outcomes.append(done(f"REFRESH: current version queued for {sub.email}"))
        elif obj.method == "COUNTER":
            outcomes.append(await _counter(svc, session, msg, sub, event, obj))
        else:
            outcomes.append(ignored(f"METHOD {obj.method or '(none)'} is not an answer"))
    return outcomes


# What a REPLY's PARTSTAT may say (RFC 5546 3.2.3, VEVENT): anything else is no answer.
ANSWERS = frozenset({"ACCEPTED", "DECLINED", "TENTATIVE", "DELEGATED"})

# How many people one subscriber's forwarded invite may sign up: a forward to family or
# colleagues is normal, a token used to subscribe a mailing list is not.
MAX_FORWARDS = 25


async def _reply(svc: Services, session: AsyncSession, msg: Incoming, sub: Subscription,
                 event: Event, obj: ItipObject) -> list[Outcome]:
    outcomes = []
    # RFC 5546 3.2.3: a REPLY carries exactly one ATTENDEE, the one answering. One message
    # records one person's answer (the subscriber's if named, else the first one's): a
    # REPLY listing thirty strangers must not subscribe them all.
    answering = ""
    for comp in obj.components:
        if not comp.attendees:
            outcomes.append(ignored("REPLY without ATTENDEE: nobody to record the answer for"))
            continue
        with_status = [a for a in comp.attendees if a.partstat]
        if not with_status:
            continue
        att = next((a for a in with_status if a.email == (answering or sub.email)), None)
        if att is None and not answering:
            att = with_status[0]
        if att is None:
            outcomes.append(ignored(f"REPLY component for {with_status[0].email!r}: this "
                                    f"message answers for {answering!r} only"))
            continue
        answering = att.email
        if comp.recurrence_id and not content_mod.is_occurrence(event.content,
                                                                comp.recurrence_id):
            outcomes.append(ignored(f"RECURRENCE-ID {comp.recurrence_id} from {att.email} is "
                                    "no occurrence of this event: nothing recorded"))
            continue
        if att.partstat.upper() not in ANSWERS:
            # RFC 5545 3.2.12: a PARTSTAT one does not know counts as NEEDS-ACTION, and
            # NEEDS-ACTION is no answer: it must not replace a Yes, No or Maybe.
            outcomes.append(ignored(f"PARTSTAT {att.partstat} from {att.email} is not an "
                                    "answer (taken as NEEDS-ACTION): nothing recorded"))
            continue
        if len(comp.attendees) > 1:
            outcomes.append(ignored(f"REPLY names {len(comp.attendees)} attendees; only the "
                                    f"answer of {att.email} is recorded (one per REPLY)"))
        target = sub
        if att.email != sub.email:
            if att.email.rpartition("@")[2] == svc.book.domain:
                outcomes.append(ignored(f"ATTENDEE {att.email} is one of our own "
                                        "addresses, not a person"))
                continue
            forwards = (await session.execute(select(func.count(Subscription.id)).where(
                Subscription.forwarded_by == sub.id))).scalar_one()
            known = (await session.execute(select(Subscription.id).where(
                Subscription.event_id == event.id, Subscription.email == att.email))
            ).scalar_one_or_none()
            if known is None and forwards >= MAX_FORWARDS:
                outcomes.append(ignored(f"forwarded-invite answer from {att.email!r} not "
                                        f"recorded: {sub.email}'s invite has signed up "
                                        f"{forwards} people already"))
                continue
            # Someone the invite was forwarded to: a subscription of their own.
            try:
                res = await subscriptions.invite(svc, session, event, att.email, att.name,
                                                 source="forwarded", forwarded_by=sub.id,
                                                 origin=f"forwarded by {sub.email}",
                                                 send=False)
            except (subscriptions.InvalidAddress, subscriptions.EventClosed) as exc:
                outcomes.append(ignored(f"forwarded-invite answer from {att.email!r} "
                                        f"not recorded: {exc}"))
                continue
            target = res.subscription
        outcomes.append(await _apply_answer(svc, session, msg, target, event, comp,
                                            att.partstat, att.comment or comp.comment))
    return outcomes or [ignored("REPLY without a participation status")]


async def _apply_answer(svc: Services, session: AsyncSession, msg: Incoming,
                        sub: Subscription, event: Event, comp: Component, partstat: str,
                        comment: str) -> Outcome:
    now = svc.now()
    stamp = answer_stamp(comp, msg.ex.date, msg.received_at)
    occurrence = comp.recurrence_id
    # A batch of messages preloads the answers of its subscriptions (services.inbox).
    batch = batches.of(session)
    if batch is not None and sub.id in batch.answers_for:
        current = batch.answers.get((sub.id, occurrence))
    else:
        batch = None
        current = (await session.execute(select(Answer).where(
            Answer.subscription_id == sub.id, Answer.occurrence == occurrence))
        ).scalar_one_or_none()
    previous = AnswerStamp(current.sequence, current.stamp) if current else None
    # A cancelled event's counts are final: an answer arriving after the CANCEL (a client
    # that answered an older copy) is kept in history as late, like one after the event.
    if event.status == "cancelled" or not in_window(event.rsvp_until, msg.received_at):
        outcome = "late"
    elif not reply_is_current(previous, stamp):
        outcome = "stale"
    else:
        outcome = "applied"
    history = RsvpHistory(subscription_id=sub.id, occurrence=occurrence, partstat=partstat,
                          sequence=stamp.sequence, stamp=stamp.stamp, comment=comment[:2000],
                          outcome=outcome, inbox_id=msg.inbox_id, received_at=now)
    if batch is not None:
        batch.history.append(history)
    else:
        session.add(history)
    metrics.answer(session, partstat, outcome)
    where = f" for {occurrence}" if occurrence else ""
    if outcome != "applied":
        return done(f"{outcome} answer {partstat} from {sub.email}{where} kept in history only")
    if current is None:
        answer = Answer(subscription_id=sub.id, occurrence=occurrence, partstat=partstat,
                        sequence=stamp.sequence, stamp=stamp.stamp, comment=comment[:2000],
                        received_at=now)
        if batch is not None:
            batch.new_answers.append(answer)
            batch.answers[(sub.id, occurrence)] = answer
        else:
            session.add(answer)
    else:
        current.partstat, current.sequence, current.stamp = partstat, stamp.sequence, stamp.stamp
        current.comment, current.received_at = comment[:2000], now
    if not occurrence:
        sub.partstat, sub.responded_at, sub.updated_at = partstat, now, now
    log.info("answer %s from sub=%s event=%s uid=%s%s", partstat, sub.id, event.public_id,
             event.uid, where)
    return done(f"{sub.email} answered {partstat}{where}")


async def _forward_plain(svc: Services, session: AsyncSession, msg: Incoming,
                         sub: Subscription, event: Event) -> Outcome:
    body = msg.ex.text_body.strip() or "(the message has no plain-text body)"
    # Who wrote it: the From of the mail (a colleague the invite was forwarded to, say), not
    # necessarily the subscriber whose address it was sent to.
    writer = normalize_email(msg.ex.from_addr) or sub.email
    who = f"{msg.ex.from_name or sub.name or writer} <{writer}>" if writer != sub.email else \
        f"{sub.name or sub.email} <{sub.email}>"
    via = f" (to {sub.email}'s invite address)" if writer != sub.email else ""
    await notify.send(
        svc, session, to=event.organizer_email, reply_to=writer, auto_submitted="auto-replied",
        subject=f"Message from {writer} about {event.summary}",
        text=f"{who}{via} wrote about {event.summary!r}:\n\n"
             f"Subject: {msg.ex.subject}\n\n{body}\n\n-- \nAnswering this mail answers "
             f"{writer} directly.\n")
    return done(f"plain reply from {writer} forwarded to {event.organizer_email}")


async def _counter(svc: Services, session: AsyncSession, msg: Incoming, sub: Subscription,
                   event: Event, obj: ItipObject) -> Outcome:
    comp = obj.first
    note = comp.comment or next((a.comment for a in comp.attendees if a.comment), "")
    occurrence = f" (the occurrence of {comp.recurrence_id})" if comp.recurrence_id else ""
    lines = [f"{sub.name or sub.email} <{sub.email}> proposes another time for "
             f"{event.summary!r}{occurrence}:", "",
             f"Now:       {_when(event.start_at, event.end_at, event.tzid)}",
             f"Proposed:  {_when(comp.start_utc, comp.end_utc, event.tzid)}"]
    if comp.location and comp.location != event.location:
        lines.append(f"Place:     {comp.location}")
    if note:
        lines += ["", f"Their note: {note}"]
    lines += ["", "If you agree, change the event in your calendar; everyone who has the "
              "invite will get the change. Answering this mail answers "
              f"{sub.email} directly."]
    await notify.send(
        svc, session, to=event.organizer_email, reply_to=sub.email, auto_submitted="auto-replied",
        subject=f"{sub.name or sub.email} proposes a new time for {event.summary}",
        text="\n".join(lines) + "\n")
    proposal = (f"proposed {comp.start_utc:%Y-%m-%dT%H:%M:%SZ}" if comp.start_utc
                else "proposed (no time)")
    if comp.end_utc:
        proposal += f" to {comp.end_utc:%Y-%m-%dT%H:%M:%SZ}"
    partstat = next((a.partstat for a in comp.attendees
                     if a.email == sub.email and a.partstat), "NEEDS-ACTION")
    session.add(RsvpHistory(
        subscription_id=sub.id, occurrence=comp.recurrence_id, partstat=partstat[:16],
        sequence=comp.sequence, stamp=answer_stamp(comp, msg.ex.date, msg.received_at).stamp,
        comment=(proposal + (f"; {note}" if note else ""))[:2000], outcome="counter",
        inbox_id=msg.inbox_id, received_at=svc.now()))
    metrics.answer(session, "COUNTER", "counter")
    if svc.config.organizers.decline_counter:
        await _decline_counter(svc, session, sub, event, comp.recurrence_id)
    return done(f"COUNTER from {sub.email} forwarded to the organizer")


async def _decline_counter(svc: Services, session: AsyncSession, sub: Subscription,
                           event: Event, recurrence_id: str) -> None:
    book = svc.book
    view = build.OutboundEvent(
        uid=event.uid, sequence=event.sequence, cancelled=event.status == "cancelled",
        content=event.content, organizer_name=event.organizer_name,
        organizer_email=event.organizer_email, page_url=svc.page_url(event.public_id))
    to = build.OutboundRecipient(
        email=sub.email, name=sub.name, partstat=sub.partstat,
        rsvp_address=book.address(Kind.RSVP, sub.id),
        unsubscribe_address=book.address(Kind.UNSUBSCRIBE, sub.id),
        unsubscribe_url=svc.unsubscribe_url(book.token(sub.id)))
    await notify.send(
        svc, session, to=sub.email, sender=to.rsvp_address, auto_submitted="auto-replied",
        envelope_from=book.address(Kind.BOUNCE, sub.id),
        subject=f"Declined: your proposed new time for {event.summary}",
        text=f"The organizer keeps the current time for {event.summary!r}.\n",
        calendar=(build.render_declinecounter(view, to, svc.now(), recurrence_id),
                  "DECLINECOUNTER"))


def _when(start: datetime | None, end: datetime | None, tzid: str) -> str:
    """A time range as a person reads it: in the event's zone, and in UTC."""
    if start is None:
        return "(no time given)"
    zone: tzinfo = UTC
    if tzid:
        try:
            zone = ZoneInfo(tzid)
        except (ZoneInfoNotFoundError, ValueError):
            zone = UTC
    local = start.astimezone(zone)
    text = f"{local:%A %d %B %Y, %H:%M}"
    if end is not None and end > start:
        local_end = end.astimezone(zone)
        text += f" to {local_end:%H:%M}" if local_end.date() == local.date() else \
            f" to {local_end:%A %d %B %Y, %H:%M}"
    label = getattr(zone, "key", "UTC")
    if label != "UTC":
        text += f" ({label}; {start.astimezone(UTC):%Y-%m-%d %H:%M} UTC)"
    else:
        text += " (UTC)"
    return text
