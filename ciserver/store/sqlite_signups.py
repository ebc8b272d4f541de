"""The hot write of public sign-ups on SQLite: a batch of subscriptions and their invites.

Why by hand, as for the inbox (sqlite_inbox.py): through SQLAlchemy and aiosqlite a batch
is six thread round trips and Core's per-row processing on the event loop's thread, which
also parses every HTTP request; with the sqlite3 module in one dedicated thread it is one
hand-off per batch, and in the common case one SQL statement (see _INSERT_NEW: bench/web went
from 8,900 to 12,700 requests/s with it). PostgreSQL keeps the SQLAlchemy path
(services/signups.py). Rows must read back exactly as SQLAlchemy writes them: every public
sign-up test on SQLite writes here and reads through the ORM (tests/test_signup_writer.py).

Only the common case is done here: addresses new to an event. A request naming an event that
is gone or cancelled, or an address subscribed before, is answered ``closed``/``missing`` or
left to the ORM path (``again``) untouched.
"""

from __future__ import annotations

import asyncio
import json
import re
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


# Per item: ("ok", queued) | ("closed", row id of a cancelled event) | ("over", row id of
# an event whose end (a series: its last occurrence) has passed) | ("missing", row id)
# | ("again", 0): an address subscribed before: the ORM path re-checks and re-activates.
Result = tuple[str, int]

# A batch's rows go to SQLite as one JSON array, unpacked by json_each in SQL, and each invite
# is queued by a trigger: a batch of new addresses is then one statement, one sqlite3_step,
# run with the GIL released. With a statement per table and executemany's step per row, each
# step's return had to win the GIL back from the event loop's thread, busy parsing requests,
# and a batch took twice its CPU time in wall time; every caller in it waited that long
# (bench/web).
#
# The common case: every address new to its events, every event open. One INSERT ... SELECT
# that fails as a whole otherwise, and is then undone as a whole (a statement outside BEGIN
# is its own transaction): an address subscribed before breaks the UNIQUE (event_id, email)
# constraint, a gone or cancelled event gives a NULL event_id. Such a batch takes the
# careful path (_careful), which sorts the requests out in a transaction.
_INSERT_NEW = (
    "INSERT INTO subscriptions (event_id, email, domain, name, status, source, origin, "
    "forwarded_by, partstat, soft_bounces, created_at, updated_at) "
    "SELECT CASE WHEN e.status = 'cancelled' OR max(e.end_at, e.rsvp_until) < ? THEN NULL "
    "ELSE e.id END, "
    "json_extract(j.value, '$[1]'), json_extract(j.value, '$[2]'), "
    "json_extract(j.value, '$[3]'), 'active', json_extract(j.value, '$[4]'), "
    "json_extract(j.value, '$[5]'), NULL, 'NEEDS-ACTION', 0, ?, ? "
    "FROM json_each(?) j LEFT JOIN events e ON e.id = json_extract(j.value, '$[0]') "
    "ORDER BY j.key")
_INSERT_SUB = (
    "INSERT INTO subscriptions (event_id, email, domain, name, status, source, origin, "
    "forwarded_by, partstat, soft_bounces, created_at, updated_at) "
    "SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), "
    "json_extract(value, '$[2]'), json_extract(value, '$[3]'), 'active', "
    "json_extract(value, '$[4]'), json_extract(value, '$[5]'), NULL, 'NEEDS-ACTION', 0, ?, ? "
    "FROM json_each(?) ORDER BY key")
# TEMP: a trigger of this connection only; the ORM path queues its invites itself. (SQLite
# allows no schema name on the INSERT of a trigger; this private connection makes no temp
# table that could shadow outbox.)
_QUEUE_INVITES = (
    "CREATE TEMP TRIGGER IF NOT EXISTS signup_invite AFTER INSERT ON main.subscriptions "
    "BEGIN INSERT INTO outbox (kind, subscription_id, wanted_sequence, mail_from, rcpt_to, "
    "rcpt_domain, state, attempts, queued_at, next_attempt_at, last_response, updated_at) "
    "SELECT 'invite', NEW.id, e.sequence, '', NEW.email, NEW.domain, 'pending', 0, "
    "NEW.created_at, NEW.created_at, '', NEW.created_at FROM main.events e "
    "WHERE e.id = NEW.event_id; END")
# CROSS JOIN: the addresses outside, then the (event_id, email) index; a plain JOIN let the
# planner scan the event's every subscription instead.
_KNOWN = (
    "SELECT s.event_id, s.email FROM json_each(?) j CROSS JOIN subscriptions s "
    "ON s.email = j.value AND s.event_id = ?")
_OK: Result = ("ok", 1)
# What SQLite's JSON functions do not give back as sent: a NUL (the text ends there) and
# surrogate code points (no UTF-8 for them). The callers' checks (check_email, header_safe)
# keep both out; an item carrying one anyway is left to the ORM path, which refuses it.
_NOT_JSON_SAFE = re.compile(r"[\x00\ud800-\udfff]")


def available() -> bool:
    """Whether this SQLite has the JSON functions the writer uses (built in since 3.38, and
    in most builds before): without them sign-ups take the ORM path."""
    try:
        sqlite3.connect(":memory:").execute("SELECT value FROM json_each('[1]')").close()
    except sqlite3.Error:
        return False
    return True


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
            conn.execute(_QUEUE_INVITES)
            conns[self.path] = conn
        return conn

    def _write(self, items: list[Item], now: datetime) -> list[Result]:
        return self._batch(self._connection(), items, now)

    def _batch(self, conn: sqlite3.Connection, items: list[Item], now: datetime
               ) -> list[Result]:
        stamp = _value(now)
        rows = [(event_id, item.email, item.email.rpartition("@")[2], item.name, item.source,
                 item.origin) for item in items for event_id in item.event_ids]
        text = json.dumps(rows, ensure_ascii=False)
        if _NOT_JSON_SAFE.search(text):
            return self._careful(conn, items, stamp)
        try:
            conn.execute(_INSERT_NEW, (stamp, stamp, stamp, text))
            return [_OK] * len(items)
        except sqlite3.IntegrityError:
            return self._careful(conn, items, stamp)

    def _careful(self, conn: sqlite3.Connection, items: list[Item], stamp: str
                 ) -> list[Result]:
        conn.execute("BEGIN IMMEDIATE")  # the one writer until COMMIT
        try:
            event_ids = sorted({i for item in items for i in item.event_ids})
            # id -> "cancelled", "over" (its end has passed) or its status
            open_events = {row[0]: row[1] for row in conn.execute(
                f"SELECT id, CASE WHEN status != 'cancelled' AND max(end_at, rsvp_until) < ? "
                f"THEN 'over' ELSE status END FROM events "
                f"WHERE id IN ({_marks(len(event_ids))})", [stamp, *event_ids])}
            emails = json.dumps(sorted({item.email for item in items
                                        if not _NOT_JSON_SAFE.search(item.email)}))
            known: set[tuple[int, str]] = set()
            for event_id in event_ids:  # one statement per event, most batches have one
                known.update(conn.execute(_KNOWN, (emails, event_id)))
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
                elif (over := next((i for i in item.event_ids if open_events.get(i) == "over"),
                                   None)) is not None:
                    results.append(("over", over))
                elif (any((i, item.email) in known for i in item.event_ids)
                      or _NOT_JSON_SAFE.search(item.email + item.name + item.source
                                                + item.origin)):
                    results.append(("again", 0))
                else:
                    for event_id in dict.fromkeys(item.event_ids):
                        known.add((event_id, item.email))  # a repeat in this batch: again
                        rows.append((event_id, item.email, item.email.rpartition("@")[2],
                                     item.name, item.source, item.origin))
                    results.append(_OK)
            if rows:
                conn.execute(_INSERT_SUB, (stamp, stamp, json.dumps(rows, ensure_ascii=False)))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return results

    async def write(self, items: list[Item], now: datetime) -> list[Result]:
        return await asyncio.get_running_loop().run_in_executor(None, self._write, items, now)
