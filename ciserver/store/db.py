"""Engines, sessions and schema versions for SQLite (aiosqlite) and PostgreSQL (asyncpg)."""

from __future__ import annotations

import asyncio
from importlib import resources
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)


class SchemaError(Exception):
    """The database's schema is not the one this version of ciserver needs."""


def make_engine(url: str, echo: bool = False) -> AsyncEngine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # One connection per process: SQLite has one writer anyway, and in-process waiting
        # on the pool is cheaper than SQLITE_BUSY retries. Other processes (the CLI) wait on
        # busy_timeout.
        engine = create_async_engine(url, echo=echo, pool_size=1, max_overflow=0,
                                     pool_timeout=120, connect_args={"timeout": 30})
        _sqlite_setup(engine)
        return engine
    return create_async_engine(url, echo=echo, pool_size=10, max_overflow=10,
                               pool_pre_ping=True)


def _sqlite_setup(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy, not the driver, open transactions, so they can be IMMEDIATE.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at checkpoints
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock at BEGIN: two processes never deadlock upgrading
        # a read lock, they queue on busy_timeout instead.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


# ---------------------------------------------------------------------------------------------
# Migrations


def alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(resources.files("ciserver.migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


async def current_revision(engine: AsyncEngine) -> str | None:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())


async def has_tables(engine: AsyncEngine) -> bool:
    def check(c: Connection) -> bool:
        from sqlalchemy import inspect

        return bool(inspect(c).get_table_names())

    async with engine.connect() as conn:
        return await conn.run_sync(check)


async def upgrade(url: str) -> None:
    """Alembic upgrade to head (run in a thread: Alembic's env drives its own loop)."""
    cfg = alembic_config(url)
    await asyncio.to_thread(command.upgrade, cfg, "head")


async def ensure_schema(engine: AsyncEngine, url: str, auto_upgrade_empty: bool = True) -> str:
    """Upgrade an empty database; refuse an outdated one with a clear message."""
    head = head_revision(url)
    current = await current_revision(engine)
    if current == head:
        return "current"
    if current is None and not await has_tables(engine):
        if not auto_upgrade_empty:
            raise SchemaError("the database is empty: run `ciserver db upgrade`")
        await upgrade(url)
        return "created"
    raise SchemaError(
        f"the database schema is at revision {current or 'unknown'}, this ciserver needs "
        f"{head}: stop every instance and run `ciserver db upgrade` first"
    )
