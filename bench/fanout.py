"""bench/fanout: an organizer's update fans out to N subscribers, into Postfix's smtp-sink.

ciserver: a real `ciserver serve` (relay through [relay] smarthost = smtp-sink on loopback);
the organizer's update arrives by SMTP at create@ and the clock runs until every subscriber's
new version is recorded as delivered. Anchor, in the same run: a raw aiosmtplib client
pushing the same number of prebuilt messages into the same sink over as many connections as
the relay has workers — the client library's ceiling.

    .venv/bin/python -m bench.fanout [--subscribers 100000] [--dkim] [--postgres URL]

Prints both rates, the ratio, the time from the update's arrival to the first and to the
last delivery, and the daemon's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosmtplib
from sqlalchemy import func, insert, select

from ciserver import config as config_mod
from ciserver.addresses import Kind
from ciserver.itip import build
from ciserver.itip import content as content_mod
from ciserver.services import events
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import Event, InboxMessage, OutboxItem, Subscription

from .common import free_port, rss_mb, start_daemon, wait_port, write_config

DOMAIN = "invites.example.com"
ORGANIZER = "zach@team.example"
UID = "fanout-game@team.example"
START = datetime(2027, 3, 5, 0, 30, tzinfo=UTC)


def organizer_update(sequence: int) -> bytes:
    ical = (
        "BEGIN:VCALENDAR\r\nPRODID:-//Google Inc//Google Calendar 70.9054//EN\r\n"
        "VERSION:2.0\r\nMETHOD:REQUEST\r\nBEGIN:VEVENT\r\n"
        f"DTSTART:{START:%Y%m%dT%H%M%SZ}\r\n"
        f"DTEND:{START + timedelta(hours=3):%Y%m%dT%H%M%SZ}\r\n"
        f"DTSTAMP:{datetime.now(UTC):%Y%m%dT%H%M%SZ}\r\n"
        f"ORGANIZER;CN=Zach Lowe:mailto:{ORGANIZER}\r\nUID:{UID}\r\n"
        f"ATTENDEE;PARTSTAT=NEEDS-ACTION;RSVP=TRUE:mailto:create@{DOMAIN}\r\n"
        f"SEQUENCE:{sequence}\r\nSUMMARY:Knicks vs Celtics\r\n"
        "LOCATION:Madison Square Garden\r\n"
        "DESCRIPTION:25% off merch at booth 393\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n")
    return (f"From: Zach Lowe <{ORGANIZER}>\r\nTo: create@{DOMAIN}\r\n"
            "Subject: Updated invitation: Knicks vs Celtics\r\n"
            f"Message-ID: <update-{sequence}@team.example>\r\nMIME-Version: 1.0\r\n"
            "Content-Type: text/calendar; charset=UTF-8; method=REQUEST\r\n\r\n"
            + ical).encode()


async def seed(cfg: config_mod.Config, subscribers: int) -> None:
    """One event whose N subscribers already have version 0."""
    await db.upgrade(cfg.database_url)
    svc = Services.open(cfg)
    try:
        async with svc.sessions.begin() as session:
            event = await events.create(
                svc, session, organizer=ORGANIZER, organizer_name="Zach Lowe",
                organizer_uid=UID, origin="calendar",
                content=content_mod.new_content(summary="Knicks vs Celtics", start=START,
                                                end=START + timedelta(hours=3),
                                                location="Madison Square Garden"))
            event_id = event.id
        now = svc.now()
        chunk = 20_000
        for base in range(0, subscribers, chunk):
            async with svc.sessions.begin() as session:
                await session.execute(insert(Subscription), [
                    {"event_id": event_id, "email": f"fan{i}@fans{i % 200}.example",
                     "domain": f"fans{i % 200}.example", "name": f"Fan {i}",
                     "status": "active", "source": "page", "partstat": "NEEDS-ACTION",
                     "delivered_sequence": 0, "soft_bounces": 0, "created_at": now,
                     "updated_at": now}
                    for i in range(base, min(subscribers, base + chunk))])
    finally:
        await svc.close()


async def prebuilt(cfg: config_mod.Config, count: int) -> list[tuple[str, str, bytes]]:
    """The anchor's messages: real personal invites, built before the clock starts."""
    svc = Services.open(cfg)
    try:
        async with svc.sessions() as session:
            event = (await session.execute(select(Event))).scalar_one()
            subs = (await session.execute(
                select(Subscription.id, Subscription.email, Subscription.name)
                .limit(count))).all()
        template = build.InviteTemplate(build.OutboundEvent(
            uid=event.uid, sequence=1, cancelled=False, content=event.content,
            organizer_name=event.organizer_name, organizer_email=event.organizer_email,
            page_url=svc.page_url(event.public_id)), DOMAIN, svc.now())
        book, out = svc.book, []
        for sub_id, email, name in subs:
            raw = template.render(build.OutboundRecipient(
                email=email, name=name, partstat="NEEDS-ACTION",
                rsvp_address=book.address(Kind.RSVP, sub_id),
                unsubscribe_address=book.address(Kind.UNSUBSCRIBE, sub_id),
                unsubscribe_url=svc.unsubscribe_url(book.token(sub_id))),
                now=svc.now(), message_id=f"<{sub_id}.bench@{DOMAIN}>")
            out.append((book.address(Kind.BOUNCE, sub_id), email, raw))
        return out
    finally:
        await svc.close()


async def anchor(port: int, messages: list[tuple[str, str, bytes]], connections: int) -> float:
    """Raw aiosmtplib: prebuilt messages over ``connections`` kept connections."""
    queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)

    async def one() -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await client.connect()
        try:
            while True:
                try:
                    mail_from, rcpt, raw = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await client.sendmail(mail_from, [rcpt], raw)
        finally:
            await client.quit()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    return time.perf_counter() - start


async def progress(cfg: config_mod.Config) -> tuple[int, datetime | None, datetime | None,
                                                    datetime | None]:
    """(delivered of version 1, update received at, first and last delivery)."""
    svc = Services.open(cfg)
    try:
        async with svc.sessions() as session:
            received = (await session.execute(
                select(func.max(InboxMessage.received_at)))).scalar_one()
            done, first, last = (await session.execute(
                select(func.count(OutboxItem.id), func.min(OutboxItem.sent_at),
                       func.max(OutboxItem.sent_at))
                .where(OutboxItem.sent_sequence >= 1, OutboxItem.state == "sent"))).one()
        return int(done), received, first, last
    finally:
        await svc.close()


def dkim_key(tmp: Path) -> dict[str, object]:
    key = tmp / "dkim.pem"
    subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], check=True,
                   capture_output=True)
    return {"selector": "bench", "key_file": str(key)}


async def run(subscribers: int, pg_url: str | None, with_dkim: bool, workers: int) -> None:
    smtp_sink = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not Path(smtp_sink).exists():
        sys.exit("smtp-sink not found: apt-get install postfix (it carries smtp-sink)")
    tmp = Path(tempfile.mkdtemp(prefix="ciserver-fanout-"))
    sink_port, smtp_port, web_port = free_port(), free_port(), free_port()
    sink = subprocess.Popen([smtp_sink, "-u", "nobody", f"127.0.0.1:{sink_port}", "1024"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = pg_url or f"sqlite+aiosqlite:///{tmp / 'ciserver.db'}"
    sections: dict[str, dict[str, object]] = {
        "server": {"domain": DOMAIN, "state_dir": str(tmp / "state"), "log_level": "warning",
                   "event_loop": os.environ.get("BENCH_EVENT_LOOP", "auto"),
                   "public_url": "https://invites.example.com"},
        "database": {"url": url},
        "smtp": {"listen": f"127.0.0.1:{smtp_port}"},
        "web": {"listen": f"127.0.0.1:{web_port}"},
        "relay": {"smarthost": f"127.0.0.1:{sink_port}", "tls": "none", "workers": workers},
        "organizers": {"allow": [ORGANIZER], "confirm": False},
    }
    if with_dkim:
        sections["dkim"] = dkim_key(tmp)
    cfg_path = write_config(tmp / "ciserver.toml", **sections)
    cfg = config_mod.load(cfg_path, {})
    try:
        wait_port(sink_port)
        t = time.perf_counter()
        await seed(cfg, subscribers)
        print(f"bench/fanout: {subscribers} subscribers, store {url.split(':')[0]}, "
              f"{workers * (1 + cfg.server.inbox_processes)} relay connections, "
              f"DKIM {'on' if with_dkim else 'off'} "
              f"(seeded in {time.perf_counter() - t:.0f} s)")
        messages = await prebuilt(cfg, subscribers)
        # ciserver relays from the daemon and from its worker process, `workers`
        # connections each: the anchor gets as many connections.
        connections = workers * (1 + cfg.server.inbox_processes)
        anchor_seconds = await anchor(sink_port, messages, connections)
        del messages
        anchor_rate = subscribers / anchor_seconds

        daemon = start_daemon(cfg_path, tmp / "daemon.log")
        peak = 0.0
        try:
            wait_port(smtp_port)
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port, start_tls=False)
            await client.connect()
            await client.sendmail(ORGANIZER, [f"create@{DOMAIN}"], organizer_update(1))
            await client.quit()
            deadline = time.monotonic() + 3600
            done = 0
            while time.monotonic() < deadline:
                peak = max(peak, rss_tree(daemon.pid))
                done, received, first, last = await progress(cfg)
                if done >= subscribers:
                    break
                await asyncio.sleep(1.0)
        finally:
            daemon.terminate()
            daemon.wait()
        assert received is not None and first is not None and last is not None
        to_first = (first - received).total_seconds()
        to_last = (last - received).total_seconds()
        ours = subscribers / to_last
        print(f"  raw aiosmtplib (prebuilt) : {anchor_rate:8.0f} msg/s")
        print(f"  ciserver fan-out          : {ours:8.0f} msg/s (update arrival -> last "
              "delivery)")
        print(f"  ratio                     : {ours / anchor_rate:8.2f}")
        print(f"  first delivery after      : {to_first:8.2f} s")
        print(f"  last delivery after       : {to_last:8.2f} s")
        print(f"  delivered                 : {done}/{subscribers}")
        print(f"  daemon peak RSS           : {peak:8.0f} MB (daemon and its inbox process)")
    finally:
        sink.terminate()
        sink.wait()


def rss_tree(pid: int) -> float:
    """Peak RSS of a process plus its live children, in MB."""
    total = rss_mb(pid)
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_mb(int(child))
    except OSError:
        pass
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--subscribers", type=int, default=100_000)
    p.add_argument("--dkim", action="store_true", help="sign every message (RSA 2048)")
    p.add_argument("--postgres", help="postgresql+asyncpg:// URL of an EMPTY database")
    p.add_argument("--workers", type=int, default=4, help="relay connections (both sides)")
    a = p.parse_args()
    asyncio.run(run(a.subscribers, a.postgres, a.dkim, a.workers))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
