"""The invite loop through the services, over real SMTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime, timedelta

import aiosmtplib
import httpx
import pytest
from icalendar import Calendar

from ciserver import relay, smtp
from ciserver.services import apikeys, inbox
from ciserver.services.context import Services
from ciserver.web.app import create_app

from .conftest import DOMAIN, ORGANIZER, Captured, Sink
from .fixtures import load_fixture
from .organizer_mail import organizer_mail

START = datetime(2026, 3, 4, 19, 0, tzinfo=UTC) + timedelta(hours=5)  # 19:00 New York


async def send(svc: Services, port: int, rcpt: str, raw: bytes,
               sender: str = "someone@example.org") -> str:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
    await client.connect()
    try:
        _, message = await client.sendmail(sender, [rcpt], raw)
        return message
    finally:
        await client.quit()


def rsvp_token(msg: Captured) -> str:
    cal = Calendar.from_ical(msg.calendar())
    organizer = str(cal.events[0]["ORGANIZER"])
    m = re.match(r"mailto:rsvp\+([a-z2-7]+)@" + re.escape(DOMAIN), organizer)
    assert m, organizer
    return m.group(1)


async def process(svc: Services) -> None:
    await inbox.drain(svc)
    await relay.Relay(svc).drain()


@pytest.fixture
async def listener(svc: Services):  # type: ignore[no-untyped-def]
    port = int(svc.config.smtp.listen.rsplit(":", 1)[1])
    server = await smtp.start(svc)
    yield port
    server.close()
    await server.wait_closed()


async def test_whole_story(svc: Services, sink: Sink, listener: int) -> None:
    port = listener
    # The fixtures' replies were written in February 2026; live then.
    svc.clock = lambda: datetime(2026, 2, 20, 15, 0, tzinfo=UTC)
    app = create_app(svc)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")

    # 1. The organizer's calendar invites create@ (Google's shape).
    uid = "nba-game-1@google.com"
    stamp = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)
    raw = organizer_mail("google", uid=uid, sequence=0, dtstamp=stamp, start=START,
                         end=START + timedelta(hours=3), summary="Knicks vs Celtics",
                         location="Madison Square Garden, New York")
    reply = await send(svc, port, f"create@{DOMAIN}", raw, ORGANIZER)
    assert reply.startswith("2.0.0 OK queued as")
    await process(svc)
    notice = sink.to(ORGANIZER)
    assert notice and "Event ready" in notice[0].message["Subject"]
    page_url = re.search(r"https://invites\.example\.com/e/[a-z2-7]+",
                         notice[0].text()).group(0)  # type: ignore[union-attr]
    event_id = page_url.rsplit("/", 1)[1]
    sink.clear()

    # 2. Three fans ask for the invite on the public API.
    fans = ["Fan.One@Example.com", "fan.two@gmail.com", "fan.three@example.net"]
    for fan in fans:
        r = await http.post(f"/api/v1/events/{event_id}/invites", json={"email": fan})
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "queued"
    again = await http.post(f"/api/v1/events/{event_id}/invites",
                            data={"email": "fan.two@gmail.com"})
    assert again.status_code == 202 and again.json()["status"] == "already_subscribed"
    await process(svc)
    invites = sink.wait(3)
    assert len(invites) == 3
    tokens = {}
    for msg in invites:
        rcpt = msg.rcpt_tos[0]
        cal = Calendar.from_ical(msg.calendar())
        assert str(cal["METHOD"]) == "REQUEST"
        ev = cal.events[0]
        assert str(ev["UID"]) == f"{event_id}@{DOMAIN}"
        assert int(ev["SEQUENCE"]) == 0
        attendees = ev.get("ATTENDEE")
        assert not isinstance(attendees, list)
        assert str(attendees).lower() == f"mailto:{rcpt.lower()}"
        assert attendees.params["RSVP"] == "TRUE"
        assert ev.start == START
        assert cal.timezones and cal.timezones[0].tz_name == "America/New_York"
        token = rsvp_token(msg)
        assert msg.mail_from == f"bounce+{token}@{DOMAIN}"
        assert msg.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        assert f"mailto:unsubscribe+{token}@{DOMAIN}" in msg.message["List-Unsubscribe"]
        ctype = next(p for p in msg.message.walk() if p.get_content_type() == "text/calendar")
        assert ctype.get_param("method") == "REQUEST"
        assert "Zach Lowe" in msg.message["From"]
        tokens[rcpt.lower()] = token
    sink.clear()

    # 3. They answer from Outlook, Google and Apple.
    for name, fan in (("outlook_reply_accept.eml", "fan.one@example.com"),
                      ("google_reply_tentative.eml", "fan.two@gmail.com"),
                      ("apple_reply_accept.eml", "fan.three@example.net")):
        t = tokens[fan]
        raw = load_fixture(name, token=t, uid=f"{event_id}@{DOMAIN}", sequence=0)
        await send(svc, port, f"rsvp+{t}@{DOMAIN}", raw, fan)
    await process(svc)
    _, key = await apikeys.create(svc, organizer=ORGANIZER)
    auth = {"Authorization": f"Bearer {key}"}
    r = await http.get(f"/api/v1/events/{event_id}/attendees", headers=auth)
    assert r.status_code == 200
    answers = {a["email"]: a["rsvp"] for a in r.json()}
    assert answers == {"fan.one@example.com": "Y", "fan.two@gmail.com": "M",
                       "fan.three@example.net": "Y"}

    # 4. The organizer moves the game: every fan gets SEQUENCE 1 with the new time.
    raw = organizer_mail("google", uid=uid, sequence=1, dtstamp=stamp + timedelta(days=1),
                         start=START + timedelta(hours=1), end=START + timedelta(hours=4),
                         summary="Knicks vs Celtics",
                         location="Madison Square Garden, New York",
                         description="25% off merch at booth 393")
    await send(svc, port, f"create@{DOMAIN}", raw, ORGANIZER)
    await process(svc)
    updates = [m for m in sink.messages if m.rcpt_tos[0].lower() != ORGANIZER]
    assert len(updates) == 3
    for msg in updates:
        ev = Calendar.from_ical(msg.calendar()).events[0]
        assert int(ev["SEQUENCE"]) == 1
        assert ev.start == START + timedelta(hours=1)
        assert "booth 393" in str(ev["DESCRIPTION"])
    sink.clear()

    # A stale copy of the first invite changes nothing.
    raw = organizer_mail("google", uid=uid, sequence=0, dtstamp=stamp, start=START,
                         end=START + timedelta(hours=3), summary="Knicks vs Celtics")
    await send(svc, port, f"create@{DOMAIN}", raw, ORGANIZER)
    await process(svc)
    assert [m for m in sink.messages if m.rcpt_tos[0].lower() != ORGANIZER] == []

    # 5. The CSV report.
    r = await http.get(f"/api/v1/events/{event_id}/report.csv", headers=auth)
    assert r.status_code == 200
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert {row["email"]: row["rsvp"] for row in rows} == answers
    assert all(row["event_uid"] == uid for row in rows)

    # 6. Cancel from the calendar: every fan gets a CANCEL with a higher SEQUENCE.
    raw = organizer_mail("google", method="CANCEL", uid=uid, sequence=2,
                         dtstamp=stamp + timedelta(days=2), start=START + timedelta(hours=1),
                         end=START + timedelta(hours=4), summary="Knicks vs Celtics")
    await send(svc, port, f"create@{DOMAIN}", raw, ORGANIZER)
    await process(svc)
    cancels = [m for m in sink.messages if m.rcpt_tos[0].lower() != ORGANIZER]
    assert len(cancels) == 3
    for msg in cancels:
        cal = Calendar.from_ical(msg.calendar())
        assert str(cal["METHOD"]) == "CANCEL"
        assert int(cal.events[0]["SEQUENCE"]) == 2
        assert str(cal.events[0]["STATUS"]) == "CANCELLED"
    await http.aclose()
