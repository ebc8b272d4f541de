"""`ciserver demo`: a newcomer's first minute.

Starts the daemon on loopback with a built-in smarthost that keeps what it is given, then plays
the story of DESIGN.md through the real interfaces (SMTP in, HTTP in, SMTP out): an organizer
invites create@, three fans ask for the invite, answer from their calendars, the organizer adds
a merch offer to one game and cancels another; each step is printed, then the report. The
daemon keeps running with the page URL to open in a browser.
"""

from __future__ import annotations

import asyncio
import email
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
from aiosmtpd.smtp import SMTP, Envelope, Session

from . import config as config_mod
from .daemon import serve
from .services import apikeys, pages, reports
from .services.context import Services

DOMAIN = "invites.demo.localhost"
ORGANIZER = "zach@team.example"
FANS = [("ana@fans.example", "Ana", "ACCEPTED"), ("ben@fans.example", "Ben", "TENTATIVE"),
        ("cleo@fans.example", "Cleo", "DECLINED")]
ANSWER = {"ACCEPTED": "Yes", "TENTATIVE": "Maybe", "DECLINED": "No"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Outbox:
    """The demo's smarthost: what ciserver sends, kept instead of delivered."""

    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages.append((envelope.mail_from or "", list(envelope.rcpt_tos),
                              envelope.original_content or b""))
        return "250 2.0.0 kept by the demo smarthost"

    def to(self, rcpt: str) -> list[email.message.Message]:
        return [email.message_from_bytes(raw) for _, rcpts, raw in self.messages
                if rcpt in rcpts]


def _ical(method: str, uid: str, seq: int, summary: str, start: datetime,
          description: str = "", attendee: str = "create@" + DOMAIN,
          organizer: str = ORGANIZER, partstat: str = "NEEDS-ACTION") -> str:
    lines = ["BEGIN:VCALENDAR", "PRODID:-//ciserver demo//EN", "VERSION:2.0",
             f"METHOD:{method}", "BEGIN:VEVENT", f"UID:{uid}", f"SEQUENCE:{seq}",
             f"DTSTAMP:{datetime.now(UTC):%Y%m%dT%H%M%SZ}",
             f"DTSTART;TZID=America/New_York:{start:%Y%m%dT%H%M%S}",
             f"DTEND;TZID=America/New_York:{start + timedelta(hours=3):%Y%m%dT%H%M%S}",
             f"SUMMARY:{summary}", "LOCATION:Madison Square Garden\\, New York",
             f"ORGANIZER;CN=Zach Lowe:mailto:{organizer}",
             f"ATTENDEE;PARTSTAT={partstat};RSVP=TRUE:mailto:{attendee}"]
    if description:
        lines.append(f"DESCRIPTION:{description}")
    if method == "CANCEL":
        lines.append("STATUS:CANCELLED")
    lines += ["END:VEVENT", "END:VCALENDAR"]
    return "\r\n".join(lines) + "\r\n"


def _mail(sender: str, to: str, subject: str, ical: str, method: str) -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.format_datetime(datetime.now(UTC))}\r\n"
            f"Message-ID: <{time.time_ns()}@demo>\r\nMIME-Version: 1.0\r\n"
            f"Content-Type: text/calendar; charset=utf-8; method={method}\r\n\r\n"
            + ical).encode()


async def _wait(predicate: Callable[[], Any], what: str, seconds: float = 30) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the demo waited too long for {what}")


def demo_config(state_dir: Path, web_port: int, smtp_port: int, relay_port: int,
                environ: dict[str, str] | None = None) -> config_mod.Config:
    env = dict(environ or {})
    env.update({
        "CISERVER_SERVER__DOMAIN": DOMAIN,
        "CISERVER_SERVER__STATE_DIR": str(state_dir),
        "CISERVER_SERVER__INBOX_PROCESSES": "0",
        "CISERVER_DATABASE__URL": f"sqlite+aiosqlite:///{state_dir / 'demo.db'}",
        "CISERVER_SMTP__LISTEN": f"127.0.0.1:{smtp_port}",
        "CISERVER_WEB__LISTEN": f"127.0.0.1:{web_port}",
        "CISERVER_RELAY__SMARTHOST": f"127.0.0.1:{relay_port}",
        "CISERVER_RELAY__TLS": "none",
        "CISERVER_ORGANIZERS__ALLOW": f'["{ORGANIZER}"]',
    })
    return config_mod.load(None, env)


def _fresh(state_dir: Path) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    for leftover in state_dir.glob("demo.db*"):
        leftover.unlink()  # every demo starts from an empty database


async def run(state_dir: Path, web_port: int = 8080, say: Callable[[str], None] = print,
              keep_running: bool = True) -> int:
    _fresh(state_dir)
    kept = Outbox()
    loop = asyncio.get_running_loop()
    relay_port, smtp_port = free_port(), free_port()
    smarthost = await loop.create_server(lambda: SMTP(kept, hostname="smarthost.demo"),
                                         "127.0.0.1", relay_port)
    cfg = demo_config(state_dir, web_port, smtp_port, relay_port)
    stop = asyncio.Event()
    ready: asyncio.Future[Services] = loop.create_future()

    async def on_ready(svc: Services) -> None:
        ready.set_result(svc)

    daemon = asyncio.create_task(serve(cfg, on_ready=on_ready, stop=stop))
    pending: set[asyncio.Future[Any]] = {daemon, ready}
    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
    if daemon.done():
        smarthost.close()
        say("ciserver could not start (see the log above)")
        return daemon.result() or 1
    svc = ready.result()
    try:
        await _story(svc, cfg, kept, smtp_port, say)
    except Exception as exc:
        say(f"\nThe demo stopped: {exc}")
        stop.set()
        await daemon
        smarthost.close()
        return 1
    if keep_running:
        say(f"\nciserver keeps running. Open the season page {cfg.base_url}/p/"
            f"{_PAGES.get(id(svc), '')} or the game's page {cfg.base_url}/e/{_first_id(svc)} "
            f"in a browser (the API is at {cfg.base_url}/api/docs); Ctrl-C stops it.")
        await daemon
    else:
        stop.set()
        await daemon
    smarthost.close()
    return 0


_IDS: dict[int, str] = {}
_PAGES: dict[int, str] = {}


def _first_id(svc: Services) -> str:
    return _IDS.get(id(svc), "")


async def _story(svc: Services, cfg: config_mod.Config, kept: Outbox, smtp_port: int,
                 say: Callable[[str], None]) -> None:
    base = cfg.base_url
    start = (datetime.now(UTC) + timedelta(days=30)).replace(hour=19, minute=30, second=0,
                                                             microsecond=0, tzinfo=None)
    games = [("demo-game-1@team.example", "Knicks vs Celtics", start),
             ("demo-game-2@team.example", "Knicks vs Lakers", start + timedelta(days=3))]
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, start_tls=False)

    async def send(sender: str, rcpt: str, raw: bytes) -> None:
        await smtp.connect()
        try:
            await smtp.sendmail(sender, [rcpt], raw)
        finally:
            await smtp.quit()

    say(f"ciserver demo — mail domain {DOMAIN}, web {base}\n")
    say(f"1. The organizer {ORGANIZER} adds create@{DOMAIN} as a guest to two games in "
        "their calendar; the calendar sends the invitations.")
    for uid, summary, when in games:
        await send(ORGANIZER, f"create@{DOMAIN}",
                   _mail(ORGANIZER, f"create@{DOMAIN}", f"Invitation: {summary}",
                         _ical("REQUEST", uid, 0, summary, when), "REQUEST"))
    _, key = await apikeys.create(svc, organizer=ORGANIZER, label="demo")
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        async def listed() -> list[dict[str, Any]] | None:
            r = await http.get("/api/v1/events", headers=auth)
            found = r.json() if r.status_code == 200 else []
            return found if len(found) == 2 else None

        events = await _wait(listed, "the two events")
        _IDS[id(svc)] = events[0]["id"]
        for e in events:
            say(f"   → event {e['id']}: {e['summary']}, page {e['page_url']}")
        await _wait(lambda: len(kept.to(ORGANIZER)) >= 2, "the organizer's confirmations")
        say(f"   → the organizer's calendar got create@'s acceptance and the page URLs "
            f"({len(kept.to(ORGANIZER))} mails)")

        # The organizer's season page (what the console's page configurator makes).
        async with svc.sessions.begin() as session:
            page = await pages.create(svc, session, ORGANIZER, pages.PageSettings(
                title="Knicks home games", intro="Get every game in your calendar.",
                layout="grid", color_primary="#f58426", event_ids=tuple(
                    e["id"] for e in events)), slug="knicks-home-games")
        _PAGES[id(svc)] = page.slug
        say(f"\n2. Three fans type their address on the season page {base}/p/{page.slug} "
            "and pick both games.")
        for address, name, _ in FANS:
            # The page's plain form POST, exactly what a browser without JavaScript sends.
            r = await http.post(f"/p/{page.slug}", data={
                "email": address, "name": name, "events": [e["id"] for e in events]})
            r.raise_for_status()
        await _wait(lambda: all(len(kept.to(a)) >= 2 for a, _, _ in FANS), "the invites")
        tokens: dict[str, str] = {}
        for address, _, _ in FANS:
            msg = kept.to(address)[0]
            m = re.search(r"rsvp\+([a-z2-7]+)@", str(msg["From"]))
            tokens[address] = m.group(1) if m else ""
            say(f"   → {address} got a personal invite from {msg['From']}: "
                f"{email.header.make_header(email.header.decode_header(msg['Subject']))}")

        say("\n3. They answer from their calendars.")
        first = events[0]
        for address, name, partstat in FANS:
            # Their calendar answers the invite's ORGANIZER: their own rsvp+TOKEN address.
            rsvp = f"rsvp+{tokens[address]}@{DOMAIN}"
            await send(address, rsvp, _mail(
                address, rsvp, f"{ANSWER[partstat]}: {first['summary']}",
                _ical("REPLY", first["invite_uid"], 0, first["summary"], start,
                      attendee=address, organizer=rsvp, partstat=partstat), "REPLY"))
            say(f"   → {name} answers {ANSWER[partstat]}")

        async def answered() -> bool:
            r = await http.get(f"/api/v1/events/{first['id']}/attendees", headers=auth)
            return sum(1 for a in r.json() if a["rsvp"]) == 3

        await _wait(answered, "the answers")

        say("\n4. The organizer edits the first game in their calendar: "
            "\"25% off merch at booth 393\".")
        before = len(kept.messages)
        await send(ORGANIZER, f"create@{DOMAIN}", _mail(
            ORGANIZER, f"create@{DOMAIN}", f"Updated invitation: {games[0][1]}",
            _ical("REQUEST", games[0][0], 1, games[0][1], start,
                  description="25% off merch at booth 393"), "REQUEST"))
        await _wait(lambda: len(kept.messages) >= before + 3, "the updates")
        say("   → every fan's calendar gets the new version (same UID, SEQUENCE 1)")

        say("\n5. The organizer cancels the second game.")
        before = len(kept.messages)
        await send(ORGANIZER, f"create@{DOMAIN}", _mail(
            ORGANIZER, f"create@{DOMAIN}", f"Canceled event: {games[1][1]}",
            _ical("CANCEL", games[1][0], 1, games[1][1], games[1][2]), "CANCEL"))
        await _wait(lambda: len(kept.messages) >= before + 3, "the cancellations")
        say("   → every fan's calendar removes it (METHOD:CANCEL)")

    say("\n6. The report. The same from the command line (the demo has a database of its own):\n"
        f"   CISERVER_DATABASE__URL={cfg.database_url} ciserver report organizer {ORGANIZER}")
    async with svc.sessions() as session:
        async for row in reports.stream_rows(session):
            say(f"   {row.event_summary:<18} {row.email:<20} {row.rsvp or '-':<2} "
                f"{row.partstat:<13} {row.status}")
    say(f"\nThe demo smarthost kept {len(kept.messages)} messages. API key for this demo: "
        f"{key}")
