"""The hot write of public sign-ups on SQLite: a batch of subscriptions and their invites.

Why by hand, as for the inbox (sqlite_inbox.py): through SQLAlchemy and aiosqlite a batch
is six thread round trips and Core's per-row processing on the event loop's thread, which
also parses every HTTP request; with the sqlite3 module in one dedicated thread it is one
hand-off per batch (bench/web). PostgreSQL keeps the SQLAlchemy path
(services/signups.py). Rows must read back exactly as SQLAlchemy writes them: every public
sign-up test on SQLite writes here and reads through the ORM.

Only the common case is done here: addresses new to an event. A request naming an event that
is gone or cancelled, or an address subscribed before, is answered ``closed``/``missing`` or
left to the ORM path (``again``) untouched.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import datetime
from typing import Any, NamedTuple

from .sqlite_inbox import _value


class Item(NamedTuple):  # a tuple: one per public request (bench/web)
    event_ids: list[int]  # the events' row ids, in the order asked
    email: str
    name: str
    source: str
    origin: str


# Per item: ("ok", queued) | ("closed", row id of a cancelled event) | ("missing", row id)
# | ("again", 0): an address subscribed before: the ORM path re-checks and re-activates.
Result = tuple[str, int]

_INSERT_SUB = (
    "INSERT INTO subscriptions (event_id, email, domain, name, status, source, origin, "
    "forwarded_by, partstat, soft_bounces, created_at, updated_at) "
    "VALUES (?, ?, ?, ?, 'active', ?, ?, NULL, 'NEEDS-ACTION', 0, ?, ?)")
_INSERT_INVITES = (
    "INSERT INTO outbox (kind, subscription_id, wanted_sequence, mail_from, rcpt_to, "
    "rcpt_domain, state, attempts, queued_at, next_attempt_at, last_response, updated_at) "
    "SELECT 'invite', s.id, e.sequence, '', s.email, s.domain, 'pending', 0, ?, ?, '', ? "
    "FROM subscriptions s JOIN events e ON e.id = s.event_id WHERE s.id > ?")


def _marks(n: int) -> str:
    return ", ".join("?" for _ in range(n))


_local = threading.local()


class SqliteSignupWriter:
    """One batch per call, in a thread of the loop's default executor, on that thread's own
    connection to the database (kept in a thread-local: it goes when the executor's thread
    does, at the loop's end)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _connection(self) -> sqlite3.Connection:
        conns: dict[str, sqlite3.Connection] | None = getattr(_local, "conns", None)
        if conns is None:
            conns = _local.conns = {}
        conn = conns.get(self.path)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                                   check_same_thread=False)
            for pragma in ("foreign_keys=ON", "busy_timeout=30000", "synchronous=NORMAL"):
                conn.execute(f"PRAGMA {pragma}")
            conns[self.path] = conn
        return conn

    def _write(self, items: list[Item], now: datetime) -> list[Result]:
        return self._batch(self._connection(), items, now)

    def _batch(self, conn: sqlite3.Connection, items: list[Item], now: datetime
               ) -> list[Result]:
        stamp = _value(now)
        conn.execute("BEGIN IMMEDIATE")  # the one writer until COMMIT
        try:
            event_ids = sorted({i for item in items for i in item.event_ids})
            open_events = {row[0]: row[1] for row in conn.execute(
                f"SELECT id, status FROM events WHERE id IN ({_marks(len(event_ids))})",
                event_ids)}
            emails = sorted({item.email for item in items})
            known: set[tuple[int, str]] = set()
            for start in range(0, len(emails), 500):  # bound the statement's parameters
                chunk = emails[start:start + 500]
                known.update(conn.execute(
                    f"SELECT event_id, email FROM subscriptions WHERE event_id IN "
                    f"({_marks(len(event_ids))}) AND email IN ({_marks(len(chunk))})",
                    [*event_ids, *chunk]))
            results: list[Result] = []
            rows: list[tuple[Any, ...]] = []
            for item in items:
                gone = next((i for i in item.event_ids if i not in open_events), None)
                closed = next((i for i in item.event_ids if open_events.get(i) == "cancelled"),
                              None)
                if gone is not None:
                    results.append(("missing", gone))
                elif closed is not None:
                    results.append(("closed", closed))
                elif any((i, item.email) in known for i in item.event_ids):
                    results.append(("again", 0))
                else:
                    for event_id in item.event_ids:
                        known.add((event_id, item.email))  # a repeat in this batch: again
                        rows.append((event_id, item.email, item.email.rpartition("@")[2],
                                     item.name, item.source, item.origin, stamp, stamp))
                    results.append(("ok", 1))
            if rows:
                before = conn.execute("SELECT coalesce(max(id), 0) FROM subscriptions"
                                      ).fetchone()[0]
                conn.executemany(_INSERT_SUB, rows)
                conn.execute(_INSERT_INVITES, (stamp, stamp, stamp, before))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    async def write(self, items: list[Item], now: datetime) -> list[Result]:
        return await asyncio.get_running_loop().run_in_executor(None, self._write, items, now)
