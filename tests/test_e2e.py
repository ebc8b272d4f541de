"""The whole story against `ciserver serve` running as a subprocess, driven as users drive it:
SMTP to the listener, HTTP to the API, the `ciserver` CLI, SIGTERM and a restart."""

from __future__ import annotations

import csv
import io
import os
import signal
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from icalendar import Calendar

from .conftest import DOMAIN, ORGANIZER, Sink, free_port
from .fixtures import load_fixture
from .organizer_mail import organizer_mail
from .test_story import rsvp_token

CISERVER = [sys.executable, "-m", "ciserver"]
START = datetime(2027, 3, 4, 0, 0, tzinfo=UTC)  # 19:00 in New York, the evening before


class Daemon:
    def __init__(self, tmp_path: Path, sink: Sink) -> None:
        self.smtp_port, self.web_port = free_port(), free_port()
        self.config = tmp_path / "ciserver.toml"
        self.config.write_text(
            f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
            f'public_url = "http://127.0.0.1:{self.web_port}"\n'
            f'[smtp]\nlisten = "127.0.0.1:{self.smtp_port}"\nmax_message_size = 200000\n'
            f'[web]\nlisten = "127.0.0.1:{self.web_port}"\n'
            f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\ntls = "none"\nretry_base = 1\n'
            f'[organizers]\nallow = ["{ORGANIZER}", "*@nba.example"]\n')
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CISERVER_")}
        self.env["CISERVER_CONFIG"] = str(self.config)
        self.log = tmp_path / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*CISERVER, *args], env=self.env, capture_output=True,
                                text=True, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"ciserver {' '.join(args)}: {result.stderr}")
        return result

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([*CISERVER, "serve"], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("daemon did not start:\n" + self.log.read_text())

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def smtp(self, rcpt: str, raw: bytes, sender: str = "someone@example.org") -> None:
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as client:
            client.sendmail(sender, [rcpt], raw)


@pytest.fixture
def daemon(tmp_path: Path, sink: Sink) -> Iterator[Daemon]:
    d = Daemon(tmp_path, sink)
    try:
        yield d
    finally:
        if d.proc is not None:
            d.proc.kill()
            d.proc.wait()


def wait_until(predicate, timeout: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out")


def fan_mail(sink: Sink) -> list:  # type: ignore[type-arg]
    return [m for m in sink.messages if m.rcpt_tos[0].lower() != ORGANIZER]


def test_story_through_the_daemon(daemon: Daemon, sink: Sink) -> None:
    daemon.start()
    uid = "040000008200E00074C5B7101A82E00800000000knicks"

    # The organizer's Outlook invites create@.
    daemon.smtp(f"create@{DOMAIN}", organizer_mail(
        "outlook", uid=uid, sequence=0, dtstamp=datetime(2027, 1, 5, tzinfo=UTC), start=START,
        end=START + timedelta(hours=3), summary="Knicks vs Celtics",
        location="Madison Square Garden"), ORGANIZER)
    wait_until(lambda: sink.to(ORGANIZER))
    key = daemon.cli("apikey", "create", "--organizer", ORGANIZER).stdout.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    listed = httpx.get(f"{daemon.url}/api/v1/events", headers=auth).json()
    assert len(listed) == 1
    event = listed[0]
    assert event["uid"] == uid and event["summary"] == "Knicks vs Celtics"
    assert event["start"].startswith("2027-03-04T00:00:00")
    assert event["status"] == "confirmed" and event["sequence"] == 0
    assert event["page_url"] == f"{daemon.url}/e/{event['id']}"
    page = httpx.get(event["page_url"])
    assert page.status_code == 200 and "Knicks vs Celtics" in page.text
    sink.clear()

    # Two fans from the public API, one from the page's plain form, one added by the organizer.
    for fan in ("fan.one@example.com", "fan.two@gmail.com"):
        r = httpx.post(f"{daemon.url}/api/v1/events/{event['id']}/invites", json={"email": fan})
        assert r.status_code == 202
    r = httpx.post(event["page_url"], data={"email": "fan.three@example.net", "name": "Three"})
    assert r.status_code == 200 and "on its way" in r.text
    r = httpx.post(f"{daemon.url}/api/v1/events/{event['id']}/attendees", headers=auth,
                   json=[{"email": "vip@nba.example", "name": "VIP"}])
    assert r.status_code == 202 and r.json()["count"] == 1
    wait_until(lambda: len(sink.messages) >= 4)
    tokens = {m.rcpt_tos[0].lower(): rsvp_token(m) for m in sink.messages}
    assert set(tokens) == {"fan.one@example.com", "fan.two@gmail.com", "fan.three@example.net",
                           "vip@nba.example"}
    sink.clear()

    # Answers from Outlook, Google and Apple.
    invite_uid = event["invite_uid"]
    for name, fan in (("outlook_reply_accept.eml", "fan.one@example.com"),
                      ("google_reply_tentative.eml", "fan.two@gmail.com"),
                      ("apple_reply_accept.eml", "fan.three@example.net")):
        raw = load_fixture(name, token=tokens[fan], uid=invite_uid, sequence=0)
        daemon.smtp(f"rsvp+{tokens[fan]}@{DOMAIN}", raw, fan)

    def answered() -> bool:
        rows = httpx.get(f"{daemon.url}/api/v1/events/{event['id']}/attendees",
                         headers=auth).json()
        return sum(1 for a in rows if a["rsvp"]) == 3

    wait_until(answered)

    # SIGTERM stops gracefully; a restart sends nothing again.
    assert daemon.stop() == 0
    daemon.start()
    time.sleep(1.0)
    assert sink.messages == []

    # The organizer moves the game and adds the merch offer: all four get SEQUENCE 1.
    daemon.smtp(f"create@{DOMAIN}", organizer_mail(
        "outlook", uid=uid, sequence=1, dtstamp=datetime(2027, 1, 6, tzinfo=UTC),
        start=START + timedelta(hours=1), end=START + timedelta(hours=4),
        summary="Knicks vs Celtics", location="Madison Square Garden",
        description="25% off merch at booth 393"), ORGANIZER)
    wait_until(lambda: len(fan_mail(sink)) >= 4)
    for m in fan_mail(sink):
        ev = Calendar.from_ical(m.calendar()).events[0]
        assert int(ev["SEQUENCE"]) == 1 and "booth 393" in str(ev["DESCRIPTION"])
        assert ev.start == START + timedelta(hours=1)
    sink.clear()

    # The CSV report, from the CLI and from the API.
    out = daemon.cli("report", "event", uid, "--format", "csv").stdout
    rows = {r["email"]: r for r in csv.DictReader(io.StringIO(out))}
    assert {e: r["rsvp"] for e, r in rows.items()} == {
        "fan.one@example.com": "Y", "fan.two@gmail.com": "M", "fan.three@example.net": "Y",
        "vip@nba.example": ""}
    assert rows["fan.one@example.com"]["event_uid"] == uid
    api_csv = httpx.get(f"{daemon.url}/api/v1/events/{event['id']}/report.csv", headers=auth)
    assert api_csv.status_code == 200
    assert {r["email"] for r in csv.DictReader(io.StringIO(api_csv.text))} == set(rows)
    table = daemon.cli("report", "event", event["id"]).stdout
    assert "fan.one@example.com" in table
    assert "done" in daemon.cli("inbox", "list").stdout

    # Cancel from the calendar: every fan gets a CANCEL.
    daemon.smtp(f"create@{DOMAIN}", organizer_mail(
        "outlook", method="CANCEL", uid=uid, sequence=2,
        dtstamp=datetime(2027, 1, 7, tzinfo=UTC), start=START + timedelta(hours=1),
        end=START + timedelta(hours=4), summary="Knicks vs Celtics"), ORGANIZER)
    wait_until(lambda: len(fan_mail(sink)) >= 4)
    for m in fan_mail(sink):
        cal = Calendar.from_ical(m.calendar())
        assert str(cal["METHOD"]) == "CANCEL" and int(cal.events[0]["SEQUENCE"]) == 2
    assert daemon.stop() == 0


def test_bad_input_gets_clear_refusals(daemon: Daemon, sink: Sink) -> None:
    daemon.start()
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=10) as client:
        client.ehlo("test.example")
        client.mail("spammer@example.org")
        code, text = client.rcpt("victim@elsewhere.example")
        assert code == 550 and b"5.1.1" in text  # never an open relay
        code, text = client.rcpt(f"rsvp+{'a' * 26}@{DOMAIN}")
        assert code == 550  # a forged token
        code, _ = client.rcpt(f"create@{DOMAIN}")
        assert code == 250
        code, text = client.data(b"Subject: x\r\n\r\n" + (b"x" * 98 + b"\r\n") * 3000)
        assert code == 552 and b"5.3.4" in text
    # Malformed calendar data is accepted, kept, and its error is visible.
    raw = (b"From: zach@team.example\r\nTo: create@invites.example.com\r\nSubject: broken\r\n"
           b"Content-Type: text/calendar; method=REQUEST\r\n\r\nBEGIN:VCALENDAR\r\n"
           b"BEGIN:VEVENT\r\nDTSTART:not-a-date\r\nUID:x\r\nEND:VCALENDAR\r\n")
    daemon.smtp(f"create@{DOMAIN}", raw, ORGANIZER)

    def failed() -> bool:
        return "failed" in daemon.cli("inbox", "list", "--status", "failed").stdout

    wait_until(failed)
    assert httpx.get(f"{daemon.url}/healthz").status_code == 200  # still running
    r = httpx.post(f"{daemon.url}/api/v1/events/nosuchevent/invites",
                   json={"email": "a@example.com"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert daemon.stop() == 0
