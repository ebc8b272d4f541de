"""The migrated schema equals the models, on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from ciserver.store import db
from ciserver.store.models import Base


async def test_migrations_match_models(db_url: str) -> None:
    await db.upgrade(db_url)
    engine = db.make_engine(db_url)
    try:
        def diff(conn: Connection) -> list[object]:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            return list(compare_metadata(ctx, Base.metadata))

        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
        assert await db.current_revision(engine) == db.head_revision(db_url)
    finally:
        await engine.dispose()


async def test_serve_refuses_an_outdated_schema(sqlite_url: str) -> None:
    engine = db.make_engine(sqlite_url)
    try:
        assert await db.ensure_schema(engine, sqlite_url) == "created"
        assert await db.ensure_schema(engine, sqlite_url) == "current"
        async with engine.begin() as conn:
            await conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0000old'")
        try:
            await db.ensure_schema(engine, sqlite_url)
        except db.SchemaError as exc:
            assert "ciserver db upgrade" in str(exc)
        else:
            raise AssertionError("an outdated schema was accepted")
    finally:
        await engine.dispose()


async def test_upgrade_keeps_existing_data(db_url: str) -> None:
    """A database made by the first release, with data, upgrades to head."""
    from alembic import command
    from sqlalchemy import text

    await __import__("asyncio").to_thread(command.upgrade, db.alembic_config(db_url), "0001")
    engine = db.make_engine(db_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO events (public_id, uid, organizer_uid, organizer_email, "
                "organizer_domain, organizer_name, origin, content, summary, location, "
                "description, start_at, end_at, tzid, all_day, recurring, rsvp_until, "
                "organizer_sequence, sequence, status, created_at, updated_at) VALUES "
                "('e1', 'e1@x', 'u1', 'o@x.example', 'x.example', 'O', 'calendar', 'c', 's', "
                "'', '', '2030-01-01 00:00:00', '2030-01-01 01:00:00', '', false, false, "
                "'2030-01-01 01:00:00', 0, 0, 'confirmed', '2030-01-01 00:00:00', "
                "'2030-01-01 00:00:00')"))
            await conn.execute(text(
                "INSERT INTO subscriptions (event_id, email, domain, name, status, source, "
                "partstat, soft_bounces, created_at, updated_at) SELECT id, 'a@b.example', "
                "'b.example', 'A', 'active', 'page', 'NEEDS-ACTION', 0, created_at, "
                "created_at FROM events"))
        await db.upgrade(db_url)
        assert await db.current_revision(engine) == db.head_revision(db_url)
        async with engine.connect() as conn:
            rows = (await conn.execute(text(
                "SELECT s.email, s.origin, e.report_sent_at FROM subscriptions s "
                "JOIN events e ON e.id = s.event_id"))).all()
        assert [tuple(r) for r in rows] == [("a@b.example", "", None)]
    finally:
        await engine.dispose()
