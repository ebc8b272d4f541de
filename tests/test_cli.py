"""The `ciserver` command line, run as a user runs it (a real process, a config file)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import DOMAIN, ORGANIZER
from .organizer_mail import organizer_mail
from .test_e2e import START

CISERVER = [sys.executable, "-m", "ciserver"]


class Cli:
    def __init__(self, tmp_path: Path) -> None:
        self.config = tmp_path / "c.toml"
        self.config.write_text(
            f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
            f'[organizers]\nallow = ["{ORGANIZER}"]\n'
            '[relay]\nsmarthost = "127.0.0.1:9"\ntls = "none"\n')
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CISERVER_")}
        self.tmp = tmp_path

    def __call__(self, *args: str, code: int = 0, stdin: str | None = None
                 ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*CISERVER, "-c", str(self.config), *args], env=self.env,
                           capture_output=True, text=True, timeout=60, input=stdin)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        return r


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    assert "revision" in c("db", "upgrade").stdout
    return c


def drain_inbox(cli: Cli) -> None:
    """Process the inbox the way the daemon would (nothing runs the daemon in these tests),
    in a process of its own, with the CLI's configuration."""
    subprocess.run([sys.executable, "-c", (
        "import asyncio\n"
        "from ciserver import config\n"
        "from ciserver.services.context import Services\n"
        "from ciserver.services import inbox\n"
        f"cfg = config.load({str(cli.config)!r})\n"
        "async def main():\n"
        "    svc = Services.open(cfg)\n"
        "    await inbox.drain(svc)\n"
        "    await svc.close()\n"
        "asyncio.run(main())\n")], check=True, env=cli.env, timeout=60)


def test_needs_upgrade_first(tmp_path: Path) -> None:
    c = Cli(tmp_path)
    r = c("events", "list", code=1)
    assert "ciserver db upgrade" in r.stderr


def test_config_errors_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nlisten = "nope"\n')
    r = subprocess.run([*CISERVER, "-c", str(bad), "events", "list"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert f'{bad}: [smtp] listen: expected "host:port"' in r.stderr


def test_keys_invites_reports_and_inbox(cli: Cli) -> None:
    key = cli("apikey", "create", "--organizer", ORGANIZER).stdout.strip().splitlines()[-1]
    assert key.startswith("cis_") and " " not in key
    assert "--organizer" in cli("apikey", "create", code=2).stderr
    listing = cli("apikey", "list").stdout
    assert key[:12] in listing
    # The organizer's invite, fed through the inbox as saved mail.
    eml = cli.tmp / "invite.eml"
    eml.write_bytes(organizer_mail("apple", uid="apple-uid-1", start=START,
                                   end=START.replace(hour=3), summary="Cup final"))
    assert "stored as inbox message" in cli("inbox", "import", str(eml), "--to",
                                            f"create@{DOMAIN}").stdout
    bad = cli.tmp / "bad.eml"
    bad.write_bytes(b"From: zach@team.example\r\nSubject: x\r\nContent-Type: text/calendar\r\n\r\n"
                    b"BEGIN:VCALENDAR\r\nBEGIN:VEVENT\r\nDTSTART:garbage\r\nUID:b\r\n"
                    b"END:VCALENDAR\r\n")
    cli("inbox", "import", str(bad), "--to", f"create@{DOMAIN}")
    # Nothing runs the daemon here: process the inbox the way the daemon would.
    drain_inbox(cli)
    inbox_list = cli("inbox", "list").stdout
    assert "done" in inbox_list and "failed" in inbox_list
    shown = cli("inbox", "show", "2").stdout
    assert "status:      failed" in shown and "error:" in shown
    assert cli("inbox", "show", "1", "--raw").stdout.startswith("From: Zach Lowe")
    assert "1 message(s) queued" in cli("inbox", "retry", "2").stdout
    assert "no inbox message 99" in cli("inbox", "show", "99", code=1).stderr

    events = cli("events", "list").stdout
    assert "Cup final" in events
    fans = cli.tmp / "fans.csv"
    fans.write_text("email,name\nfan1@example.com,One\nFan2@Example.com,Two\n")
    assert "2 invite(s) queued" in cli("invite", "apple-uid-1", "--csv", str(fans)).stdout
    assert "1 already had it" in cli("invite", "apple-uid-1", "--email",
                                     "fan1@example.com").stdout
    r = cli("invite", "apple-uid-1", "--email", "not-an-address", code=1)
    assert "not a valid email address" in r.stderr
    assert "no event 'nope'" in cli("report", "event", "nope", code=1).stderr

    out = cli("report", "event", "apple-uid-1", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["email"] for r in rows] == ["fan1@example.com", "fan2@example.com"]
    assert all(r["rsvp"] == "" and r["event_uid"] == "apple-uid-1" for r in rows)
    assert "fan2@example.com" in cli("report", "organizer", ORGANIZER).stdout
    domain_csv = cli("report", "domain", "team.example", "--format", "csv", "--bom").stdout
    assert domain_csv.startswith("\ufeffevent_uid,")
    assert "queued for delivery to zach@team.example" in cli("report", "event", "apple-uid-1",
                                                            "--send").stdout
    assert "depth:" in cli("queue", "list").stdout


def test_invite_csv_in_any_character_set_and_bad_files_without_traceback(cli: Cli) -> None:
    """`invite --csv` reads a file as the API reads an upload (BOM, else UTF-8, else
    Windows-1252; header names; "," ";" tab) and refuses a bad one with a message naming the
    file, never a traceback."""
    eml = cli.tmp / "invite.eml"
    eml.write_bytes(organizer_mail("apple", uid="csv-uid-1", start=START,
                                   end=START.replace(hour=3), summary="Cup final"))
    cli("inbox", "import", str(eml), "--to", f"create@{DOMAIN}")
    drain_inbox(cli)
    latin = cli.tmp / "latin.csv"
    latin.write_bytes("E-mail;First name;Last name\nlat@example.com;Jos\u00e9;Ni\u00f1o\n"
                      .encode("cp1252"))
    assert "1 invite(s) queued" in cli("invite", "csv-uid-1", "--csv", str(latin)).stdout
    wide = cli.tmp / "wide.csv"
    wide.write_bytes("email,name\nwide@example.com,Zo\u00eb\n".encode("utf-16"))
    assert "1 invite(s) queued" in cli("invite", "csv-uid-1", "--csv", str(wide)).stdout
    out = cli("report", "event", "csv-uid-1", "--format", "csv").stdout
    names = {r["email"]: r["name"] for r in csv.DictReader(io.StringIO(out))}
    assert names["lat@example.com"] == "Jos\u00e9 Ni\u00f1o"
    assert names["wide@example.com"] == "Zo\u00eb"
    # bad files: a clear message naming the file, exit 1, no traceback
    broken = cli.tmp / "broken.csv"
    broken.write_bytes(b"\xff\xfe\x00")
    empty = cli.tmp / "empty.csv"
    empty.write_bytes(b"email\n")
    nameless = cli.tmp / "nameless.csv"
    nameless.write_bytes(b"Name,Phone\nAnn,1\n")
    for path, message in ((cli.tmp / "missing.csv", "cannot read it (No such file"),
                          (cli.tmp, "cannot read it"),
                          (broken, "byte order mark but is not valid UTF-16"),
                          (empty, "no customers in it"),
                          (nameless, "line 1: the header row has no email column")):
        r = cli("invite", "csv-uid-1", "--csv", str(path), code=1)
        assert f"--csv {path}: " in r.stderr and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    r = cli("invite", "csv-uid-1", "--csv", "-", stdin="stdin@example.com,In\n")
    assert "1 invite(s) queued" in r.stdout
