"""`ciserver queue list|retry|purge` as an operator runs them: the real click CLI, a config
file (or CISERVER_* environment), a SQLite database made by `ciserver db upgrade`, and a
queue filled by real deliveries to a real SMTP sink."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import select

from ciserver import config as config_mod
from ciserver import relay
from ciserver.cli import main
from ciserver.services import events, outbox, subscriptions
from ciserver.services.context import Services
from ciserver.store.models import OutboxItem, Subscription

from .conftest import DOMAIN, ORGANIZER, Sink

START = datetime(2030, 6, 1, 23, 0, tzinfo=UTC)

# Which state each address ends up in (see ``queue`` below).
OK, GONE, BAD, SLOW, BUSY, LEAVES = ("ok@example.com", "gone@example.com", "bad@example.org",
                                     "slow@example.net", "busy@example.net",
                                     "leaves@example.com")


@dataclass
class Queue:
    config: Path
    env: dict[str, str | None]  # for CliRunner: None unsets a variable
    ids: dict[str, int]  # address -> outbox item id

    def cli(self, *args: str, use_env: bool = False) -> Result:
        runner = CliRunner()
        argv = list(args) if use_env else ["-c", str(self.config), *args]
        return runner.invoke(main, argv, env=self.env, catch_exceptions=False)

    def load(self) -> config_mod.Config:
        return config_mod.load(self.config, {k: v for k, v in self.env.items() if v is not None})

    def states(self) -> dict[str, tuple[str, int]]:
        """address -> (state, attempts) of every item still in the queue."""

        async def fn() -> dict[str, tuple[str, int]]:
            svc = Services.open(self.load())
            try:
                async with svc.sessions() as session:
                    rows = (await session.execute(select(OutboxItem))).scalars().all()
                    return {r.rcpt_to: (r.state, r.attempts) for r in rows}
            finally:
                await svc.close()

        return asyncio.run(fn())

    def drain(self) -> int:
        async def fn() -> int:
            svc = Services.open(self.load())
            try:
                return await relay.Relay(svc).drain()
            finally:
                await svc.close()

        return asyncio.run(fn())


def _base_env() -> dict[str, str | None]:
    # The operator's shell must not leak into the test; COLUMNS keeps rich's tables unwrapped.
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("CISERVER_")}
    env["COLUMNS"] = "250"
    return env


@pytest.fixture
def queue(tmp_path: Path, sink: Sink) -> Iterator[Queue]:
    """A database upgraded by the CLI, with one outbox item in each state:
    sent (ok), failed 5xx (gone, bad), deferred 4xx (slow), being sent (busy), cancelled
    (leaves)."""
    db_path = tmp_path / "queue.db"
    cfg_file = tmp_path / "ciserver.toml"
    cfg_file.write_text(
        f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'secret_key = "test-secret"\npublic_url = "https://{DOMAIN}"\n'
        f'[database]\nurl = "sqlite+aiosqlite:///{db_path}"\n'
        f'[relay]\nsmarthost = "{sink.host}:{sink.port}"\ntls = "none"\nretry_base = 600\n'
        f'[organizers]\nallow = ["{ORGANIZER}"]\n')
    q = Queue(cfg_file, _base_env(), {})
    up = q.cli("db", "upgrade")
    assert up.exit_code == 0, up.output
    assert "database is at revision" in up.output

    sink.answers[GONE] = ["550 5.1.1 <gone@example.com>: mailbox is gone"]
    sink.answers[BAD] = ["550 5.1.1 <bad@example.org>: no such user"]
    sink.answers[SLOW] = ["451 4.4.1 try later"]

    async def fill() -> dict[str, int]:
        svc = Services.open(q.load())
        try:
            async with svc.sessions.begin() as session:
                event = await events.create_via_api(
                    svc, session, organizer=ORGANIZER, organizer_name="Zach Lowe",
                    summary="Knicks vs Celtics", start=START, end=START + timedelta(hours=3))
                for addr in (OK, GONE, BAD, SLOW, LEAVES):
                    await subscriptions.invite(svc, session, event, addr, source="api")
                leaving = (await session.execute(select(Subscription).where(
                    Subscription.email == LEAVES))).scalar_one()
                await subscriptions.stop(svc, session, leaving, "unsubscribed")
            await relay.Relay(svc).drain()
            async with svc.sessions.begin() as session:
                await subscriptions.invite(svc, session, event, BUSY, source="api")
            claimed = await outbox.claim(svc, 10)  # a worker is sending it right now
            assert len(claimed) == 1
            async with svc.sessions() as session:
                rows = (await session.execute(select(OutboxItem))).scalars().all()
                return {r.rcpt_to: r.id for r in rows}
        finally:
            await svc.close()

    q.ids = asyncio.run(fill())
    assert q.states() == {OK: ("sent", 1), GONE: ("failed", 1), BAD: ("failed", 1),
                          SLOW: ("pending", 1), BUSY: ("sending", 1),
                          LEAVES: ("cancelled", 0)}
    assert [m.rcpt_tos for m in sink.messages] == [[OK]]
    sink.clear()
    yield q


def _rows(output: str) -> set[str]:
    """The recipient addresses named in a table."""
    return {a for a in (OK, GONE, BAD, SLOW, BUSY, LEAVES) if a in output}


# --------------------------------------------------------------------------------------------
# list


def test_queue_list_shows_depth_and_items(queue: Queue) -> None:
    r = queue.cli("queue", "list")
    assert r.exit_code == 0, r.output
    depth = r.output.splitlines()[0]
    assert depth.startswith("depth: ")
    counts = dict(part.rsplit(" ", 1) for part in depth[len("depth: "):].split(", "))
    assert counts == {"sent": "1", "failed": "2", "pending": "1", "sending": "1",
                      "cancelled": "1"}
    assert _rows(r.output) == {OK, GONE, BAD, SLOW, BUSY, LEAVES}
    assert "550 5.1.1 <bad@example.org>: no such user" in r.output
    assert "451 4.4.1 try later" in r.output

    failed = queue.cli("queue", "list", "--state", "failed")
    assert failed.exit_code == 0 and _rows(failed.output) == {GONE, BAD}

    net = queue.cli("queue", "list", "--domain", "Example.NET")
    assert net.exit_code == 0 and _rows(net.output) == {SLOW, BUSY}


def test_queue_list_from_the_environment_alone(queue: Queue, tmp_path: Path) -> None:
    """Every key settable as CISERVER_SECTION__KEY: no config file at all."""
    cfg = queue.load()
    queue.env.update({
        "CISERVER_SERVER__DOMAIN": DOMAIN,
        "CISERVER_SERVER__STATE_DIR": str(tmp_path / "state"),
        "CISERVER_SERVER__SECRET_KEY": "test-secret",
        "CISERVER_DATABASE__URL": cfg.database.url,
    })
    r = queue.cli("queue", "list", "--state", "pending", use_env=True)
    assert r.exit_code == 0, r.output
    assert _rows(r.output) == {SLOW}


def test_queue_commands_refuse_an_unmigrated_database(tmp_path: Path) -> None:
    env = _base_env()
    env["CISERVER_DATABASE__URL"] = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    env["CISERVER_SERVER__STATE_DIR"] = str(tmp_path / "state")
    r = CliRunner().invoke(main, ["queue", "list"], env=env)
    assert r.exit_code == 1
    assert "ciserver db upgrade" in r.output


# --------------------------------------------------------------------------------------------
# retry


def test_queue_retry_by_id_sends_again(queue: Queue, sink: Sink) -> None:
    r = queue.cli("queue", "retry", str(queue.ids[GONE]))
    assert r.exit_code == 0, r.output
    assert "1 item(s) will be sent again" in r.output
    states = queue.states()
    assert states[GONE] == ("pending", 0)
    assert states[BAD] == ("failed", 1)  # untouched
    # The sink's one 550 answer for gone@ was used up: this time it is accepted.
    assert queue.drain() == 1
    assert [m.rcpt_tos for m in sink.messages] == [[GONE]]
    assert queue.states()[GONE] == ("sent", 1)


def test_queue_retry_all_failed(queue: Queue, sink: Sink) -> None:
    r = queue.cli("queue", "retry", "--state", "failed")
    assert r.exit_code == 0, r.output
    assert "2 item(s) will be sent again" in r.output
    states = queue.states()
    assert states[GONE] == states[BAD] == ("pending", 0)
    assert states[OK] == ("sent", 1) and states[BUSY] == ("sending", 1)
    assert states[SLOW] == ("pending", 1)  # not failed: keeps its own schedule
    queue.drain()
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted([GONE, BAD])


def test_queue_retry_defaults_to_failed_items_of_one_domain(queue: Queue) -> None:
    r = queue.cli("queue", "retry", "--domain", "example.org")
    assert r.exit_code == 0, r.output
    assert "1 item(s) will be sent again" in r.output
    states = queue.states()
    assert states[BAD] == ("pending", 0)
    assert states[GONE] == ("failed", 1)


# --------------------------------------------------------------------------------------------
# purge


def test_queue_purge_refuses_without_a_filter(queue: Queue) -> None:
    r = queue.cli("queue", "purge")
    assert r.exit_code == 2
    assert "purging everything is refused" in r.output
    assert len(queue.states()) == 6


def test_queue_purge_never_removes_an_item_being_sent(queue: Queue) -> None:
    for args in (["--state", "sending"], [str(queue.ids[BUSY])]):
        r = queue.cli("queue", "purge", *args)
        assert r.exit_code == 0, r.output
        assert "0 item(s) purged" in r.output
    r = queue.cli("queue", "purge", "--domain", "example.net")
    assert r.exit_code == 0 and "1 item(s) purged" in r.output
    states = queue.states()
    assert SLOW not in states
    assert states[BUSY] == ("sending", 1)


def test_queue_purge_by_state_and_by_id(queue: Queue) -> None:
    r = queue.cli("queue", "purge", "--state", "failed")
    assert r.exit_code == 0 and "2 item(s) purged" in r.output
    assert GONE not in queue.states() and BAD not in queue.states()
    r = queue.cli("queue", "purge", str(queue.ids[LEAVES]), str(queue.ids[OK]))
    assert r.exit_code == 0 and "2 item(s) purged" in r.output
    assert set(queue.states()) == {SLOW, BUSY}
    listing = queue.cli("queue", "list")
    assert listing.output.splitlines()[0] in ("depth: pending 1, sending 1",
                                              "depth: sending 1, pending 1")


def test_queue_list_shows_age_and_state_per_domain(queue: Queue) -> None:
    r = queue.cli("queue", "list")
    assert r.exit_code == 0, r.output
    assert "oldest waiting:" in r.output
    assert "per destination domain" in r.output
    lines = {line.split("│")[1].strip(): line for line in r.output.splitlines()
             if line.count("│") > 5 and "example." in line.split("│")[1]}
    # example.org: one failed item, its error shown; example.net: one pending, one sending.
    assert "example.org" in lines and "550 5.1.1" in lines["example.org"]
    assert "example.net" in lines and "451 4.4.1" in lines["example.net"]
    net = [c.strip() for c in lines["example.net"].split("│")[1:-1]]
    assert net[1:4] == ["1", "1", "0"]


def test_mistyped_states_and_ids_are_refused(queue: Queue) -> None:
    """A state that does not exist, or an id that does not, is an error naming it (exit
    1 or 2), not an empty table or "0 item(s)" with exit 0."""
    for args in (("queue", "list", "--state", "bogus"), ("queue", "retry", "--state", "x"),
                 ("queue", "purge", "--state", "faild"), ("inbox", "list", "--status", "nope"),
                 ("status", "--timeout", "0")):
        r = queue.cli(*args)
        assert r.exit_code == 2 and "Invalid value" in r.output, (args, r.output)
    before = queue.states()
    for args, what in ((("queue", "retry", "99999"), "no queue item 99999"),
                       (("queue", "purge", str(queue.ids[GONE]), "99998"),
                        "no queue item 99998"),
                       (("inbox", "retry", "99997"), "no inbox message 99997")):
        r = queue.cli(*args)
        assert r.exit_code == 1 and what in r.output, (args, r.output)
    assert queue.states() == before  # nothing done, not even for the id that exists
    r = queue.cli("queue", "retry", str(queue.ids[GONE]))
    assert r.exit_code == 0 and "1 item(s) will be sent again" in r.output
