"""Mail from the server to organizers: confirmations, refusals, forwarded replies, reports.

Notices go out with the null reverse-path (``<>``) and an ``Auto-Submitted`` header so they
can never start a mail loop, and only to addresses the organizer policy allows (no
backscatter to forged senders). RFC 3834 tells the two kinds apart: ``auto-replied`` for
a notice that answers an incoming message (a confirmation or refusal of an organizer's
invite, a customer's message or COUNTER handed to the organizer, a DECLINECOUNTER to the
customer), ``auto-generated`` for the rest (reports, digests, sign-in links).
"""

from __future__ import annotations

from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime
from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from ..itip.build import header_safe
from . import outbox
from .context import Services

AutoSubmitted = Literal["auto-replied", "auto-generated"]


def auto_submitted_for(*, in_reply_to: str = "", reply_to: str | None = None,
                       sender: str = "") -> AutoSubmitted:
    """What a notice is, when its caller does not say: an answer to an incoming message
    names that message (``in_reply_to``), hands the organizer a customer's message to answer
    (``reply_to`` the customer) or answers a customer as their rsvp+ address (``sender``);
    anything else (reports, digests, sign-in links) is generated on its own."""
    return "auto-replied" if (in_reply_to or reply_to or sender) else "auto-generated"


def compose(svc: Services, *, to: str, subject: str, text: str,
            reply_to: str | None = None, attachment: tuple[str, bytes, str] | None = None,
            in_reply_to: str = "", calendar: tuple[str, str] | None = None,
            sender: str = "", auto_submitted: AutoSubmitted | None = None) -> bytes:
    """A plain notice; ``calendar`` = (iCalendar text, METHOD) adds an iTIP part after the
    text, ``sender`` replaces create@ in From (an rsvp+ address for iTIP to customers).
    ``auto_submitted`` defaults to :func:`auto_submitted_for` the other arguments."""
    if auto_submitted is None:
        auto_submitted = auto_submitted_for(in_reply_to=in_reply_to, reply_to=reply_to,
                                            sender=sender)
    elif auto_submitted not in ("auto-replied", "auto-generated"):
        raise ValueError(f"Auto-Submitted: {auto_submitted!r} is not auto-replied or "
                         "auto-generated")
    msg = EmailMessage(policy=SMTP)
    if sender:
        sl, _, sd = sender.rpartition("@")
        msg["From"] = Address("Calendar invite server", sl, sd)
    else:
        msg["From"] = Address("Calendar invite server", svc.book.create_local,
                              svc.book.domain)
    local, _, dom = to.rpartition("@")
    msg["To"] = Address("", local, dom)
    msg["Subject"] = header_safe(subject, 250)
    msg["Date"] = format_datetime(svc.now())
    msg["Message-ID"] = outbox.new_message_id(svc)
    msg["Auto-Submitted"] = auto_submitted
    if reply_to:
        rl, _, rd = reply_to.rpartition("@")
        msg["Reply-To"] = Address("", rl, rd)
    if in_reply_to.startswith("<") and "\n" not in in_reply_to:
        msg["In-Reply-To"] = in_reply_to
        msg["References"] = in_reply_to
    msg.set_content(text)
    if calendar is not None:
        ical, method = calendar
        part = EmailMessage(policy=SMTP)
        part.set_content(ical, subtype="calendar", cte="base64")
        part.set_param("method", method)
        msg.make_mixed()
        msg.attach(part)
    if attachment is not None:
        filename, data, ctype = attachment
        maintype, _, subtype = ctype.partition("/")
        msg.add_attachment(data, maintype=maintype, subtype=subtype, filename=filename)
    return msg.as_bytes()


async def send(svc: Services, session: AsyncSession, *, to: str, subject: str, text: str,
               reply_to: str | None = None, attachment: tuple[str, bytes, str] | None = None,
               in_reply_to: str = "", calendar: tuple[str, str] | None = None,
               sender: str = "", envelope_from: str = "",
               auto_submitted: AutoSubmitted | None = None) -> None:
    raw = compose(svc, to=to, subject=subject, text=text, reply_to=reply_to,
                  attachment=attachment, in_reply_to=in_reply_to, calendar=calendar,
                  sender=sender, auto_submitted=auto_submitted)
    await outbox.enqueue_message(svc, session, envelope_from, to, raw)
