"""Crash safety (issue 4, point 5): SIGKILL in the middle of a fan-out, then a restart.

A real `ciserver serve` (SQLite, one inbox worker process, which relays too) delivers an
organizer's update to 2,000 subscribers through a capturing smarthost that takes a few
milliseconds a message. Once a few hundred have arrived, the daemon and its worker process
are killed with SIGKILL (the whole process group); the daemon is started again and finishes.
Every active subscriber must end up with the latest version, at most the in-flight window is
sent twice (the same UID and SEQUENCE: harmless), nothing is lost, and unsubscribed
addresses get nothing. The restart must resume at once: claims of the killed processes are
released at start on SQLite, not after outbox.CLAIM_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from sqlalchemy import insert

from ciserver import config as config_mod
from ciserver import relay
from ciserver.itip import content as content_mod
from ciserver.services import events, outbox
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import Subscription

from .conftest import DOMAIN, ORGANIZER, Sink, free_port

ACTIVE = 2000
UNSUBSCRIBED = 40
BOUNCED = 10
KILL_AFTER = 300  # invites of the new version at the smarthost
PROCESSES = 2  # the daemon and its inbox worker process both relay
UID = "crash-game@team.example"
START = datetime(2031, 3, 5, 0, 30, tzinfo=UTC)


@dataclass
class SlowSink(Sink):
    """The capturing smarthost, a few milliseconds a message: the fan-out takes seconds."""

    delay: float = 0.005

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def slow_sink() -> Iterator[SlowSink]:
    s = SlowSink(port=free_port())
    controller = Controller(s, hostname="127.0.0.1", port=s.port)
    controller.start()
    try:
        yield s
    finally:
        controller.stop()


class Daemon:
    """`ciserver serve` in a session of its own, so that it and its worker process can be
    killed together."""

    def __init__(self, tmp_path: Path, sink: Sink) -> None:
        self.smtp_port, self.web_port = free_port(), free_port()
        self.db = tmp_path / "ciserver.db"
        self.config = tmp_path / "ciserver.toml"
        self.config.write_text(
            f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
            f'public_url = "http://127.0.0.1:{self.web_port}"\ninbox_processes = 1\n'
            'log_level = "warning"\n'
            f'[database]\nurl = "sqlite+aiosqlite:///{self.db}"\n'
            f'[smtp]\nlisten = "127.0.0.1:{self.smtp_port}"\n'
            f'[web]\nlisten = "127.0.0.1:{self.web_port}"\n'
            f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\ntls = "none"\n'
            f'[organizers]\nallow = ["{ORGANIZER}"]\nconfirm = false\n')
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CISERVER_")}
        self.env["CISERVER_CONFIG"] = str(self.config)
        self.log = tmp_path / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "ciserver", "serve"],
                                         env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{self.web_port}/healthz",
                             timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError("daemon did not start:\n" + self.log.read_text())

    def kill(self) -> None:
        """SIGKILL to the daemon and its worker process; returns once all are gone."""
        assert self.proc is not None
        pgid = self.proc.pid  # the session leader: its process group id is its pid
        os.killpg(pgid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.02)
        raise AssertionError("a process of the killed daemon survived")

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self.proc = None
        return code

    def query(self, sql: str) -> list[tuple[object, ...]]:
        """Read the daemon's database as an operator would (WAL: readers do not block)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def outbox_states(self) -> dict[str, int]:
        return {str(state): int(str(n)) for state, n in self.query(
            "SELECT state, count(*) FROM outbox WHERE kind = 'invite' GROUP BY state")}


@pytest.fixture
def daemon(tmp_path: Path, slow_sink: SlowSink) -> Iterator[Daemon]:
    d = Daemon(tmp_path, slow_sink)
    try:
        yield d
    finally:
        if d.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(d.proc.pid, signal.SIGKILL)
            d.proc.wait()


async def seed(d: Daemon) -> tuple[list[str], list[str]]:
    """The event, and subscribers who already have its version 0 (one insert per
    thousand, as bench/fanout seeds); returns (active, stopped) addresses."""
    cfg = config_mod.load(d.config, {})
    svc = Services.open(cfg)
    try:
        await db.ensure_schema(svc.engine, cfg.database_url)
        async with svc.sessions.begin() as session:
            event = await events.create(
                svc, session, organizer=ORGANIZER, organizer_name="Zach Lowe",
                organizer_uid=UID, origin="calendar",
                content=content_mod.new_content(summary="Knicks vs Celtics", start=START,
                                                end=START + timedelta(hours=3),
                                                location="Madison Square Garden"))
            event_id = event.id
        now = svc.now()
        rows = []
        for i in range(ACTIVE + UNSUBSCRIBED + BOUNCED):
            status = ("active" if i < ACTIVE else
                      "unsubscribed" if i < ACTIVE + UNSUBSCRIBED else "bounced")
            rows.append({"event_id": event_id, "email": f"fan{i}@fans{i % 50}.example",
                         "domain": f"fans{i % 50}.example", "name": f"Fan {i}",
                         "status": status, "source": "page", "partstat": "NEEDS-ACTION",
                         "delivered_sequence": 0, "soft_bounces": 0, "created_at": now,
                         "updated_at": now})
        for base in range(0, len(rows), 1000):
            async with svc.sessions.begin() as session:
                await session.execute(insert(Subscription), rows[base:base + 1000])
        return ([str(r["email"]) for r in rows if r["status"] == "active"],
                [str(r["email"]) for r in rows if r["status"] != "active"])
    finally:
        await svc.close()


def organizer_update(sequence: int) -> bytes:
    """What the organizer's Google Calendar sends to create@ when the event changes."""
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


def uid_and_sequence(calendar: str) -> tuple[str, int]:
    uid = re.search(r"^UID:(.+?)\r?$", calendar, re.MULTILINE)
    seq = re.search(r"^SEQUENCE:(\d+)\r?$", calendar, re.MULTILINE)
    assert uid and seq, calendar
    return uid.group(1), int(seq.group(1))


def test_sigkill_in_the_middle_of_a_fan_out(daemon: Daemon, slow_sink: SlowSink) -> None:
    active, stopped = asyncio.run(seed(daemon))
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
        client.sendmail(ORGANIZER, [f"create@{DOMAIN}"], organizer_update(1))
    updated = time.monotonic()

    deadline = time.monotonic() + 60
    while len(slow_sink.invites()) < KILL_AFTER:
        assert time.monotonic() < deadline, daemon.log.read_text()
        time.sleep(0.005)
    daemon.kill()
    killed_after = time.monotonic() - updated
    time.sleep(0.3)  # what was in DATA when the sender died still lands at the smarthost
    at_kill = slow_sink.invites()
    states_at_kill = daemon.outbox_states()
    assert sum(states_at_kill.values()) == ACTIVE  # one row per active subscriber
    recorded_at_kill = states_at_kill.get("sent", 0)
    # Claims of the dead processes: without their release at start they would hold these
    # items until outbox.CLAIM_TIMEOUT.
    assert states_at_kill.get("sending", 0) > 0, states_at_kill
    # Killed in the middle: much was still to send.
    assert KILL_AFTER <= len(at_kill) < ACTIVE // 2, len(at_kill)

    restarted = time.monotonic()
    daemon.start()
    # Generous for a loaded machine (it takes seconds), yet far below the claim timeout
    # that would hold the killed processes' items if they were not released at start.
    deadline = restarted + 120
    assert timedelta(seconds=120) < outbox.CLAIM_TIMEOUT
    while daemon.outbox_states() != {"sent": ACTIVE}:
        assert time.monotonic() < deadline, (daemon.outbox_states(), daemon.log.read_text())
        time.sleep(0.1)
    finished = time.monotonic() - restarted
    time.sleep(0.5)  # nothing more may come
    assert daemon.stop() == 0

    got = slow_sink.invites()
    per_rcpt = Counter(m.rcpt_tos[0].lower() for m in got)
    versions = {uid_and_sequence(m.calendar()) for m in got}
    (event_uid,) = {str(u) for (u,) in daemon.query("SELECT uid FROM events")}
    # Every copy, duplicates included, is the latest version of the one event.
    assert versions == {(event_uid, 1)}
    # Nothing lost: everyone active got it; the stopped ones got nothing.
    assert set(per_rcpt) == set(active)
    assert not set(per_rcpt) & set(stopped)
    assert daemon.query(
        "SELECT count(*) FROM outbox WHERE kind = 'invite' AND state = 'sent' "
        "AND sent_sequence = 1") == [(ACTIVE,)]
    assert daemon.query(
        "SELECT status, delivered_sequence, count(*) FROM subscriptions "
        "GROUP BY status, delivered_sequence ORDER BY status") == [
        ("active", 1, ACTIVE), ("bounced", 0, BOUNCED), ("unsubscribed", 0, UNSUBSCRIBED)]
    # At most the in-flight window twice: sent but not yet recorded when the processes
    # died (each relay records every RECORD_EVERY results or RECORD_INTERVAL seconds).
    duplicates = len(got) - len(per_rcpt)
    window = len({m.rcpt_tos[0].lower() for m in at_kill}) - recorded_at_kill
    bound = relay.Relay.BATCH * PROCESSES * 2
    remaining = ACTIVE - len({m.rcpt_tos[0].lower() for m in at_kill})
    print(f"\ncrash: killed {killed_after:.1f} s after the update with {len(at_kill)} "
          f"at the smarthost, {recorded_at_kill} recorded as "
          f"sent (in flight: {window}); {duplicates} duplicates in {len(got)} messages; "
          f"the restart delivered the other {remaining} in {finished:.1f} s; "
          f"outbox at kill: {states_at_kill}")
    assert 0 <= window <= bound
    assert duplicates <= window, (duplicates, window)
    assert max(per_rcpt.values()) <= 2

