"""The personal invite each customer receives (pure: the clock and ids are passed in).

What Outlook, Gmail and Apple need to show an invite with RSVP buttons and to apply later
updates: the customer as the only ATTENDEE (RSVP=TRUE), ORGANIZER = their rsvp+TOKEN address
with the organizer's name, a server-owned UID and SEQUENCE, a VTIMEZONE for every TZID, the
same METHOD in the body and in the Content-Type, and the message layout
multipart/mixed { multipart/alternative { text/plain, text/html, text/calendar }, invite.ics }.
"""

from __future__ import annotations

import binascii
import html
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from email.header import Header
from email.utils import format_datetime, formataddr
from functools import lru_cache

from icalendar import Calendar, Event, Timezone, vCalAddress, vText
from icalendar.parser import Parameters

from . import content as content_mod
from .parse import recurrence_key

# Lone surrogates too: not text (a JSON "\ud800" decodes to one) and no UTF-8 for them.
_CONTROL_RUN = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]+")


def header_safe(text: str, limit: int = 200) -> str:
    """Organizer text going into a mail header: no control characters (no header injection).
    Each run of them (CR, LF, tab, NUL, DEL, C1…) counts as one space, so words stay apart
    ("Game\\r\\nBcc: x" gives "Game Bcc: x"); then white space is collapsed and trimmed."""
    if text.isprintable() and "  " not in text and text == text.strip():
        return text[:limit]  # the common case, without the regex and the split
    return " ".join(_CONTROL_RUN.sub(" ", text).split())[:limit]


@dataclass(frozen=True)
class OutboundEvent:
    uid: str
    sequence: int
    cancelled: bool
    content: str
    organizer_name: str
    organizer_email: str
    page_url: str


@dataclass(frozen=True)
class OutboundRecipient:
    email: str
    name: str
    partstat: str
    rsvp_address: str
    unsubscribe_address: str
    unsubscribe_url: str
    # occurrence key -> the answer for that one occurrence: its override VEVENT carries it
    # (else the whole-event partstat), so a calendar never shows a declined game as accepted
    occurrences: Mapping[str, str] = field(default_factory=dict)


@lru_cache(maxsize=256)
def _vtimezone(tzid: str, first_year: int, last_year: int) -> bytes:
    import zoneinfo

    tz = Timezone.from_tzinfo(zoneinfo.ZoneInfo(tzid), tzid,
                              first_date=date(first_year, 1, 1), last_date=date(last_year, 1, 1))
    return bytes(tz.to_ical())


def _tzids(ev: Event) -> set[str]:
    out = set()
    for name in ("DTSTART", "DTEND", "RECURRENCE-ID", "EXDATE", "RDATE"):
        props = ev.get(name)
        for prop in props if isinstance(props, list) else [props] if props is not None else []:
            values = [d.dt for d in prop.dts] if hasattr(prop, "dts") else [prop.dt]
            for v in values:
                key = getattr(getattr(v, "tzinfo", None), "key", None)
                if key and key != "UTC":
                    out.add(key)
    return out


def fold(line: str) -> str:
    """Fold a content line at 75 octets without splitting a UTF-8 character (RFC 5545 3.1)."""
    raw = line.encode()
    if len(raw) <= 75:
        return line
    out: list[str] = []
    cur: list[str] = []
    size, limit = 0, 75
    for ch in line:
        n = len(ch.encode())
        if size + n > limit:
            out.append("".join(cur))
            cur, size, limit = [], 0, 74  # continuation lines start with a space
        cur.append(ch)
        size += n
    out.append("".join(cur))
    return "\r\n ".join(out)


def _address_header(name: str, address: str) -> str:
    """A From/To value; a non-ASCII name is RFC 2047 encoded, specials are quoted."""
    return formataddr((header_safe(name), address), charset="utf-8")


_CTE_QP = "Content-Transfer-Encoding: quoted-printable"


def _qp(text: str) -> str:
    return binascii.b2a_qp(text.encode(), istext=True).decode("ascii")


def _b64(text: str) -> str:
    data = text.encode()
    return "".join(binascii.b2a_base64(data[i:i + 57]).decode("ascii")
                   for i in range(0, len(data), 57))


class InviteTemplate:
    """Everything of one event version's invite that is the same for every customer.

    Fan-out sends one version to many customers; building each message from scratch with
    icalendar and the email package cost milliseconds (bench/fanout). The template renders the
    shared parts once; :meth:`render` adds the personal ones (recipient, tokens, DTSTAMP,
    Message-ID) with string operations and C-speed encoders. tests/test_build.py parses the
    result with the email package and icalendar and checks every part.
    """

    def __init__(self, event: OutboundEvent, domain: str, now: datetime) -> None:
        self.event = event
        self.method = "CANCEL" if event.cancelled else "REQUEST"
        self._part_keys: list[str] = []  # the occurrence key of each VEVENT, in order
        self._calendar_parts = self._calendar(now).split(_PERSONAL)
        subject, self._text, self._html = self._bodies(domain)
        self._subject = (Header(subject, "utf-8", header_name="Subject").encode(linesep="\n")
                         if not subject.isascii() else subject)
        self._from_name = header_safe(event.organizer_name or event.organizer_email)
        org = Parameters({"CN": self._from_name or event.organizer_email})
        self._organizer_params = org.to_ical(sorted=True).decode()
        self._boundary = f"=_cis_{secrets.token_hex(12)}"

    # -- shared parts ---------------------------------------------------------------------
    def _calendar(self, now: datetime) -> str:
        event = self.event
        cal = Calendar()
        cal.add("PRODID", "-//ciserver//calendar invite server//EN")
        cal.add("VERSION", "2.0")
        cal.add("CALSCALE", "GREGORIAN")
        cal.add("METHOD", self.method)
        tzids: set[str] = set()
        years = [now.year]
        for src in content_mod.load(event.content):
            ev = Event()
            ev.add("X-CIS-PERSONAL", "1")  # replaced by DTSTAMP, ORGANIZER, ATTENDEE
            self._part_keys.append(recurrence_key(src))
            ev.add("UID", event.uid)
            ev.add("SEQUENCE", event.sequence)
            for name, value in src.property_items(recursive=False):
                if name in ("BEGIN", "END", "UID", "STATUS"):
                    continue
                ev.add(name, value, encode=False)
            ev.add("STATUS", "CANCELLED" if event.cancelled else
                   str(src.get("STATUS", "CONFIRMED")).upper())
            cal.add_component(ev)
            tzids |= _tzids(src)
            start = src.get("DTSTART")
            if start is not None:
                years.append(start.dt.year)
        text: bytes = cal.to_ical()
        if tzids:
            first, last = min(years) - 1, max(years) + 2
            blocks = b"".join(_vtimezone(t, first, last) for t in sorted(tzids))
            # VTIMEZONEs go before the events that use them (RFC 5545 §3.6.5 convention).
            head, sep, rest = text.partition(b"BEGIN:VEVENT")
            text = head + blocks + sep + rest
        return text.decode()

    def _bodies(self, domain: str) -> tuple[str, tuple[str, str], tuple[str, str]]:
        """Subject, and the text and HTML bodies split around the unsubscribe URL."""
        event = self.event
        s = content_mod.summarize(event.content)
        title = s.summary or "(no title)"
        who = header_safe(event.organizer_name or event.organizer_email)
        when = _when(event)
        if event.cancelled:
            subject = f"Cancelled: {title}"
            lead = f"{who} has cancelled this event. Your calendar will remove it."
        else:
            subject = f"Invitation: {title} — {when}" if event.sequence == 0 else \
                f"Updated invitation: {title} — {when}"
            lead = (f"{who} invites you to this event. Answering Yes or Maybe puts it on your "
                    "calendar; the organizer will see your answer, and any later change or "
                    "cancellation will reach your calendar by itself.")
        sender_line = (f"This invitation is sent by the calendar invite server at {domain} on "
                       f"behalf of {who} <{event.organizer_email}>, because you (or someone "
                       "with your address) asked for it.")
        lines = [lead, "", f"What:  {title}", f"When:  {when}"]
        if s.location:
            lines.append(f"Where: {s.location}")
        if s.description:
            lines += ["", s.description]
        lines += ["", f"Event page: {event.page_url}", "", sender_line,
                  "Stop receiving mail about this event: "]
        text = ("\n".join(lines), "\n")
        e = html.escape
        rows = [("What", title), ("When", when)] + ([("Where", s.location)] if s.location
                                                    else [])
        table = "".join(f"<tr><th align=\"left\">{e(k)}</th><td>{e(v)}</td></tr>"
                        for k, v in rows)
        desc = f"<p>{e(s.description).replace(chr(10), '<br>')}</p>" if s.description else ""
        page = (
            "<!doctype html><html><body style=\"font-family:sans-serif\">"
            f"<p>{e(lead)}</p><table>{table}</table>{desc}"
            f"<p><a href=\"{e(event.page_url)}\">Event page</a></p>"
            f"<p style=\"color:#555;font-size:small\">{e(sender_line)} <a href=\"")
        tail = "\">Stop receiving mail about this event</a>.</p></body></html>"
        return header_safe(subject, 250), text, (page, tail)

    # -- personal parts -------------------------------------------------------------------
    def calendar(self, to: OutboundRecipient, now: datetime) -> str:
        def personal(partstat: str) -> str:
            params = {"PARTSTAT": partstat or "NEEDS-ACTION", "ROLE": "REQ-PARTICIPANT"}
            if to.name:
                params["CN"] = header_safe(to.name)
            if not self.event.cancelled:
                params["RSVP"] = "TRUE"
            return "\r\n".join((
                f"DTSTAMP:{now.astimezone(UTC):%Y%m%dT%H%M%SZ}",
                fold(f"ORGANIZER;{self._organizer_params}:mailto:{to.rsvp_address}"),
                fold(f"ATTENDEE;{Parameters(params).to_ical(sorted=True).decode()}"
                     f":mailto:{to.email}")))

        parts = self._calendar_parts
        if not to.occurrences:  # the common case: one block for every VEVENT
            return personal(to.partstat).join(parts)
        out = [parts[0]]
        for key, part in zip(self._part_keys, parts[1:], strict=True):
            out += [personal(to.occurrences.get(key, to.partstat) if key else to.partstat),
                    part]
        return "".join(out)

    def render(self, to: OutboundRecipient, *, now: datetime, message_id: str) -> bytes:
        """The whole personal message, CRLF line ends, ready to send (and sign)."""
        ical = self.calendar(to, now)
        url = html.escape(to.unsubscribe_url)
        text = self._text[0] + to.unsubscribe_url + self._text[1]
        page = self._html[0] + url + self._html[1]
        b, alt = self._boundary, self._boundary + "_alt"
        cal_b64 = _b64(ical)
        head = [
            f"From: {_address_header(self._from_name, to.rsvp_address)}",
            f"To: {_address_header(to.name, to.email)}",
            f"Subject: {self._subject}",
            f"Date: {format_datetime(now)}",
            f"Message-ID: {message_id}",
            f"List-Unsubscribe: <mailto:{to.unsubscribe_address}>, <{to.unsubscribe_url}>",
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
            "MIME-Version: 1.0",
            f'Content-Type: multipart/mixed; boundary="{b}"',
        ]
        body = [
            "", f"--{b}", f'Content-Type: multipart/alternative; boundary="{alt}"', "",
            f"--{alt}", 'Content-Type: text/plain; charset="utf-8"', _CTE_QP, "", _qp(text),
            f"--{alt}", 'Content-Type: text/html; charset="utf-8"', _CTE_QP, "", _qp(page),
            f"--{alt}",
            f'Content-Type: text/calendar; charset="utf-8"; method={self.method}',
            "Content-Transfer-Encoding: base64", "", cal_b64,
            f"--{alt}--", "", f"--{b}",
            'Content-Type: application/ics; name="invite.ics"',
            'Content-Disposition: attachment; filename="invite.ics"',
            "Content-Transfer-Encoding: base64", "", cal_b64,
            f"--{b}--", "",
        ]
        folded = [_fold_header(h) for h in head]
        msg = "\n".join(folded + body)
        return msg.replace("\r\n", "\n").replace("\n", "\r\n").encode("ascii")


_PERSONAL = "X-CIS-PERSONAL:1"


def _fold_header(line: str) -> str:
    """Fold a long header at spaces (RFC 5322 2.2.3); our values have spaces to fold at."""
    if len(line) <= 78 or "\n" in line:  # short, or already folded (RFC 2047 encoder)
        return line
    out, cur = [], ""
    for word in line.split(" "):
        if cur and len(cur) + 1 + len(word) > 76:
            out.append(cur)
            cur = word
        else:
            cur = f"{cur} {word}" if cur else word
    out.append(cur)
    return "\n ".join(out)


def render_calendar(event: OutboundEvent, to: OutboundRecipient, now: datetime) -> str:
    """The iCalendar text (METHOD REQUEST, or CANCEL for a cancelled event)."""
    return InviteTemplate(event, "", now).calendar(to, now)


def _when(event: OutboundEvent) -> str:
    summary = content_mod.summarize(event.content)
    events = content_mod.load(event.content)
    master = next((e for e in events if e.get("RECURRENCE-ID") is None), events[0])
    start = master.get("DTSTART").dt if master.get("DTSTART") is not None else summary.start
    if not isinstance(start, datetime):
        text = f"{start:%A %d %B %Y} (all day)"
    else:
        tz = getattr(start.tzinfo, "key", "UTC")
        text = f"{start:%A %d %B %Y, %H:%M} ({tz})"
    if summary.recurring:
        text += ", repeating"
    return text


def render_invite(event: OutboundEvent, to: OutboundRecipient, *, now: datetime,
                  message_id: str, domain: str) -> bytes:
    """The whole personal message, ready to send (one-off; fan-out reuses a template)."""
    return InviteTemplate(event, domain, now).render(to, now=now, message_id=message_id)


def render_reply(*, uid: str, sequence: int, organizer: str, attendee: str, partstat: str,
                 now: datetime, summary: str = "", recurrence_id: str = "") -> str:
    """An iTIP REPLY from one of our addresses to an organizer's calendar (RFC 5546 §3.2.3):
    create@ accepting the organizer's invitation, so their calendar shows it as accepted."""
    cal = Calendar()
    cal.add("PRODID", "-//ciserver//calendar invite server//EN")
    cal.add("VERSION", "2.0")
    cal.add("METHOD", "REPLY")
    ev = Event()
    ev.add("UID", uid)
    ev.add("DTSTAMP", now)
    ev.add("SEQUENCE", sequence)
    if recurrence_id:
        ev.add("RECURRENCE-ID", content_mod.parse_key(recurrence_id))
    org = vCalAddress(f"mailto:{organizer}")
    ev.add("ORGANIZER", org, encode=False)
    att = vCalAddress(f"mailto:{attendee}")
    att.params["PARTSTAT"] = vText(partstat)
    ev.add("ATTENDEE", att, encode=False)
    if summary:
        ev.add("SUMMARY", header_safe(summary, 500))
    cal.add_component(ev)
    return str(cal.to_ical().decode())


def render_declinecounter(event: OutboundEvent, to: OutboundRecipient, now: datetime,
                          recurrence_id: str = "") -> str:
    """DECLINECOUNTER (RFC 5546 §3.2.8): the organizer keeps the current time."""
    cal = Calendar()
    cal.add("PRODID", "-//ciserver//calendar invite server//EN")
    cal.add("VERSION", "2.0")
    cal.add("METHOD", "DECLINECOUNTER")
    ev = Event()
    ev.add("UID", event.uid)
    ev.add("DTSTAMP", now)
    ev.add("SEQUENCE", event.sequence)
    if recurrence_id:
        ev.add("RECURRENCE-ID", content_mod.parse_key(recurrence_id))
    org = vCalAddress(f"mailto:{to.rsvp_address}")
    org.params["CN"] = vText(header_safe(event.organizer_name) or event.organizer_email)
    ev.add("ORGANIZER", org, encode=False)
    ev.add("ATTENDEE", vCalAddress(f"mailto:{to.email}"), encode=False)
    ev.add("COMMENT", "The organizer keeps the current time.")
    cal.add_component(ev)
    return str(cal.to_ical().decode())
