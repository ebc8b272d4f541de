"""Finding calendar data in a mail message, the way real clients send it (pure: no I/O).

Calendar parts are ``text/calendar``, ``application/ics`` (and the old ``text/x-vcalendar``)
and any part whose file name ends in ``.ics``, at any multipart depth, in any transfer
encoding and declared charset. Attached messages (``message/rfc822``) are somebody else's
mail and are not searched; a delivery report (``multipart/report``) is never an invite.
"""

from __future__ import annotations

import email
import email.message
import email.utils
import re
from dataclasses import dataclass, field
from datetime import datetime
from email.header import Header, decode_header, make_header
from html.parser import HTMLParser

CALENDAR_TYPES = {"text/calendar", "application/ics", "text/x-vcalendar", "application/x-ics"}
TNEF_TYPES = {"application/ms-tnef", "application/vnd.ms-tnef"}
_METHOD_RE = re.compile(rb"^METHOD:([A-Za-z-]+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class CalendarPart:
    text: str
    header_method: str | None  # the Content-Type method= parameter, upper-cased
    content_type: str


@dataclass
class Extraction:
    parts: list[CalendarPart] = field(default_factory=list)
    is_dsn: bool = False
    has_tnef: bool = False
    auto_reply: bool = False
    text_body: str = ""  # the first inline text/plain part, else the text of text/html
    html_text: str = ""
    subject: str = ""
    from_addr: str = ""
    from_name: str = ""
    message_id: str = ""
    date: datetime | None = None
    # Why calendar data may have been missed: broken multipart structure, a calendar part
    # that does not decode to iCalendar. Only worth telling when no calendar part was found.
    problems: list[str] = field(default_factory=list)


def parse_message(raw: bytes) -> email.message.Message:
    # compat32 is the forgiving parser: real mail has broken headers we still must read.
    return email.message_from_bytes(raw)


def header_text(msg: email.message.Message, name: str) -> str:
    value = msg.get(name)
    if value is None:
        return ""
    if isinstance(value, Header):
        # Raw 8-bit bytes in the header (SMTPUTF8 mail, or a careless client): the parser
        # kept them as surrogate escapes, and str() of its Header would print U+FFFD for
        # each byte. They are almost always UTF-8; else the Windows code page.
        raw = next((v for k, v in msg.raw_items() if k.lower() == name.lower()), "")
        data = raw.encode("ascii", "surrogateescape")
        for charset in ("utf-8", "cp1252"):
            try:
                return " ".join(data.decode(charset).split())
            except UnicodeDecodeError:
                continue
    try:
        return str(make_header(decode_header(str(value)))).strip()
    except (UnicodeDecodeError, LookupError, ValueError):
        return str(value).strip()


def _decode(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        payload = str(part.get_payload()).encode("utf-8", "replace")
    declared = part.get_content_charset()
    for charset in (declared, "utf-8", "cp1252"):
        if not charset:
            continue
        try:
            return payload.decode(charset)
        except (UnicodeDecodeError, LookupError):
            continue
    return payload.decode("latin-1")


def _filename(part: email.message.Message) -> str:
    # Most parts have no file name; parsing both headers' parameters to find that out was a
    # fifth of extract()'s time (bench/inbound).
    raw = f"{part.get('Content-Disposition', '')} {part.get('Content-Type', '')}".lower()
    if "name" not in raw:
        return ""
    try:
        name = part.get_filename() or part.get_param("name") or ""
    except (TypeError, ValueError):
        return ""
    if isinstance(name, tuple):
        name = email.utils.collapse_rfc2231_value(name)
    return str(name).strip().lower()


def _is_auto_reply(msg: email.message.Message) -> bool:
    auto = (msg.get("Auto-Submitted") or "").strip().lower()
    if auto and auto != "no":
        return True
    if (msg.get("X-Autoreply") or msg.get("X-Autorespond")) is not None:
        return True
    precedence = (msg.get("Precedence") or "").strip().lower()
    return precedence in ("auto_reply", "junk", "bulk")


def _walk(part: email.message.Message, out: Extraction) -> None:
    ctype = part.get_content_type()
    if ctype == "multipart/report" or ctype == "message/delivery-status":
        out.is_dsn = True
        return
    if ctype.startswith("multipart/") and not part.is_multipart():
        defects = {type(d).__name__ for d in part.defects}
        why = ("declares no boundary" if "NoBoundaryInMultipartDefect" in defects
               else "never uses its boundary" if "StartBoundaryNotFoundDefect" in defects
               else "cannot be split into parts")
        out.problems.append(f"the MIME structure is broken: a {ctype} part {why}, so its "
                            "contents cannot be read")
        return
    if part.is_multipart():
        if ctype.startswith("message/"):
            return  # an attached message is not ours to interpret
        for sub in part.get_payload():
            if isinstance(sub, email.message.Message):
                _walk(sub, out)
        return
    name = _filename(part)
    if ctype in TNEF_TYPES or name == "winmail.dat":
        out.has_tnef = True
        return
    if ctype in CALENDAR_TYPES or name.endswith((".ics", ".ical", ".ifb")):
        text = _decode(part)
        upper = text.upper()
        if "BEGIN:VCALENDAR" not in upper and "BEGIN:VEVENT" not in upper:
            cte = str(part.get("Content-Transfer-Encoding", "7bit")).strip().lower()
            out.problems.append(f"a {ctype} part ({cte}) does not decode to iCalendar data "
                                "(no BEGIN:VCALENDAR nor BEGIN:VEVENT)")
            return
        method = part.get_param("method")
        header_method = str(method).strip().upper() if isinstance(method, str) else None
        if all(p.text != text for p in out.parts):  # Google and Thunderbird send two copies
            out.parts.append(CalendarPart(text, header_method or None, ctype))
        return
    disposition = str(part.get("Content-Disposition", "")).lower()
    if disposition.startswith("attachment"):
        return
    if ctype == "text/plain" and not out.text_body:
        out.text_body = _decode(part)
    elif ctype == "text/html" and not out.html_text:
        out.html_text = html_to_text(_decode(part))


class _TextOf(HTMLParser):
    """The readable text of an HTML body: scripts and styles dropped, blocks on new lines."""

    BLOCKS = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "blockquote"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style", "head", "title"):
            self.skip += 1
        elif tag in self.BLOCKS:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style", "head", "title"):
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCKS:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self.skip:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextOf()
    try:
        parser.feed(markup)
        parser.close()
    except (AssertionError, ValueError):  # hopeless markup: keep what was read
        pass
    lines = (" ".join(line.split()) for line in "".join(parser.out).splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def extract(raw: bytes) -> Extraction:
    """Calendar parts and the few headers the engine needs, from a raw message."""
    msg = parse_message(raw)
    out = Extraction()
    out.subject = header_text(msg, "Subject")
    name, addr = email.utils.parseaddr(header_text(msg, "From"))
    out.from_addr, out.from_name = addr.strip().lower(), name
    out.message_id = (msg.get("Message-ID") or "").strip()
    date_header = msg.get("Date")
    if date_header:
        try:
            out.date = email.utils.parsedate_to_datetime(str(date_header))
        except (TypeError, ValueError, IndexError):
            out.date = None
    out.auto_reply = _is_auto_reply(msg)
    _walk(msg, out)
    if not out.text_body:
        out.text_body = out.html_text
    if out.is_dsn:
        out.parts = []  # a bounce that quotes our invite must never become one
    return out


def body_method(text: str) -> str | None:
    """METHOD from the calendar body, without parsing all of it."""
    m = _METHOD_RE.search(text.replace("\r\n", "\n").encode("utf-8", "replace"))
    return m.group(1).decode().upper() if m else None
