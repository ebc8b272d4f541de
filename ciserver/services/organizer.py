"""Mail to create@: the organizer's calendar creating, updating or cancelling an event."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..addresses import normalize_email
from ..itip import build
from ..itip import content as content_mod
from ..itip.mime import Extraction
from ..itip.parse import ItipError, ItipObject, parse_parts
from ..itip.rules import Verdict, organizer_verdict
from ..store.models import Event, Subscription
from . import events, notify, senderauth
from .context import Services
from .outcome import Outcome, done, ignored, rejected
from .policy import OrganizerPolicy

log = logging.getLogger("ciserver.organizer")


@dataclass
class Incoming:
    """One received message, parsed once (the inbox parses it before it takes the store)."""

    inbox_id: int
    raw: bytes
    mail_from: str
    received_at: datetime
    ex: Extraction
    identity: str | None = None  # the sender authentication proved ("" = none), once known
    _objects: list[ItipObject] | None = field(default=None, repr=False)
    _error: ItipError | None = field(default=None, repr=False)

    def objects(self) -> list[ItipObject]:
        """The iTIP objects of the message; raises ItipError for unreadable calendar data."""
        if self._error is not None:
            raise self._error
        if self._objects is None:
            try:
                self._objects = parse_parts(self.ex.parts)
            except ItipError as exc:
                self._error = exc
                raise
        return self._objects


def _policy(svc: Services) -> OrganizerPolicy:
    return OrganizerPolicy(svc.config.organizers)


def _accepted(svc: Services, obj: ItipObject, organizer: str) -> tuple[str, str] | None:
    """create@'s iTIP REPLY (ACCEPTED) to the organizer's invitation, if configured."""
    if not svc.config.organizers.reply_accepted:
        return None
    return (build.render_reply(uid=obj.uid, sequence=obj.sequence or 0, organizer=organizer,
                               attendee=svc.book.create, partstat="ACCEPTED", now=svc.now(),
                               summary=obj.first.summary), "REPLY")


async def _count(session: AsyncSession, event: Event) -> int:
    return int((await session.execute(
        select(func.count(Subscription.id)).where(Subscription.event_id == event.id,
                                                  Subscription.status == "active"))
    ).scalar_one())


async def _tell(svc: Services, session: AsyncSession, msg: Incoming, to: str, subject: str,
                text: str, calendar: tuple[str, str] | None = None) -> None:
    """A notice to the organizer, only if their address is one we serve (no backscatter)."""
    if not svc.config.organizers.confirm or not to:
        return
    if not _policy(svc).sender_allowed(to):
        return
    await notify.send(svc, session, to=to, subject=subject, text=text,
                      in_reply_to=msg.ex.message_id, calendar=calendar,
                      auto_submitted="auto-replied")


async def handle(svc: Services, session: AsyncSession, msg: Incoming) -> list[Outcome]:
    ex = msg.ex
    if ex.is_dsn:
        return [ignored("a delivery status report, not an invite")]
    if ex.auto_reply and not ex.parts:
        return [ignored("an automatic reply, not an invite")]
    if not ex.parts:
        if ex.has_tnef:
            await _tell(svc, session, msg, ex.from_addr,
                        "Your invitation could not be read (winmail.dat)",
                        "Your mail program sent the invitation only as a winmail.dat (TNEF) "
                        "attachment, which other calendars cannot read, so no event was "
                        "created.\n\nIn Outlook, send the invitation again after turning off "
                        "\"Rich Text\" for this recipient (or use HTML format); an Exchange "
                        "administrator can set the TNEF conversion for external recipients "
                        "to off.\n")
            return [rejected("only a TNEF winmail.dat attachment: no iCalendar to read; "
                             "the organizer was told")]
        if ex.problems:  # the message is kept as failed, for a person to look at
            raise ItipError("no calendar data could be read: " + "; ".join(ex.problems))
        return [ignored("no calendar data in the message")]
    objs = msg.objects()  # ItipError -> the message fails with a readable error
    if not objs:
        return [ignored("the calendar data holds no event (no VEVENT)")]
    results: list[Outcome] = []
    for obj in objs:
        results.append(await _handle_object(svc, session, msg, obj))
    return results


async def _handle_object(svc: Services, session: AsyncSession, msg: Incoming,
                         obj: ItipObject) -> Outcome:
    ex = msg.ex
    if obj.method not in ("REQUEST", "CANCEL"):
        return ignored(f"METHOD {obj.method or '(none)'} is not an invitation; only REQUEST "
                       "and CANCEL are taken at create@")
    if not obj.uid:
        await _tell(svc, session, msg, ex.from_addr, "Your invitation has no UID",
                    "The calendar data in your invitation has no UID, so later changes could "
                    "never be matched to it. No event was created. Please send the invitation "
                    "from a calendar program.\n")
        return rejected("the calendar object has no UID")
    if len(obj.organizers) > 1:
        await _tell(svc, session, msg, ex.from_addr, "Your invitation names several organizers",
                    f"The invitation {obj.first.summary!r} names several organizers "
                    f"({', '.join(sorted(obj.organizers))}); no event was created.\n")
        return rejected(f"several organizers: {', '.join(sorted(obj.organizers))}")
    organizer = next(iter(obj.organizers), "") or normalize_email(ex.from_addr)
    if msg.identity is None:
        msg.identity = await senderauth.identity(svc, msg.raw, ex.from_addr)
    decision = _policy(svc).check(msg.identity, organizer)
    if not decision.allowed:
        text = (f"The invitation {obj.first.summary!r} (UID {obj.uid}) was not accepted: "
                f"{decision.reason}.\n\nNothing was created or changed.\n")
        # Both the organizer and the authenticated sender may hear why (if we serve them).
        for to in dict.fromkeys(a for a in (organizer, decision.identity) if a):
            await _tell(svc, session, msg, to, "Your invitation was not accepted", text)
        return rejected(decision.reason)
    existing = (await session.execute(
        select(Event).where(Event.organizer_email == normalize_email(organizer),
                            Event.organizer_uid == obj.uid))).scalar_one_or_none()
    if obj.method == "REQUEST":
        return await _request(svc, session, msg, obj, organizer, existing)
    return await _cancel(svc, session, msg, obj, existing)


def _organizer_name(obj: ItipObject, msg: Incoming) -> str:
    comp = obj.first
    if comp.organizer is not None and comp.organizer.name:
        return comp.organizer.name
    return msg.ex.from_name


async def _request(svc: Services, session: AsyncSession, msg: Incoming, obj: ItipObject,
                   organizer: str, existing: Event | None) -> Outcome:
    if existing is None:
        content = content_mod.from_object(obj)
        event = await events.create(
            svc, session, organizer=organizer, organizer_name=_organizer_name(obj, msg),
            organizer_uid=obj.uid, content=content, origin="calendar",
            organizer_sequence=obj.sequence or 0, organizer_dtstamp=obj.dtstamp,
            inbox_id=msg.inbox_id)
        await _tell(svc, session, msg, organizer, f"Event ready: {event.summary}",
                    f"Your event {event.summary!r} is on the invite server.\n\n"
                    f"Share this page; everyone who asks there gets a real calendar invite:\n"
                    f"{svc.page_url(event.public_id)}\n\nEdit or cancel the event in your "
                    "calendar as usual: every change reaches everyone who has the invite.\n",
                    calendar=_accepted(svc, obj, organizer))
        log.info("event created uid=%s id=%s organizer=%s", obj.uid, event.public_id, organizer)
        return done(f"created event {event.public_id} ({event.summary!r})")
    verdict = organizer_verdict(existing.organizer_sequence, existing.organizer_dtstamp,
                                obj.sequence, obj.dtstamp)
    if verdict is not Verdict.APPLY:
        log.info("stale organizer request uid=%s seq=%s stamp=%s (have seq=%s stamp=%s)",
                 obj.uid, obj.sequence, obj.dtstamp, existing.organizer_sequence,
                 existing.organizer_dtstamp)
        return ignored(f"{verdict.value} update of event {existing.public_id}: SEQUENCE "
                       f"{obj.sequence} / DTSTAMP {obj.dtstamp} is not newer than "
                       f"{existing.organizer_sequence} / {existing.organizer_dtstamp}")
    existing.organizer_sequence = max(existing.organizer_sequence, obj.sequence or 0)
    existing.organizer_dtstamp = obj.dtstamp or existing.organizer_dtstamp
    name = _organizer_name(obj, msg)
    if name:
        existing.organizer_name = name
    new_content = content_mod.merge(existing.content, obj)
    changes = await events.change(svc, session, existing, new_content, origin="calendar",
                                  status="confirmed", inbox_id=msg.inbox_id)
    if not changes:
        return done(f"event {existing.public_id}: update without visible changes")
    log.info("event updated uid=%s id=%s seq=%s changes=%s", obj.uid, existing.public_id,
             existing.sequence, ",".join(changes))
    await _tell(svc, session, msg, organizer, f"Event updated: {existing.summary}",
                f"Your change to {existing.summary!r} ({', '.join(changes)}) is going out to "
                f"the {await _count(session, existing)} customer(s) who have the invite.\n\n"
                f"{svc.page_url(existing.public_id)}\n", calendar=_accepted(svc, obj, organizer))
    return done(f"updated event {existing.public_id} to SEQUENCE {existing.sequence} "
                f"({', '.join(changes)})")


async def _cancel(svc: Services, session: AsyncSession, msg: Incoming, obj: ItipObject,
                  existing: Event | None) -> Outcome:
    if existing is None:
        return ignored(f"CANCEL for an unknown event (UID {obj.uid})")
    seq = obj.sequence
    # A CANCEL without SEQUENCE is taken as the current version (some clients omit it).
    verdict = organizer_verdict(existing.organizer_sequence, existing.organizer_dtstamp,
                                seq if seq is not None else existing.organizer_sequence,
                                obj.dtstamp)
    if verdict is not Verdict.APPLY:
        return ignored(f"{verdict.value} CANCEL of event {existing.public_id}: SEQUENCE "
                       f"{seq} / DTSTAMP {obj.dtstamp} is not newer than "
                       f"{existing.organizer_sequence} / {existing.organizer_dtstamp}")
    existing.organizer_sequence = max(existing.organizer_sequence, seq or 0)
    existing.organizer_dtstamp = obj.dtstamp or existing.organizer_dtstamp
    if obj.master is not None or not obj.overrides:
        if not await events.cancel(svc, session, existing, origin="calendar",
                                   inbox_id=msg.inbox_id):
            return ignored(f"event {existing.public_id} was already cancelled")
        log.info("event cancelled uid=%s id=%s", obj.uid, existing.public_id)
        await _tell(svc, session, msg, existing.organizer_email,
                    f"Event cancelled: {existing.summary}",
                    f"The cancellation of {existing.summary!r} is going out to the "
                    f"{await _count(session, existing)} customer(s) who have the invite.\n")
        return done(f"cancelled event {existing.public_id}")
    rids = [c.recurrence_id for c in obj.overrides]
    new_content = content_mod.cancel_occurrences(existing.content, rids)
    if not await events.change(svc, session, existing, new_content, origin="calendar",
                               inbox_id=msg.inbox_id):
        return ignored(f"occurrence(s) {', '.join(rids)} of event {existing.public_id} "
                       "were already cancelled")
    return done(f"cancelled {len(rids)} occurrence(s) of event {existing.public_id}: "
                f"{', '.join(rids)}")
