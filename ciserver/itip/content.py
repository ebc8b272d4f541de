"""An event's customer-visible content: the organizer's VEVENTs, cleaned (pure).

The store keeps content as iCalendar text holding only VEVENTs (master and overrides) with
IANA time zone names, no attendees and no vendor properties. Everything customers receive is
built from it; edits from the calendar or the API produce a new content text, and
:func:`visible_changes` says whether customers must hear about it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from dateutil.rrule import rrulestr
from icalendar import Calendar, Event

from .parse import (
    ItipObject,
    clean_vevent,
    normalize_time,
    occurrence_key,
    recurrence_key,
    to_utc,
)

CONTENT_UID = "content"  # placeholder UID inside stored content; the real one is set on output
# Series without an end: answers stay open this long past the first start.
OPEN_SERIES_WINDOW = timedelta(days=3650)
# At most this many occurrences are walked to find where a series ends. An RRULE is
# untrusted input: FREQ=MINUTELY;UNTIL=99991231T000000Z is billions of occurrences, and
# listing them all pinned the inbox worker's CPU, grew it past 2 GB and held the store's
# write lock until it was killed (then the same message froze the next worker). 5000
# covers a daily series over the whole OPEN_SERIES_WINDOW exactly and costs tens of ms.
MAX_OCCURRENCES_WALKED = 5000


@dataclass(frozen=True)
class Summary:
    """The columns the store keeps beside the content, for listings and reports."""

    summary: str
    location: str
    description: str
    start: datetime  # UTC instant of the first occurrence
    end: datetime
    tzid: str
    all_day: bool
    recurring: bool
    rsvp_until: datetime  # when the last occurrence ends


def _calendar(components: list[Event]) -> str:
    cal = Calendar()
    cal.add("PRODID", "-//ciserver//content//EN")
    cal.add("VERSION", "2.0")
    for comp in components:
        cal.add_component(comp)
    return str(cal.to_ical().decode())


def load(content: str) -> list[Event]:
    return list(Calendar.from_ical(content).walk("VEVENT"))


def _rid(ev: Event) -> str:
    prop = ev.get("RECURRENCE-ID")
    return occurrence_key(prop.dt) if prop is not None else ""


def from_object(obj: ItipObject) -> str:
    """Content for a new event from an organizer's REQUEST."""
    return _calendar([clean_vevent(c.vevent, CONTENT_UID) for c in obj.components])


def merge(content: str, obj: ItipObject) -> str:
    """Apply an organizer's update: a new master replaces everything it covers; an update that
    carries only overrides replaces just those occurrences."""
    incoming = [clean_vevent(c.vevent, CONTENT_UID) for c in obj.components]
    if obj.master is not None:
        return _calendar(incoming)
    by_rid = {_rid(ev): ev for ev in load(content)}
    for ev in incoming:
        by_rid[_rid(ev)] = ev
    return _calendar(list(by_rid.values()))


def cancel_occurrences(content: str, rids: list[str]) -> str:
    """Remove single occurrences: EXDATE on the master, their overrides dropped."""
    events = load(content)
    master = next((e for e in events if e.get("RECURRENCE-ID") is None), None)
    keep = [e for e in events if _rid(e) not in rids]
    if master is not None:
        start = master.get("DTSTART").dt
        excluded = set(_exdate_keys(master))
        exdates = []
        for rid in dict.fromkeys(rids):  # a repeated CANCEL must not add the EXDATE again
            if rid in excluded:
                continue
            when = _parse_key(rid)
            if isinstance(start, datetime) and isinstance(when, datetime):
                when = when.astimezone(start.tzinfo)  # keep EXDATE in the master's zone
            exdates.append(when)
        if exdates:
            master.add("EXDATE", exdates)
    return _calendar(keep)


def _exdate_keys(master: Event) -> list[str]:
    props = master.get("EXDATE")
    out: list[str] = []
    for prop in props if isinstance(props, list) else [props] if props is not None else []:
        out += [occurrence_key(item.dt) for item in getattr(prop, "dts", [])]
    return out


def parse_key(key: str) -> date:
    """The start of an occurrence from its key (see parse.occurrence_key)."""
    return _parse_key(key)


def _parse_key(key: str) -> date:
    if "T" in key:
        return datetime.strptime(key, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return date.fromisoformat(key)


def _fingerprint(ev: Event) -> dict[str, bytes]:
    return {name: ev[name].to_ical() if not isinstance(ev[name], list)
            else b"|".join(v.to_ical() for v in ev[name])
            for name in ev if name != "UID"}


def visible_changes(old: str, new: str) -> list[str]:
    """Names of the properties customers would see change (empty: nothing to send)."""
    before = {_rid(e): _fingerprint(e) for e in load(old)}
    after = {_rid(e): _fingerprint(e) for e in load(new)}
    changed: set[str] = set()
    for rid in set(before) | set(after):
        a, b = before.get(rid), after.get(rid)
        if a is None or b is None:
            changed.add("RECURRENCE-ID" if rid else "VEVENT")
            continue
        for name in set(a) | set(b):
            if a.get(name) != b.get(name):
                changed.add(name)
    return sorted(changed)


def _series_end(master: Event, start: date, duration: timedelta) -> datetime:
    """End of the last occurrence; far in the future for a series without an end.

    Walks at most MAX_OCCURRENCES_WALKED occurrences: a longer series is treated like one
    without an end (its UNTIL, when nearer, still closes it), never earlier than the last
    occurrence walked."""
    rule = master.get("RRULE")
    last = start
    if rule is not None:
        text = rule.to_ical().decode()
        if "COUNT=" not in text.upper() and "UNTIL=" not in text.upper():
            return to_utc(start) + OPEN_SERIES_WINDOW
        dtstart = start if isinstance(start, datetime) else datetime(
            start.year, start.month, start.day)
        walked: date | None = None
        try:
            # Lazily, never list(): dateutil only stops at COUNT/UNTIL.
            for n, occurrence in enumerate(rrulestr(text, dtstart=dtstart)):
                if n >= MAX_OCCURRENCES_WALKED:
                    return _beyond_walk(rule, start, walked or start, duration)
                walked = occurrence if isinstance(start, datetime) else occurrence.date()
        except (ValueError, TypeError):
            return to_utc(start) + OPEN_SERIES_WINDOW
        if walked is not None:
            last = max(last, walked)
    rdates = master.get("RDATE")
    for prop in rdates if isinstance(rdates, list) else [rdates] if rdates else []:
        for item in prop.dts:
            if isinstance(item.dt, date) and to_utc(item.dt) > to_utc(last):
                last = item.dt
    return to_utc(last) + duration


def _beyond_walk(rule: Any, start: date, walked: date, duration: timedelta) -> datetime:
    """End of a series with more occurrences than we walk: its true end is unknown (and may
    be absurd, e.g. year 9999), so answers stay open as for a series without an end, or
    until its UNTIL if that is sooner; never less than what was walked."""
    end = to_utc(start) + OPEN_SERIES_WINDOW
    until = rule.get("UNTIL") if hasattr(rule, "get") else None
    if until and isinstance(until[0], date):
        end = min(end, to_utc(normalize_time(until[0], None)) + duration)
    return max(end, to_utc(walked) + duration)


def is_occurrence(content: str, key: str) -> bool:
    """Whether ``key`` (occurrence_key form) names an occurrence of the stored series: one
    its RRULE or RDATE makes (not an EXDATE), or one it overrides. Lenient where the series
    cannot be walked: a rule beyond MAX_OCCURRENCES_WALKED before ``key``, or one dateutil
    cannot read, counts every key as an occurrence rather than lose a real answer."""
    events = load(content)
    master = next((e for e in events if e.get("RECURRENCE-ID") is None), None)
    if any(recurrence_key(e) == key for e in events if e.get("RECURRENCE-ID") is not None):
        return True
    if master is None or master.get("DTSTART") is None:
        return False
    start = normalize_time(master["DTSTART"].dt, _tzid(master.get("DTSTART")))
    excluded = {occurrence_key(normalize_time(d.dt, _tzid(p)))
                for p in _as_list(master.get("EXDATE")) for d in p.dts}
    if key in excluded:
        return False
    if occurrence_key(start) == key or key in {
            occurrence_key(normalize_time(d.dt, _tzid(p)))
            for p in _as_list(master.get("RDATE")) for d in p.dts}:
        return True
    rule = master.get("RRULE")
    if rule is None:
        return False
    if ("T" in key) != isinstance(start, datetime):
        return True  # a date for a timed series or the reverse: no way to compare, so keep
    try:
        dtstart = start if isinstance(start, datetime) else datetime(
            start.year, start.month, start.day)
        for n, when in enumerate(rrulestr(rule.to_ical().decode(), dtstart=dtstart)):
            found = occurrence_key(when if isinstance(start, datetime) else when.date())
            if found == key:
                return True
            if found > key and found[:4].isdigit():  # keys sort as times: walked past it
                return False
            if n >= MAX_OCCURRENCES_WALKED:
                return True
    except (ValueError, TypeError):
        return True
    return False


def _tzid(prop: Any) -> str | None:
    tzid = prop.params.get("TZID") if prop is not None and hasattr(prop, "params") else None
    return str(tzid) if tzid else None


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value] if value is not None else []


def summarize(content: str) -> Summary:
    events = load(content)
    if not events:
        raise ValueError("content has no VEVENT")
    master = next((e for e in events if e.get("RECURRENCE-ID") is None), events[0])
    start_prop = master.get("DTSTART")
    start: date = start_prop.dt if start_prop is not None else datetime(1970, 1, 1, tzinfo=UTC)
    start = normalize_time(start, None)
    end_prop = master.get("DTEND")
    if end_prop is not None:
        end = normalize_time(end_prop.dt, None)
    elif master.get("DURATION") is not None:
        end = start + master["DURATION"].dt
    else:
        end = start if isinstance(start, datetime) else start + timedelta(days=1)
    duration = to_utc(end) - to_utc(start)
    rsvp_until = _series_end(master, start, duration)
    for ev in events:  # an override may move an occurrence past the series' last one
        prop = ev.get("DTEND") or ev.get("DTSTART")
        if prop is not None and ev.get("RECURRENCE-ID") is not None:
            rsvp_until = max(rsvp_until, to_utc(normalize_time(prop.dt, None)))
    tzid = ""
    if isinstance(start, datetime) and start.tzinfo is not None:
        tzid = str(getattr(start.tzinfo, "key", "UTC"))
    return Summary(
        summary=str(master.get("SUMMARY", "")),
        location=str(master.get("LOCATION", "")),
        description=str(master.get("DESCRIPTION", "")),
        start=to_utc(start),
        end=to_utc(end),
        tzid=tzid,
        all_day=not isinstance(start, datetime),
        recurring=master.get("RRULE") is not None or master.get("RDATE") is not None,
        rsvp_until=rsvp_until,
    )


def edit(content: str, *, summary: str | None = None, location: str | None = None,
         description: str | None = None, start: datetime | None = None,
         end: datetime | None = None) -> str:
    """Content after an edit made through the API (the master only)."""
    events = load(content)
    master = next((e for e in events if e.get("RECURRENCE-ID") is None), events[0])
    for name, value in (("SUMMARY", summary), ("LOCATION", location),
                        ("DESCRIPTION", description)):
        if value is not None:
            master.pop(name, None)
            if value:
                master.add(name, value)
    if start is not None:
        old_start = master.get("DTSTART")
        old_end = master.get("DTEND")
        master.pop("DTSTART", None)
        master.add("DTSTART", start)
        if end is None and old_start is not None and old_end is not None:
            end = start + (to_utc(old_end.dt) - to_utc(old_start.dt))
    if end is not None:
        master.pop("DTEND", None)
        master.pop("DURATION", None)
        master.add("DTEND", end)
    return _calendar(events)


def new_content(*, summary: str, start: datetime, end: datetime, location: str = "",
                description: str = "") -> str:
    """Content of an event created through the API."""
    ev = Event()
    ev.add("UID", CONTENT_UID)
    ev.add("DTSTART", start)
    ev.add("DTEND", end)
    ev.add("SUMMARY", summary)
    if location:
        ev.add("LOCATION", location)
    if description:
        ev.add("DESCRIPTION", description)
    return _calendar([ev])
