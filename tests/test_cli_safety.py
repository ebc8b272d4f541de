"""Stored text is data: the CLI shows it literally (no rich markup, no terminal escapes),
names the event it means (organizers may share a UID), and the mail it writes is labelled
and headed safely."""

from __future__ import annotations

import asyncio
import email
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select, update

from ciserver import config as config_mod
from ciserver.cli import main
from ciserver.itip import content as content_mod
from ciserver.itip.build import header_safe
from ciserver.services import apikeys, events, inbox, notify, reports, subscriptions
from ciserver.services.context import Services
from ciserver.store.models import Event, InboxMessage, OutboxItem, RsvpHistory, Subscription

from .conftest import DOMAIN, ORGANIZER

T = TypeVar("T")
START = datetime(2030, 6, 1, 23, 0, tzinfo=UTC)
CO_ORGANIZER = "amy@nba.example"

# What the public (invite requests, Origin headers, mail) and organizers can store.
NAME = "[/bad]"
SUMMARY = "[link=https://evil.example]x[/link] <b>"
ORIGIN = "button [red]x"
COMMENT = "[/comment] see [bold]me"
MAIL_FROM = "[/from]@sender.example"
LAST_ERROR = "451 4.7.1 [/err] [blink]later"
LABEL = "[/label]"
ESC = "\x1b"


@dataclass
class Site:
    config: Path
    env: dict[str, str | None]

    def cli(self, *args: str) -> Result:
        return CliRunner().invoke(main, ["-c", str(self.config), *args], env=self.env)

    def ok(self, *args: str) -> str:
        r = self.cli(*args)
        assert r.exit_code == 0, (args, r.output, r.exception)
        assert ESC not in r.output, args  # no terminal escape from stored text
        return r.output

    def run(self, fn: Callable[[Services], Awaitable[T]]) -> T:
        cfg = config_mod.load(self.config, {k: v for k, v in self.env.items() if v is not None})

        async def main() -> T:
            svc = Services.open(cfg)
            try:
                return await fn(svc)
            finally:
                await svc.close()

        return asyncio.run(main())


@pytest.fixture
def site(tmp_path: Path) -> Site:
    cfg = tmp_path / "ciserver.toml"
    cfg.write_text(
        f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'secret_key = "test-secret"\npublic_url = "https://{DOMAIN}"\n'
        f'[database]\nurl = "sqlite+aiosqlite:///{tmp_path / "c.db"}"\n'
        '[relay]\nsmarthost = "127.0.0.1:9"\ntls = "none"\n'
        f'[organizers]\nallow = ["{ORGANIZER}", "*@nba.example"]\n')
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CISERVER_")}
    env["COLUMNS"] = "250"
    s = Site(cfg, env)
    s.ok("db", "upgrade")
    return s


async def _new_event(svc: Services, organizer: str, uid: str, summary: str) -> Event:
    async with svc.sessions.begin() as session:
        return await events.create(
            svc, session, organizer=organizer, organizer_name="", organizer_uid=uid,
            content=content_mod.new_content(summary=summary, start=START,
                                            end=START + timedelta(hours=3)),
            origin="mail")


@pytest.fixture
def hostile(site: Site) -> str:
    """One event full of hostile text; returns its API id."""

    async def fill(svc: Services) -> str:
        async with svc.sessions.begin() as session:
            event = await events.create_via_api(
                svc, session, organizer=ORGANIZER, organizer_name="Zach", summary="Cup final",
                start=START, end=START + timedelta(hours=3))
            for address, name in (("fan@example.com", NAME), ("fan2@example.org", "Two")):
                await subscriptions.invite(svc, session, event, address, name, source="page",
                                           origin=ORIGIN + f" {ESC}]8;;https://evil{ESC}\\")
            # An organizer's SUMMARY can carry anything, escapes included.
            event.summary = f"{SUMMARY} {ESC}[31mred{ESC}[0m"
            await session.flush()
            sub = (await session.execute(select(Subscription).where(
                Subscription.email == "fan@example.com"))).scalar_one()
            session.add(RsvpHistory(
                subscription_id=sub.id, occurrence="", partstat="ACCEPTED", sequence=0,
                stamp=START, comment=COMMENT + f"{ESC}[2J", outcome="applied",
                received_at=START - timedelta(days=1)))
            await session.execute(update(OutboxItem).values(
                state="pending", last_response=LAST_ERROR + f"{ESC}[5m"))
            pid = event.public_id
        msg_id = await inbox.accept(svc, b"From: x@y\r\nX-Evil: \x1b[2J\r\n\r\nbody\r\n",
                                    MAIL_FROM + f"{ESC}[2J", [f"create@{DOMAIN}"], source="cli")
        async with svc.sessions.begin() as session:
            await session.execute(update(InboxMessage).where(InboxMessage.id == msg_id).values(
                status="failed", error=f"[/e] {ESC}[31mboom\nsecond line"))
        await apikeys.create(svc, organizer=ORGANIZER, label=LABEL + f"{ESC}[8m")
        return pid

    return site.run(fill)


# --------------------------------------------------------------------------------------------
# 1. Stored text is shown as it is


def test_reports_show_markup_literally(site: Site, hostile: str) -> None:
    for args in (["report", "event", hostile], ["report", "event", hostile, "--history"],
                 ["report", "organizer", ORGANIZER], ["report", "domain", "team.example"]):
        out = site.ok(*args)
        assert SUMMARY in out, args
        assert "button [red]x" in out, args
        if "--history" in args:
            assert COMMENT in out
        else:
            assert NAME in out, args


def test_listings_show_markup_literally(site: Site, hostile: str) -> None:
    assert SUMMARY in site.ok("events", "list")
    out = site.ok("inbox", "list")
    assert MAIL_FROM in out and "[/e]" in out
    out = site.ok("inbox", "show", "1")
    assert MAIL_FROM in out and "[/e]" in out and "second line" in out
    assert LAST_ERROR in site.ok("queue", "list")
    assert LABEL in site.ok("apikey", "list")


def test_status_title_and_details_are_literal(tmp_path: Path) -> None:
    where = tmp_path / "[red]conf"
    where.mkdir()
    cfg = where / "c.toml"
    cfg.write_text(f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{where / "state"}"\n'
                   f'[smtp]\nlisten = "127.0.0.1:9"\n[web]\nlisten = "127.0.0.1:9"\n')
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CISERVER_")}
    env["COLUMNS"] = "400"
    r = CliRunner().invoke(main, ["-c", str(cfg), "status", "--timeout", "1"], env=env)
    assert r.exit_code == 1, r.output  # nothing runs: unhealthy, but no MarkupError
    assert isinstance(r.exception, SystemExit)
    assert "[red]conf" in r.output and "unhealthy" in r.output


# --------------------------------------------------------------------------------------------
# 2. Organizers sharing a UID


@pytest.fixture
def shared(site: Site) -> tuple[str, str]:
    async def fill(svc: Services) -> tuple[str, str]:
        one = await _new_event(svc, ORGANIZER, "shared-uid", "Zach's game")
        two = await _new_event(svc, CO_ORGANIZER, "shared-uid", "Amy's game")
        return one.public_id, two.public_id

    return site.run(fill)


def test_find_is_scoped_inside_the_query(site: Site, shared: tuple[str, str]) -> None:
    one, two = shared

    async def check(svc: Services) -> None:
        async with svc.sessions() as session:
            # Unscoped: the first; scoped to an organizer or a domain: theirs.
            assert (await events.find(session, "shared-uid")).public_id == one
            assert (await events.find(session, "shared-uid",
                                      organizer="Amy@NBA.example")).public_id == two
            assert (await events.find(session, "shared-uid",
                                      domain="NBA.example")).public_id == two
            assert (await events.find(session, "shared-uid",
                                      domain="team.example")).public_id == one
            assert (await events.find(session, one, organizer=ORGANIZER)).public_id == one
            with pytest.raises(events.NotFound):
                await events.find(session, one, organizer=CO_ORGANIZER)
            with pytest.raises(events.NotFound):
                await events.find(session, "shared-uid", domain="other.example")
            with pytest.raises(events.Ambiguous) as info:
                await events.find(session, "shared-uid", unique=True)
            assert sorted(e.public_id for e in info.value.candidates) == sorted([one, two])
            assert not isinstance(info.value, events.NotFound)
            # API ids stay unambiguous, even when another organizer uses one as a UID.
            assert (await events.find(session, two, unique=True)).public_id == two

        await _new_event(svc, ORGANIZER, two, "Named like Amy's id")
        async with svc.sessions() as session:
            assert (await events.find(session, two, unique=True)).public_id == two
            assert (await events.find(session, two.upper(), unique=True)).public_id == two

    site.run(check)


def test_cli_refuses_an_ambiguous_uid(site: Site, shared: tuple[str, str]) -> None:
    one, two = shared
    for args in (["report", "event", "shared-uid"],
                 ["invite", "shared-uid", "--email", "fan@example.com"]):
        r = site.cli(*args)
        assert r.exit_code == 1, (args, r.output)
        assert "shared-uid" in r.output and "matches 2 events" in r.output
        for pid, organizer in ((one, ORGANIZER), (two, CO_ORGANIZER)):
            assert pid in r.output and organizer in r.output
    assert "Amy's game" in site.ok("report", "event", two)
    assert "1 invite(s) queued" in site.ok("invite", two, "--email", "fan@example.com")


# --------------------------------------------------------------------------------------------
# 5. A bad address in a CSV is named with its line


def test_invite_csv_names_the_line_of_a_bad_address(site: Site, tmp_path: Path) -> None:
    pid = site.run(lambda svc: _new_event(svc, ORGANIZER, "csv-uid", "Cup")).public_id
    fans = tmp_path / "fans.csv"
    fans.write_text('email,name\nfan1@example.com,One\n\n"fan2@example.com","Two\nlines"\n'
                    "not-an-address,Bad\nfan3@example.com,Three\n", encoding="utf-8")
    r = site.cli("invite", pid, "--csv", str(fans))
    assert r.exit_code == 1, r.output
    assert "line 6" in r.output and "'not-an-address'" in r.output
    assert "not a valid email address" in r.output

    async def count(svc: Services) -> int:
        async with svc.sessions() as session:
            return int((await session.execute(
                select(func.count(Subscription.id)))).scalar_one())

    assert site.run(count) == 0  # all or nothing
    fans.write_text("fan1@example.com,One\nfan2@example.com\n", encoding="utf-8")
    assert "2 invite(s) queued" in site.ok("invite", pid, "--csv", str(fans))
    fans.write_text("email\nfan4@example.com\n" + "x" * 200_000 + "\n", encoding="utf-8")
    r = site.cli("invite", pid, "--csv", str(fans))
    assert r.exit_code == 1 and "not a CSV file (line 3" in r.output, r.output


# --------------------------------------------------------------------------------------------
# 3. Auto-Submitted: auto-replied only for answers to a message (RFC 3834)


async def test_auto_submitted_says_whether_a_notice_answers_a_message(
        sqlite_svc: Services) -> None:
    svc = sqlite_svc

    def header(**kw: Any) -> str | None:
        raw = notify.compose(svc, to=ORGANIZER, subject="s", text="t\n", **kw)
        return email.message_from_bytes(raw)["Auto-Submitted"]

    assert header() == "auto-generated"  # reports, digests, sign-in links
    assert header(attachment=("r.csv", b"a,b\r\n", "text/csv")) == "auto-generated"
    assert header(in_reply_to="<m1@team.example>") == "auto-replied"  # to the organizer's mail
    assert header(reply_to="fan@example.com") == "auto-replied"  # a customer's mail forwarded
    assert header(sender=f"rsvp+abc@{DOMAIN}") == "auto-replied"  # an iTIP answer to one
    assert header(in_reply_to="<m1@team.example>",
                  auto_submitted="auto-generated") == "auto-generated"
    with pytest.raises(ValueError, match="Auto-Submitted"):
        header(auto_submitted="no")

    async with svc.sessions.begin() as session:
        event = await events.create_via_api(
            svc, session, organizer=ORGANIZER, organizer_name="Zach", summary="Cup final",
            start=START, end=START + timedelta(hours=3))
    await reports.mail_report(svc, to=ORGANIZER, title="Cup final", event_id=event.id)
    async with svc.sessions() as session:
        (item,) = (await session.execute(select(OutboxItem))).scalars().all()
    assert item.raw is not None
    assert email.message_from_bytes(item.raw)["Auto-Submitted"] == "auto-generated"


# --------------------------------------------------------------------------------------------
# 4. header_safe: control characters separate words, never join them


@pytest.mark.parametrize(("text", "expected"), [
    ("Game\r\nBcc: x@evil.example", "Game Bcc: x@evil.example"),
    ("Game\nnight", "Game night"),
    ("a\x00\x01\x1bb", "a b"),
    ("a\tb\x7fc\x85d", "a b c d"),
    ("  Cup \r\n\t final  ", "Cup final"),
    ("\r\n", ""),
    ("Zürich — Final", "Zürich — Final"),
])
def test_header_safe_turns_control_runs_into_one_space(text: str, expected: str) -> None:
    assert header_safe(text) == expected
    assert header_safe(text, 3) == expected[:3]


@pytest.mark.parametrize("args", [("events", "list"), ("inbox", "list"), ("queue", "list"),
                                  ("db", "current"), ("report", "organizer", ORGANIZER)])
def test_reading_a_database_that_is_not_there_creates_nothing(tmp_path: Path,
                                                              args: tuple[str, ...]) -> None:
    """A mistyped [database] url: one error naming the path, and no empty SQLite file left
    behind for the next command to find."""
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CISERVER_")}
    env.update({"CISERVER_DATABASE__URL": f"sqlite+aiosqlite:///{tmp_path / 'typo.db'}",
                "CISERVER_SERVER__STATE_DIR": str(tmp_path / "state")})
    r = CliRunner().invoke(main, list(args), env=env)
    assert r.exit_code == 1 and f"no database at {tmp_path / 'typo.db'}" in r.output, r.output
    assert not (tmp_path / "typo.db").exists()
