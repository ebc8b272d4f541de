"""iCalendar objects as the engine sees them (pure: no I/O, no clock).

Turns calendar text into :class:`ItipObject` values: one per UID, with the master VEVENT and
any RECURRENCE-ID overrides, every time converted to a zone we can name again on the way out
(IANA; Windows names such as "W. Europe Standard Time" are mapped) or to UTC.
"""

from __future__ import annotations

import re
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

from icalendar import Calendar, Event
from icalendar.timezone.windows_to_olson import WINDOWS_TO_OLSON

from .mime import CalendarPart, body_method


class ItipError(ValueError):
    """Calendar data we cannot use; the message says why, for a person."""


# Properties of the organizer's VEVENT that customers see; everything else (attendee lists,
# alarms, vendor X- properties, attachments) stays with the organizer.
CONTENT_PROPS = (
    "SUMMARY", "LOCATION", "DESCRIPTION", "URL", "STATUS", "TRANSP", "CLASS",
    "CATEGORIES", "GEO", "PRIORITY", "RRULE", "X-ALT-DESC",
)
TIME_PROPS = ("DTSTART", "DTEND", "RECURRENCE-ID", "DUE")
LIST_TIME_PROPS = ("EXDATE", "RDATE")

_WINDOWS_LOWER = {k.lower(): v for k, v in WINDOWS_TO_OLSON.items()}


@lru_cache(maxsize=512)
def resolve_zone(tzid: str) -> tzinfo | None:
    """An IANA zone for a TZID as clients write it, or None if we cannot name one."""
    name = tzid.strip().strip('"')
    if not name:
        return None
    candidates = [name]
    if "/" in name:
        # Evolution: /freeassociation.sourceforge.net/Tzfile/America/Toronto
        bits = name.strip("/").split("/")
        candidates += ["/".join(bits[-2:]), "/".join(bits[-3:])]
    for cand in candidates:
        try:
            return zoneinfo.ZoneInfo(cand)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass
    low = name.lower()
    for key in (low, low + " standard time"):
        if key in _WINDOWS_LOWER:
            return zoneinfo.ZoneInfo(_WINDOWS_LOWER[key])
    if low in ("utc", "gmt", "z", "etc/utc"):
        return UTC
    return None


def normalize_time(value: date, tzid: str | None) -> date:
    """Dates stay dates; datetimes get an IANA zone or become UTC (floating -> UTC)."""
    if not isinstance(value, datetime):
        return value
    if value.tzinfo is None:
        zone = resolve_zone(tzid) if tzid else None
        return value.replace(tzinfo=zone or UTC)
    if isinstance(value.tzinfo, zoneinfo.ZoneInfo) or (value.utcoffset() == timedelta(0) and (
        value.tzinfo is UTC or str(value.tzinfo) in ("UTC", "tzutc()")
    )):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    # A zone defined by the message's own VTIMEZONE: its offsets are authoritative; keep the
    # IANA name only where it agrees with them at this instant.
    zone = resolve_zone(tzid) if tzid else None
    if zone is not None:
        local = value.replace(tzinfo=None).replace(tzinfo=zone)
        if local.utcoffset() == value.utcoffset():
            return local
    return value.astimezone(UTC)


def to_utc(value: date) -> datetime:
    """The instant of a normalized time; a date counts from midnight UTC."""
    if isinstance(value, datetime):
        return value.astimezone(UTC)
    return datetime(value.year, value.month, value.day, tzinfo=UTC)


def occurrence_key(value: date | None) -> str:
    """How one occurrence is named in the store and in CSV: its start, UTC, ISO 8601."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return value.isoformat()


@dataclass(frozen=True)
class Person:
    email: str
    name: str = ""
    partstat: str = ""
    comment: str = ""


@dataclass(eq=False)
class Component:
    """One VEVENT: the master (recurrence_id == "") or an override of one occurrence."""

    uid: str
    recurrence_id: str
    start: date | None
    end: date | None
    sequence: int | None
    dtstamp: datetime | None
    reply_time: datetime | None
    summary: str
    location: str
    description: str
    status: str
    rrule: str
    organizer: Person | None
    attendees: tuple[Person, ...]
    comment: str
    vevent: Event = field(repr=False)
    # Every ORGANIZER the VEVENT names (a broken client may write several).
    organizers: tuple[Person, ...] = ()

    @property
    def start_utc(self) -> datetime | None:
        return to_utc(self.start) if self.start is not None else None

    @property
    def end_utc(self) -> datetime | None:
        return to_utc(self.end) if self.end is not None else None


@dataclass(eq=False)
class ItipObject:
    """Everything one message says about one UID."""

    method: str
    uid: str
    components: list[Component]
    organizers: set[str]

    @property
    def master(self) -> Component | None:
        return next((c for c in self.components if not c.recurrence_id), None)

    @property
    def overrides(self) -> list[Component]:
        return [c for c in self.components if c.recurrence_id]

    @property
    def first(self) -> Component:
        return self.master or self.components[0]

    @property
    def sequence(self) -> int | None:
        seqs = [c.sequence for c in self.components if c.sequence is not None]
        return max(seqs) if seqs else None

    @property
    def dtstamp(self) -> datetime | None:
        stamps = [c.dtstamp for c in self.components if c.dtstamp is not None]
        return max(stamps) if stamps else None


def _text(comp: Event, name: str) -> str:
    value = comp.get(name)
    if value is None:
        return ""
    if isinstance(value, list):
        value = value[0]
    return str(value).strip()


def _int(comp: Event, name: str) -> int | None:
    value = comp.get(name)
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError:
        return None


_STAMP_RE = re.compile(r"^(\d{8}T\d{6})\d*(Z?)$")


def _stamp(comp: Event, name: str) -> datetime | None:
    prop = comp.get(name)
    if prop is None:
        return None
    try:
        value = getattr(prop, "dt", None)
    except (ValueError, TypeError):  # icalendar keeps unreadable values as "broken" properties
        value = None
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    # Roundcube wrote DTSTAMP:20120713T1254140 (an extra digit): read what can be read.
    raw = comp.get(name)
    text = raw.to_ical().decode() if hasattr(raw, "to_ical") else str(raw)
    m = _STAMP_RE.match(text.strip())
    if m:
        return datetime.strptime(m.group(1), "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return None


def address_of(value: str, email_param: str = "") -> str:
    """The mail address of an ORGANIZER or ATTENDEE value, lower case: ``mailto:`` dropped,
    percent-escapes decoded (``mailto:fan%40example.net`` is a valid URI for the same
    address), and for a value that is no address (Apple's ``urn:uuid:…``) the EMAIL
    parameter (RFC 7986 6.2), which such clients add."""
    address = value.strip()
    if address[:7].lower() == "mailto:":
        address = address[7:]
    if "%" in address:
        address = unquote(address)
    address = address.strip()
    if "@" not in address and "@" in email_param:
        address = email_param.strip().strip('"')
        if address[:7].lower() == "mailto:":
            address = address[7:]
    return address.lower()


def _person(prop: Any) -> Person:
    params = getattr(prop, "params", {}) or {}
    return Person(
        email=address_of(str(prop), str(params.get("EMAIL", ""))),
        name=str(params.get("CN", "")).strip().strip('"'),
        partstat=str(params.get("PARTSTAT", "")).strip().upper(),
        comment=str(params.get("X-RESPONSE-COMMENT", "")).strip(),
    )


def _time_prop(comp: Event, name: str) -> date | None:
    prop = comp.get(name)
    if prop is None:
        return None
    value = getattr(prop, "dt", None)
    if not isinstance(value, date):
        return None
    tzid = prop.params.get("TZID") if hasattr(prop, "params") else None
    return normalize_time(value, str(tzid) if tzid else None)


def recurrence_key(comp: Event) -> str:
    """The occurrence a VEVENT overrides, keyed as answers are (occurrence_key); "" for the
    master."""
    return occurrence_key(_time_prop(comp, "RECURRENCE-ID"))


def _list_times(comp: Event, name: str) -> list[date]:
    props = comp.get(name)
    if props is None:
        return []
    if not isinstance(props, list):
        props = [props]
    out: list[date] = []
    for prop in props:
        tzid = prop.params.get("TZID") if hasattr(prop, "params") else None
        for item in getattr(prop, "dts", []):
            value = item.dt
            if isinstance(value, date):  # PERIOD values (tuples) are not used by clients here
                out.append(normalize_time(value, str(tzid) if tzid else None))
    return out


def clean_vevent(src: Event, uid: str) -> Event:
    """The customer-visible part of an organizer's VEVENT, with normalized times."""
    ev = Event()
    ev.add("UID", uid)
    for name in ("DTSTART", "DTEND", "RECURRENCE-ID"):
        value = _time_prop(src, name)
        if value is not None:
            ev.add(name, value)
    if src.get("DTEND") is None and src.get("DURATION") is not None:
        ev.add("DURATION", src["DURATION"].dt)
    for name in CONTENT_PROPS:
        if name in src:
            ev[name] = src[name]
    for name in LIST_TIME_PROPS:
        values = _list_times(src, name)
        if values:
            ev.add(name, values)
    return ev


def _component(ev: Event) -> Component:
    uid = _text(ev, "UID")
    start = _time_prop(ev, "DTSTART")
    end = _time_prop(ev, "DTEND")
    if end is None and start is not None:
        duration = ev.get("DURATION")
        if duration is not None and isinstance(getattr(duration, "dt", None), timedelta):
            end = start + duration.dt
        elif not isinstance(start, datetime):
            end = start + timedelta(days=1)  # RFC 5545 3.6.1: a date event lasts one day
        else:
            end = start
    rid = _time_prop(ev, "RECURRENCE-ID")
    organizer_props = ev.get("ORGANIZER")
    if organizer_props is None:
        organizer_props = []
    elif not isinstance(organizer_props, list):
        organizer_props = [organizer_props]
    organizers = tuple(_person(o) for o in organizer_props)
    attendees = ev.get("ATTENDEE") or []
    if not isinstance(attendees, list):
        attendees = [attendees]
    rrule = ev.get("RRULE")
    return Component(
        uid=uid,
        recurrence_id=occurrence_key(rid),
        start=start,
        end=end,
        sequence=_int(ev, "SEQUENCE"),
        dtstamp=_stamp(ev, "DTSTAMP"),
        reply_time=_stamp(ev, "X-MICROSOFT-CDO-REPLYTIME"),
        summary=_text(ev, "SUMMARY"),
        location=_text(ev, "LOCATION"),
        description=_text(ev, "DESCRIPTION"),
        status=_text(ev, "STATUS").upper(),
        rrule=rrule.to_ical().decode() if rrule is not None else "",
        organizer=organizers[0] if organizers else None,
        attendees=tuple(_person(a) for a in attendees),
        comment=_text(ev, "COMMENT"),
        vevent=ev,
        organizers=organizers,
    )


def parse_calendar(text: str, header_method: str | None = None) -> list[ItipObject]:
    """The objects (one per UID) in one calendar text."""
    if body_method(text) == "REPLY":
        from .fastreply import parse_reply

        quick = parse_reply(text)
        if quick is not None:
            return quick
    try:
        cal = Calendar.from_ical(text)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        raise ItipError(f"the calendar data cannot be read: {exc}") from exc
    method = (str(cal.get("METHOD", "")).strip().upper() or body_method(text)
              or (header_method or "").upper())
    by_uid: dict[str, ItipObject] = {}
    for ev in cal.walk("VEVENT"):
        try:
            comp = _component(ev)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ItipError(f"an event in the calendar data cannot be read: {exc}") from exc
        obj = by_uid.get(comp.uid)
        if obj is None:
            obj = by_uid[comp.uid] = ItipObject(method, comp.uid, [], set())
        if any(c.recurrence_id == comp.recurrence_id for c in obj.components):
            continue
        obj.components.append(comp)
        obj.organizers.update(o.email for o in comp.organizers if o.email)
    return list(by_uid.values())


def parse_parts(parts: Iterable[CalendarPart]) -> list[ItipObject]:
    """All objects of a message; a UID sent twice (two copies of the invite) counts once,
    and a copy without METHOD takes it from the other copy."""
    by_uid: dict[str, ItipObject] = {}
    for part in parts:
        for obj in parse_calendar(part.text, part.header_method):
            kept = by_uid.get(obj.uid)
            if kept is None:
                by_uid[obj.uid] = obj
            elif not kept.method and obj.method:
                kept.method = obj.method
    return list(by_uid.values())
