"""The hot write of SQLite ingest: a batch of raw messages into the inbox, by hand.

Why by hand: accepting mail is one INSERT of a batch and one COMMIT, done for every group of
concurrent SMTP sessions. Through SQLAlchemy and aiosqlite that is five thread round trips and
Core's per-row parameter processing; with the sqlite3 module in one dedicated thread it is one
hand-off per batch. bench/inbound measured the difference (README). PostgreSQL keeps the
SQLAlchemy path. The rows must read back exactly as SQLAlchemy writes them: tests go through
both (every SMTP test on SQLite writes here and reads through the ORM).
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from .models import InboxMessage

COLUMNS = [c.name for c in InboxMessage.__table__.columns if c.name != "id"]
_INSERT = (f"INSERT INTO inbox ({', '.join(COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in COLUMNS)})")


def _value(v: Any) -> Any:
    if isinstance(v, datetime):  # SQLAlchemy's SQLite DATETIME text form, naive UTC
        return v.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")
    return v


class SqliteInboxWriter:
    def __init__(self, path: str) -> None:
        self.path = path
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inbox-writer")
        self.conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self.conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30,
                                   check_same_thread=False)
            for pragma in ("journal_mode=WAL", "foreign_keys=ON", "busy_timeout=30000",
                           "synchronous=NORMAL"):
                conn.execute(f"PRAGMA {pragma}")
            self.conn = conn
        return self.conn

    def _write(self, rows: list[dict[str, Any]]) -> list[int]:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")  # one writer: the newest ids are ours
        try:
            conn.executemany(_INSERT, [tuple(_value(r.get(c)) for c in COLUMNS) for r in rows])
            ids = [r[0] for r in conn.execute(
                "SELECT id FROM inbox ORDER BY id DESC LIMIT ?", (len(rows),))]
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return sorted(ids)

    async def write(self, rows: list[dict[str, Any]]) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._write,
                                                                rows)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        if self.conn is not None:
            self.conn.close()
            self.conn = None
