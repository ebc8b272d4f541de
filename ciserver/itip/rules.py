"""The decisions of iTIP processing (RFC 5546), as pure functions of their inputs."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from .parse import Component

PARTSTAT_RSVP = {"ACCEPTED": "Y", "DECLINED": "N", "TENTATIVE": "M"}
ANSWERS = ("ACCEPTED", "DECLINED", "TENTATIVE", "NEEDS-ACTION", "DELEGATED")


class Verdict(StrEnum):
    APPLY = "apply"
    DUPLICATE = "duplicate"  # same SEQUENCE and DTSTAMP: a repeated delivery
    STALE = "stale"


def organizer_verdict(
    stored_seq: int, stored_stamp: datetime | None, new_seq: int | None,
    new_stamp: datetime | None,
) -> Verdict:
    """RFC 5546 §2.1.5: a REQUEST/CANCEL applies if its SEQUENCE is higher, or equal with a
    newer DTSTAMP."""
    seq = new_seq if new_seq is not None else 0
    if seq > stored_seq:
        return Verdict.APPLY
    if seq < stored_seq:
        return Verdict.STALE
    if new_stamp is None or stored_stamp is None:
        # Without stamps we cannot order the two; the organizer's latest mail wins.
        return Verdict.APPLY
    if new_stamp > stored_stamp:
        return Verdict.APPLY
    if new_stamp == stored_stamp:
        return Verdict.DUPLICATE
    return Verdict.STALE


@dataclass(frozen=True)
class AnswerStamp:
    """What orders two answers of one attendee for one occurrence."""

    sequence: int | None
    stamp: datetime


def answer_stamp(comp: Component, mail_date: datetime | None, received: datetime) -> AnswerStamp:
    """SEQUENCE and DTSTAMP of a REPLY; Outlook omits DTSTAMP, so its REPLYTIME, else the
    mail's Date, else the time we received it."""
    stamp = comp.dtstamp or comp.reply_time or mail_date or received
    return AnswerStamp(comp.sequence, stamp)


def reply_is_current(previous: AnswerStamp | None, new: AnswerStamp) -> bool:
    """Apply a REPLY only if it is not older than the last applied one."""
    if previous is None:
        return True
    if (previous.sequence is not None and new.sequence is not None
            and new.sequence != previous.sequence):
        return new.sequence > previous.sequence
    return _naive_safe(new.stamp) >= _naive_safe(previous.stamp)


def _naive_safe(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def rsvp_letter(partstat: str | None) -> str | None:
    return PARTSTAT_RSVP.get((partstat or "").upper())


def in_window(rsvp_until: datetime, when: datetime) -> bool:
    """Answers change the report until the event's last occurrence ends."""
    return _naive_safe(when) <= _naive_safe(rsvp_until)
