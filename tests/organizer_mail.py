"""Organizer invites shaped like Google Calendar, Outlook/Exchange and Apple Calendar send them.

Only the shapes matter (MIME layout, encodings, time zone spellings, vendor quirks); the
events are ours.
"""

from __future__ import annotations

import base64
import quopri
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

DOMAIN = "invites.example.com"

NY_VTIMEZONE = """BEGIN:VTIMEZONE
TZID:America/New_York
X-LIC-LOCATION:America/New_York
BEGIN:DAYLIGHT
TZOFFSETFROM:-0500
TZOFFSETTO:-0400
TZNAME:EDT
DTSTART:19700308T020000
RRULE:FREQ=YEARLY;BYMONTH=3;BYDAY=2SU
END:DAYLIGHT
BEGIN:STANDARD
TZOFFSETFROM:-0400
TZOFFSETTO:-0500
TZNAME:EST
DTSTART:19701101T020000
RRULE:FREQ=YEARLY;BYMONTH=11;BYDAY=1SU
END:STANDARD
END:VTIMEZONE"""

WIN_EASTERN_VTIMEZONE = """BEGIN:VTIMEZONE
TZID:Eastern Standard Time
BEGIN:STANDARD
DTSTART:16010101T020000
TZOFFSETFROM:-0400
TZOFFSETTO:-0500
RRULE:FREQ=YEARLY;INTERVAL=1;BYDAY=1SU;BYMONTH=11
END:STANDARD
BEGIN:DAYLIGHT
DTSTART:16010101T020000
TZOFFSETFROM:-0500
TZOFFSETTO:-0400
RRULE:FREQ=YEARLY;INTERVAL=1;BYDAY=2SU;BYMONTH=3
END:DAYLIGHT
END:VTIMEZONE"""

NY = ZoneInfo("America/New_York")


def _local(dt: datetime) -> str:
    return dt.astimezone(NY).strftime("%Y%m%dT%H%M%S")


def _utc(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def calendar_text(style: str, *, method: str, uid: str, sequence: int, dtstamp: datetime,
                  start: datetime, end: datetime, summary: str, organizer: str,
                  organizer_name: str, location: str = "", description: str = "",
                  rrule: str = "", recurrence_id: datetime | None = None,
                  status: str = "", extra_attendees: tuple[str, ...] = ()) -> str:
    tzid = "Eastern Standard Time" if style == "outlook" else "America/New_York"
    vtz = WIN_EASTERN_VTIMEZONE if style == "outlook" else NY_VTIMEZONE
    prodid = {"google": "-//Google Inc//Google Calendar 70.9054//EN",
              "outlook": "Microsoft Exchange Server 2010",
              "apple": "-//Apple Inc.//macOS 14.4//EN"}[style]
    create = f"create@{DOMAIN}"
    org_mailto = "MAILTO:" if style == "outlook" else "mailto:"
    lines = ["BEGIN:VCALENDAR", f"PRODID:{prodid}", "VERSION:2.0", "CALSCALE:GREGORIAN"]
    lines.append(f"METHOD:{method}")
    lines += vtz.splitlines()
    lines += ["BEGIN:VEVENT", f"DTSTART;TZID={tzid}:{_local(start)}",
              f"DTEND;TZID={tzid}:{_local(end)}", f"DTSTAMP:{_utc(dtstamp)}"]
    if rrule:
        lines.append(f"RRULE:{rrule}")
    if recurrence_id is not None:
        lines.append(f"RECURRENCE-ID;TZID={tzid}:{_local(recurrence_id)}")
    lines.append(f"ORGANIZER;CN={organizer_name}:{org_mailto}{organizer}")
    lines.append(f"UID:{uid}")
    if style == "google":
        lines.append("ATTENDEE;CUTYPE=INDIVIDUAL;ROLE=REQ-PARTICIPANT;PARTSTAT=ACCEPTED;RSVP=TRU"
                     f"E;CN={organizer_name};X-NUM-GUESTS=0:mailto:{organizer}")
    for guest in (create, *extra_attendees):
        lines.append(f"ATTENDEE;CUTYPE=INDIVIDUAL;ROLE=REQ-PARTICIPANT;PARTSTAT=NEEDS-ACTION;"
                     f"RSVP=TRUE;CN={guest}:{org_mailto}{guest}")
    if style == "outlook":
        lines += ["X-MICROSOFT-CDO-OWNERAPPTID:-1354799120", "CLASS:PUBLIC", "PRIORITY:5",
                  f"X-MICROSOFT-CDO-APPT-SEQUENCE:{sequence}",
                  "X-MICROSOFT-CDO-BUSYSTATUS:TENTATIVE", "X-MICROSOFT-CDO-IMPORTANCE:1"]
    desc = description.replace("\n", "\\n").replace(",", "\\,")
    lines += [f"CREATED:{_utc(dtstamp)}", f"DESCRIPTION:{desc}",
              f"LAST-MODIFIED:{_utc(dtstamp)}", f"LOCATION:{location.replace(',', chr(92) + ',')}",
              f"SEQUENCE:{sequence}",
              f"STATUS:{status or ('CANCELLED' if method == 'CANCEL' else 'CONFIRMED')}",
              f"SUMMARY:{summary}", "TRANSP:OPAQUE"]
    if style == "apple":
        lines += ["BEGIN:VALARM", "ACTION:DISPLAY", "TRIGGER:-PT15M", "DESCRIPTION:Reminder",
                  "END:VALARM"]
    lines += ["END:VEVENT", "END:VCALENDAR"]
    return "\r\n".join(_fold(line) for line in lines) + "\r\n"


def _fold(line: str) -> str:
    raw = line.encode()
    if len(raw) <= 75:
        return line
    out, cur = [], b""
    for ch in line:
        b = ch.encode()
        if len(cur) + len(b) > (75 if not out else 74):
            out.append(cur.decode())
            cur = b""
        cur += b
    out.append(cur.decode())
    return "\r\n ".join(out)


def _b64(data: str) -> str:
    return base64.encodebytes(data.encode()).decode().replace("\n", "\r\n")


def organizer_mail(style: str = "google", *, method: str = "REQUEST", uid: str,
                   sequence: int = 0, dtstamp: datetime | None = None, start: datetime,
                   end: datetime, summary: str, location: str = "", description: str = "",
                   organizer: str = "zach@team.example", organizer_name: str = "Zach Lowe",
                   from_addr: str | None = None, rrule: str = "",
                   recurrence_id: datetime | None = None,
                   extra_attendees: tuple[str, ...] = ()) -> bytes:
    """A complete organizer message to create@ in the given client's shape."""
    dtstamp = dtstamp or datetime.now(UTC)
    ical = calendar_text(style, method=method, uid=uid, sequence=sequence, dtstamp=dtstamp,
                         start=start, end=end, summary=summary, organizer=organizer,
                         organizer_name=organizer_name, location=location,
                         description=description, rrule=rrule, recurrence_id=recurrence_id,
                         extra_attendees=extra_attendees)
    sender = from_addr or organizer
    verb = "Invitation" if method == "REQUEST" else "Canceled event"
    subject = f"{verb}: {summary}"
    head = (f"From: {organizer_name} <{sender}>\r\nTo: create@{DOMAIN}\r\n"
            f"Subject: {subject}\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
            f"Message-ID: <{abs(hash((uid, sequence, method, style)))}@{sender.split('@')[1]}>\r\n"
            "MIME-Version: 1.0\r\n")
    text = f"{summary}\r\nWhen: {start.isoformat()}\r\n"
    if style == "google":
        return (head + 'Content-Type: multipart/mixed; boundary="MIXED"\r\n\r\n'
                "--MIXED\r\nContent-Type: multipart/alternative; boundary=\"ALT\"\r\n\r\n"
                "--ALT\r\nContent-Type: text/plain; charset=\"UTF-8\"; format=flowed; delsp=yes"
                f"\r\nContent-Transfer-Encoding: base64\r\n\r\n{_b64(text)}\r\n"
                "--ALT\r\nContent-Type: text/html; charset=\"UTF-8\"\r\n"
                "Content-Transfer-Encoding: quoted-printable\r\n\r\n<p>" + summary + "</p>\r\n"
                f"--ALT\r\nContent-Type: text/calendar; charset=\"UTF-8\"; method={method}\r\n"
                f"Content-Transfer-Encoding: 7bit\r\n\r\n{ical}\r\n--ALT--\r\n"
                f"--MIXED\r\nContent-Type: application/ics; name=\"invite.ics\"\r\n"
                "Content-Disposition: attachment; filename=\"invite.ics\"\r\n"
                f"Content-Transfer-Encoding: base64\r\n\r\n{_b64(ical)}\r\n--MIXED--\r\n"
                ).encode()
    if style == "outlook":
        lf_ical = ical.replace("\r\n", "\n")  # Exchange: LF-only inside base64
        return (head + 'Content-Type: multipart/alternative;\r\n\tboundary="_000_OUTLOOK_"\r\n'
                "\r\n--_000_OUTLOOK_\r\nContent-Type: text/plain; charset=\"iso-8859-1\"\r\n"
                "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                + quopri.encodestring(text.encode("latin-1", "replace")).decode()
                .replace("\r\n", "\n").replace("\n", "\r\n") + "\r\n"
                "--_000_OUTLOOK_\r\nContent-Type: text/html; charset=\"iso-8859-1\"\r\n"
                "Content-Transfer-Encoding: quoted-printable\r\n\r\n<html></html>\r\n"
                f"--_000_OUTLOOK_\r\nContent-Type: text/calendar; charset=\"utf-8\"; "
                f"method={method}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                f"{_b64(lf_ical)}\r\n--_000_OUTLOOK_--\r\n").encode()
    # Apple: the calendar is an attachment without method=, quoted-printable.
    qp = quopri.encodestring(ical.encode()).decode().replace("\r\n", "\n").replace(
        "\n", "\r\n")
    return (head + 'Content-Type: multipart/mixed; boundary="Apple-Mail=_1"\r\n\r\n'
            "--Apple-Mail=_1\r\nContent-Type: text/plain; charset=us-ascii\r\n"
            f"Content-Transfer-Encoding: 7bit\r\n\r\n{text}\r\n"
            "--Apple-Mail=_1\r\nContent-Disposition: attachment; filename=iCal-20261123.ics\r\n"
            "Content-Type: text/calendar; name=\"iCal-20261123.ics\"; charset=utf-8\r\n"
            f"Content-Transfer-Encoding: quoted-printable\r\n\r\n{qp}\r\n--Apple-Mail=_1--\r\n"
            ).encode()
