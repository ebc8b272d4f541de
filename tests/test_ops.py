"""Operating the daemon: /metrics across its processes, SIGHUP reload, one-line logs,
`ciserver status` and `ciserver db backup` while it runs. Each test drives a real
`ciserver serve` subprocess (tests/test_e2e.py's Daemon) the way an operator would."""

from __future__ import annotations

import logging
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ciserver.daemon import OneLineFormatter, logging_to_journal

from .conftest import DOMAIN, ORGANIZER, Sink, free_port
from .fixtures import load_fixture
from .organizer_mail import organizer_mail
from .test_e2e import CISERVER, Daemon, wait_until
from .test_story import rsvp_token

START = datetime(2027, 3, 4, tzinfo=UTC)
BROKEN = (b"From: zach@team.example\r\nTo: create@invites.example.com\r\nSubject: broken\r\n"
          b"Message-ID: <broken@team.example>\r\n"
          b"Content-Type: text/calendar; method=REQUEST\r\n\r\nBEGIN:VCALENDAR\r\n"
          b"BEGIN:VEVENT\r\nDTSTART:not-a-date\r\nUID:x\r\nEND:VCALENDAR\r\n")
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: \S")


@pytest.fixture
def daemon(tmp_path: Path, sink: Sink) -> Iterator[Daemon]:
    d = Daemon(tmp_path, sink)
    try:
        yield d
    finally:
        if d.proc is not None:
            d.proc.kill()
            d.proc.wait()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(d: Daemon) -> Samples:
    """/metrics as {(sample name, sorted labels): value}."""
    r = httpx.get(f"{d.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def children(d: Daemon) -> list[int]:
    assert d.proc is not None
    path = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children")
    return [int(p) for p in path.read_text().split()]


# --------------------------------------------------------------------------------------------
# /metrics and logs


def test_metrics_add_up_every_process(daemon: Daemon, sink: Sink) -> None:
    d = daemon
    d.start()
    assert children(d), "an inbox worker process runs beside the daemon (the default)"
    sink.answers["fan.two@gmail.com"] = ["451 4.7.1 greylisted, try again"]
    sink.answers["gone@example.org"] = ["550 5.1.1 no such user"]

    uid = "metrics-game@team.example"
    d.smtp(f"create@{DOMAIN}", organizer_mail(
        "outlook", uid=uid, start=START, end=START + timedelta(hours=3),
        summary="Metrics game"), ORGANIZER)
    wait_until(lambda: bool(sink.to(ORGANIZER)))
    key = d.cli("apikey", "create", "--organizer", ORGANIZER).stdout.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    event = httpx.get(f"{d.url}/api/v1/events", headers=auth).json()[0]
    for fan in ("fan.one@example.com", "fan.two@gmail.com", "gone@example.org"):
        r = httpx.post(f"{d.url}/api/v1/events/{event['id']}/invites", json={"email": fan})
        assert r.status_code == 202
    wait_until(lambda: bool(sink.to("fan.one@example.com") and sink.to("fan.two@gmail.com")),
               timeout=30)  # fan.two after one retry ([relay] retry_base = 1)
    tokens = {m.rcpt_tos[0].lower(): rsvp_token(m) for m in sink.invites()}
    for name, fan in (("outlook_reply_accept.eml", "fan.one@example.com"),
                      ("google_reply_tentative.eml", "fan.two@gmail.com")):
        d.smtp(f"rsvp+{tokens[fan]}@{DOMAIN}",
               load_fixture(name, token=tokens[fan], uid=event["invite_uid"], sequence=0), fan)
    d.smtp(f"create@{DOMAIN}", BROKEN, ORGANIZER)
    with pytest.raises(smtplib.SMTPRecipientsRefused):  # refused at RCPT: counted too
        d.smtp("someone@elsewhere.example", b"Subject: relay?\r\n\r\nno\r\n")

    def settled() -> bool:
        m = scrape(d)
        return (value(m, "ciserver_inbound_processed_total", outcome="failed") == 1
                and value(m, "ciserver_answers_total", kind="TENTATIVE", outcome="applied") == 1
                and value(m, "ciserver_outbound_deliveries_total", outcome="failed") == 1
                and value(m, "ciserver_outbox_queue_depth", state="pending") == 0
                and value(m, "ciserver_outbox_queue_depth", state="sending") == 0)

    wait_until(settled, timeout=30)
    m = scrape(d)
    sent = len(sink.messages)
    assert value(m, "ciserver_inbound_received_total", source="smtp") == 4
    assert value(m, "ciserver_inbound_received_total", source="imap") == 0
    assert value(m, "ciserver_smtp_refused_total", reason="unknown_recipient") == 1
    assert value(m, "ciserver_smtp_refused_total", reason="too_big") == 0
    assert value(m, "ciserver_inbound_processed_total", outcome="done") == 3
    assert value(m, "ciserver_inbound_processed_total", outcome="failed") == 1
    assert value(m, "ciserver_answers_total", kind="ACCEPTED", outcome="applied") == 1
    assert value(m, "ciserver_answers_total", kind="TENTATIVE", outcome="applied") == 1
    assert value(m, "ciserver_answers_total", kind="DECLINED", outcome="applied") == 0
    assert value(m, "ciserver_outbound_deliveries_total", outcome="sent") == sent
    assert value(m, "ciserver_outbound_deliveries_total", outcome="deferred") == 1
    assert value(m, "ciserver_outbound_deliveries_total", outcome="failed") == 1
    assert value(m, "ciserver_outbound_delivery_latency_seconds_count") == sent
    assert 0 < value(m, "ciserver_outbound_delivery_latency_seconds_sum") < 60 * sent
    assert value(m, "ciserver_outbound_delivery_latency_seconds_bucket", le="+Inf") == sent
    assert value(m, "ciserver_outbox_failed_items") == 1
    assert value(m, "ciserver_outbox_queue_oldest_age_seconds") == 0
    assert value(m, "ciserver_inbox_failed_messages") == 1
    assert value(m, "ciserver_inbox_queue_depth", status="new") == 0
    assert value(m, "ciserver_database_up") == 1
    # The worker processed the inbox and relayed too: its counts are in the daemon's files.
    files = list((d.config.parent / "state" / "metrics" / str(d.proc.pid)).glob("*.db"))
    assert {f.stem.rsplit("_", 1)[1] for f in files} >= {str(d.proc.pid), *map(str,
                                                                              children(d))}

    # A worker that dies takes none of its counts with it.
    worker = children(d)[0]
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: bool(children(d)) and children(d)[0] != worker, timeout=15)
    again = scrape(d)
    for name in ("ciserver_inbound_processed_total", "ciserver_answers_total",
                 "ciserver_outbound_deliveries_total"):
        assert {k: v for k, v in again.items() if k[0] == name} == \
            {k: v for k, v in m.items() if k[0] == name}

    # A waiting item shows in the gauges.
    sink.answers["late@example.net"] = ["451 4.3.0 later"] * 50
    httpx.post(f"{d.url}/api/v1/events/{event['id']}/invites", json={"email": "late@example.net"})
    wait_until(lambda: value(scrape(d), "ciserver_outbox_queue_depth", state="pending") == 1)
    time.sleep(1.1)
    assert value(scrape(d), "ciserver_outbox_queue_oldest_age_seconds") >= 1
    assert d.stop() == 0

    # One line per event, carrying the identifiers to search the journal by.
    lines = d.log.read_text().splitlines()
    assert [line for line in lines if not LOG_LINE.match(line)] == []
    text = "\n".join(lines)
    assert re.search(r"INFO ciserver\.inbox: inbox \d+ done message-id=<\S+@\S+>: ", text)
    assert re.search(r"inbox \d+ failed message-id=<broken@team.example>: ", text)
    assert re.search(r"answer ACCEPTED from sub=\d+ event=\w+ uid=\S+", text)
    assert re.search(r"event created uid=metrics-game@team.example id=\w+", text)
    assert re.search(r"sent item=\d+ sub=\d+ to=fan.one@example.com seq=0", text)
    assert re.search(r"delivery deferred item=\d+ sub=\d+ to=fan.two@gmail.com: 451 ", text)
    assert re.search(r"delivery failed item=\d+ sub=\d+ to=gone@example.org: 550 ", text)
    assert re.search(r"inbox worker 0 exited with status -9", text)


def test_log_records_are_one_line() -> None:
    record = logging.LogRecord("ciserver.relay", logging.WARNING, __file__, 1,
                               "delivery deferred item=%s: %s", (7, "451 first\r\nsecond\n"),
                               None)
    assert OneLineFormatter().format(record) == \
        "WARNING ciserver.relay: delivery deferred item=7: 451 first; second"
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("ciserver.inbox", logging.ERROR, __file__, 1,
                                   "inbox message %s failed", (3,), sys.exc_info())
    journal = OneLineFormatter(journal=True).format(record).splitlines()
    assert journal[0] == "<3>ciserver.inbox: inbox message 3 failed"
    assert journal[1] == "<3>Traceback (most recent call last):"  # the only multi-line record
    assert all(line.startswith("<3>") for line in journal)
    st = os.fstat(sys.stderr.fileno())
    assert logging_to_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    assert not logging_to_journal({"JOURNAL_STREAM": "1:2"}) and not logging_to_journal({})


# --------------------------------------------------------------------------------------------
# SIGHUP


def test_sighup_applies_what_it_can(daemon: Daemon, sink: Sink) -> None:
    d = daemon
    text = d.config.read_text()
    assert 'allow = ["zach@team.example", "*@nba.example"]' in text
    d.config.write_text(text.replace('"*@nba.example"', '"*@other.example"'))
    d.start()
    # The worker process has read its configuration once it processed a message.
    d.smtp(f"create@{DOMAIN}", f"From: {ORGANIZER}\r\nSubject: hi\r\n\r\nhello\r\n".encode(),
           ORGANIZER)
    wait_until(lambda: "ignored" in d.cli("inbox", "list").stdout)
    coach = "coach@nba.example"
    game = organizer_mail("google", uid="coach-game@nba.example", start=START,
                          end=START + timedelta(hours=2), summary="Coach's game",
                          organizer=coach, organizer_name="Coach")
    with pytest.raises(smtplib.SMTPDataError) as refused:
        d.smtp(f"create@{DOMAIN}", game, coach)
    assert refused.value.smtp_code == 550

    new_port = free_port()
    d.config.write_text(
        d.config.read_text().replace('"*@other.example"', '"*@nba.example"')
        .replace("[server]\n", '[server]\nlog_level = "warning"\n')
        .replace(f'[smtp]\nlisten = "127.0.0.1:{d.smtp_port}"',
                 f'[smtp]\nlisten = "127.0.0.1:{new_port}"'))
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    expected = (f"configuration reloaded from {d.config}: applied [server] log_level, "
                "[organizers] allow; needs a restart: [smtp] listen")
    wait_until(lambda: f"WARNING ciserver: {expected}" in d.log.read_text()
               and f"inbox worker: {expected}" in d.log.read_text())

    # The allow-list: at SMTP time (the daemon) and when the worker applies the invite.
    d.smtp(f"create@{DOMAIN}", game, coach)
    wait_until(lambda: bool(sink.to(coach)))
    assert "Coach's game" in d.cli("events", "list").stdout
    # The log level: the info lines of that work are gone, in both processes.
    assert "coach-game@nba.example" not in d.log.read_text()
    # [smtp] listen needs a restart: the old port still answers, the new one is not bound.
    with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=5) as client:
        assert client.noop()[0] == 250
    with pytest.raises(OSError):
        smtplib.SMTP("127.0.0.1", new_port, timeout=2)

    # A broken file changes nothing, and says so.
    good = d.config.read_text()
    d.config.write_text(good.replace('"*@nba.example"', '"nobody"'))
    d.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reload failed; the running configuration stays: "
                       in d.log.read_text())
    assert "[organizers] allow[1]" in d.log.read_text()
    assert httpx.get(f"{d.url}/healthz").status_code == 200
    assert d.stop() == 0


# --------------------------------------------------------------------------------------------
# ciserver status


def test_status_says_what_is_wrong(daemon: Daemon, sink: Sink, tmp_path: Path) -> None:
    d = daemon
    d.start()
    ok = d.cli("status", check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for check in ("database", "smtp listener", "web listener", "inbox", "outbox"):
        assert re.search(rf"{check}\s+│ ok", ok.stdout), ok.stdout
    assert "at revision" in ok.stdout and "220 " in ok.stdout and "200 OK" in ok.stdout
    assert ok.stdout.rstrip().endswith("healthy")

    d.smtp(f"create@{DOMAIN}", BROKEN, ORGANIZER)
    wait_until(lambda: "failed" in d.cli("inbox", "list", "--status", "failed").stdout)
    bad = d.cli("status", check=False)
    assert bad.returncode == 1
    assert re.search(r"inbox\s+│ FAIL\s+│ 1 failed in the last hour", bad.stdout), bad.stdout
    assert "unhealthy: inbox" in bad.stdout

    assert d.stop() == 0
    down = d.cli("status", "--timeout", "2", check=False)
    assert down.returncode == 1
    assert re.search(r"smtp listener\s+│ FAIL\s+│ 127.0.0.1:\d+: cannot connect", down.stdout)
    assert re.search(r"web listener\s+│ FAIL", down.stdout)
    assert re.search(r"database\s+│ ok", down.stdout)

    env = {**d.env, "CISERVER_SERVER__STATE_DIR": str(tmp_path / "nothing")}
    none = subprocess.run([*CISERVER, "status", "--timeout", "1"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert none.returncode == 1 and "no database file" in none.stdout
    assert not (tmp_path / "nothing" / "ciserver.db").exists()  # status creates nothing


# --------------------------------------------------------------------------------------------
# ciserver db backup


def test_backup_while_the_daemon_writes(daemon: Daemon, tmp_path: Path) -> None:
    d = daemon
    d.start()
    stop = threading.Event()
    sent: list[int] = []
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        i = 0
        try:
            while not stop.is_set():
                # A session takes at most 100 commands (smtp.py): 30 messages, then another.
                with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=30) as client:
                    for _ in range(30):
                        if stop.is_set():
                            break
                        i += 1
                        client.sendmail(ORGANIZER, [f"create@{DOMAIN}"],
                                        f"From: {ORGANIZER}\r\nSubject: note {n}.{i}\r\n"
                                        f"Message-ID: <n{n}.{i}@team.example>\r\n\r\n"
                                        f"{'no calendar here ' * 40}\r\n".encode())
                        sent.append(1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    backups = []
    try:
        wait_until(lambda: len(sent) >= 30)
        for n in range(3):
            target = tmp_path / f"backup-{n}.db"
            result = d.cli("db", "backup", str(target))
            assert f"to {target}" in result.stdout and "schema revision" in result.stdout
            assert "secret_key" in result.stdout  # the other thing to keep
            backups.append(target)
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors  # no write of the daemon was refused meanwhile
    counts = []
    for target in backups:
        assert target.stat().st_mode & 0o077 == 0  # only its owner reads it
        conn = sqlite3.connect(target)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone()
        counts.append(conn.execute("SELECT count(*) FROM inbox").fetchone()[0])
        conn.close()
        assert not list(tmp_path.glob(f".{target.name}*"))  # no partial file left
    assert 0 < counts[0] <= counts[1] <= counts[2] <= len(sent), (counts, len(sent))
    assert "could not store" not in d.log.read_text()

    # Never overwrite.
    before = backups[0].read_bytes()
    again = d.cli("db", "backup", str(backups[0]), check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    assert backups[0].read_bytes() == before

    # The copy is a database ciserver opens as it is.
    env = {**d.env, "CISERVER_DATABASE__URL": f"sqlite+aiosqlite:///{backups[2]}"}
    listed = subprocess.run([*CISERVER, "inbox", "list", "--limit", "1"], env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and ORGANIZER in listed.stdout, listed.stdout + listed.stderr
    assert d.stop() == 0


def test_backup_of_postgresql_explains_pg_dump(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CISERVER_")}
    env["CISERVER_DATABASE__URL"] = "postgresql+asyncpg://ciserver:s3cret@db.example:5432/inv"
    env["CISERVER_SERVER__STATE_DIR"] = str(tmp_path)
    result = subprocess.run([*CISERVER, "db", "backup", str(tmp_path / "x.dump")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert (f"pg_dump --format=custom --file={tmp_path / 'x.dump'} "
            "'postgresql://ciserver@db.example:5432/inv'") in result.stderr
    assert "pg_restore" in result.stderr and "s3cret" not in result.stdout + result.stderr
    assert not (tmp_path / "x.dump").exists()


@pytest.mark.parametrize("busy", ["web", "smtp"])
def test_a_busy_port_is_one_clear_line(tmp_path: Path, busy: str) -> None:
    """`serve` with a listen address someone else holds: a one-line error naming it, exit 1,
    no traceback; the other port is not left bound."""
    import socket

    holder = socket.create_server(("127.0.0.1", 0))
    taken = f"127.0.0.1:{holder.getsockname()[1]}"
    other = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CISERVER_")}
    env.update({"CISERVER_SERVER__STATE_DIR": str(tmp_path), "CISERVER_SERVER__DOMAIN": DOMAIN,
                "CISERVER_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'c.db'}",
                "CISERVER_WEB__LISTEN": taken if busy == "web" else other,
                "CISERVER_SMTP__LISTEN": taken if busy == "smtp" else other})
    try:
        result = subprocess.run([*CISERVER, "serve"], env=env, capture_output=True, text=True,
                                timeout=60)
    finally:
        holder.close()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert "Error: cannot start" in result.stderr and taken in result.stderr, result.stderr
    with socket.create_server(("127.0.0.1", int(other.rpartition(":")[2]))):
        pass  # free again
