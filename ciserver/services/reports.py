"""Who is coming: report rows, counts, answer history and timelines per event, organizer or
domain, and their CSV form.

Rows stream from the database (memory stays flat however many answers there are). Each
subscription has one row for its answer to the whole event; each answer to a single
occurrence of a recurring event gets a row of its own with ``occurrence`` set.

On SQLite, exports read through a connection of their own (the ``sqlite3`` module, in a
thread when called from the event loop): the daemon's single pooled connection stays free,
and the export reads a WAL snapshot without taking the write lock. Both paths run the same
SQL and format rows with the same function.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import csv
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import astuple, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, and_, bindparam, func, literal, or_, select, union_all
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql import ColumnElement

from ..addresses import normalize_email
from ..store.models import Answer, Event, RsvpHistory, Subscription
from .context import Services


@dataclass(frozen=True)
class ReportRow:
    event_uid: str
    event_summary: str
    event_start: str
    email: str
    name: str
    rsvp: str
    partstat: str
    responded_at: str
    occurrence: str
    status: str
    source: str
    event_id: str
    origin: str  # where exactly: page slug, "button", API key prefix, "forwarded by …"


COLUMNS = [f.name for f in fields(ReportRow)]


@dataclass(frozen=True)
class HistoryRow:
    """One answer as it was received, applied or not (services.attendee writes them)."""

    event_uid: str
    event_summary: str
    event_start: str
    email: str
    name: str
    occurrence: str
    received_at: str
    partstat: str
    rsvp: str
    outcome: str  # applied | stale | late | counter
    late: str  # "yes": came after the event (its last occurrence) ended, report unchanged
    stale: str  # "yes": older than the answer already applied, report unchanged
    sequence: str
    answer_stamp: str
    comment: str
    source: str
    origin: str
    event_id: str


HISTORY_COLUMNS = [f.name for f in fields(HistoryRow)]


@dataclass(frozen=True)
class Scope:
    """What a report covers: one event, one organizer's events, a domain's, or a list."""

    event_id: int | None = None
    organizer: str | None = None
    domain: str | None = None
    event_ids: tuple[int, ...] | None = None

    @classmethod
    def of(cls, event_id: int | None = None, organizer: str | None = None,
           domain: str | None = None, event_ids: Iterable[int] | None = None) -> Scope:
        return cls(event_id, normalize_email(organizer) if organizer else None,
                   domain.lower().lstrip("@") if domain else None,
                   tuple(event_ids) if event_ids is not None else None)

    def where(self, q: Any) -> Any:
        if self.event_id is not None:
            q = q.where(Event.id == self.event_id)
        if self.organizer is not None:
            q = q.where(Event.organizer_email == self.organizer)
        if self.domain is not None:
            q = q.where(Event.organizer_domain == self.domain)
        if self.event_ids is not None:
            q = q.where(Event.id.in_(self.event_ids or (-1,)))
        return q


def iso(value: datetime | str | None) -> str:
    """UTC, ISO 8601 to the second; also from SQLite's stored text ("2027-05-01 18:00:00.0")."""
    if value is None or value == "":
        return ""
    if isinstance(value, str):
        return value[:10] + "T" + value[11:19] + "Z"
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


_RSVP = {"ACCEPTED": "Y", "DECLINED": "N", "TENTATIVE": "M"}
# With the fullwidth forms of the first four: spreadsheets with East Asian input settings
# read "＝1+1" as a formula too.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "|", "%", "＝", "＋", "－", "＠")
_FORMULA_FIRST = frozenset(_FORMULA_START)


def safe_cell(value: str) -> str:
    """Neutralise cells a spreadsheet would run as formulas (OWASP CSV injection advice)."""
    if value and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _letter(partstat: str) -> str:
    letter = _RSVP.get(partstat)
    if letter is None:
        letter = _RSVP.get(partstat.upper(), "")
    return letter


# --------------------------------------------------------------------------------------------
# Report rows

EVENT = bindparam("event_pk", type_=Integer)  # the event of a per-event query


def _rows_query(scope: Scope, after: tuple[Any, ...] | None = None) -> Any:
    """Report rows as a compound select, in the CSV's order; ``after`` = the sort key of the
    last row already seen (keyset pagination)."""
    def arm(q: Any) -> Any:
        q = scope.where(q)
        if after is not None:
            q = q.where(Event.start_at >= after[0])  # prunes events before the page
        return q

    whole = arm(select(
        Event.organizer_uid.label("event_uid"), Event.summary.label("event_summary"),
        Event.start_at.label("start_at"), Subscription.email.label("email"),
        Subscription.name.label("name"), Subscription.partstat.label("partstat"),
        Subscription.responded_at.label("responded"), literal("").label("occurrence"),
        Subscription.status.label("status"), Subscription.source.label("source"),
        Event.public_id.label("public_id"), Subscription.origin.label("origin"),
        Event.id.label("event_pk"),
    ).join(Subscription, Subscription.event_id == Event.id))
    single = arm(select(
        Event.organizer_uid, Event.summary, Event.start_at, Subscription.email,
        Subscription.name, Answer.partstat, Answer.received_at, Answer.occurrence,
        Subscription.status, Subscription.source, Event.public_id, Subscription.origin,
        Event.id,
    ).join(Subscription, Subscription.event_id == Event.id)
     .join(Answer, Answer.subscription_id == Subscription.id)
     .where(Answer.occurrence != ""))
    q = union_all(whole, single)
    if after is None:
        return q.order_by("start_at", "event_pk", "email", "occurrence")
    u = q.subquery()
    keys = [u.c.start_at, u.c.event_pk, u.c.email, u.c.occurrence]
    return (select(*u.c).where(_after(keys, after)).order_by(*keys))


def _event_ids_query(scope: Scope) -> Any:
    return scope.where(select(Event.id)).order_by(Event.start_at, Event.id)


@dataclass(frozen=True)
class Plan:
    """One export, two ways: ``single`` (one statement, sorted by the database: PostgreSQL)
    or ``ids`` then ``per_event`` for each (SQLite: a sort of one event's rows at a time,
    in memory, instead of one external sort of them all through temporary files, which
    bench/report measured at half the speed)."""

    single: Any
    ids: Any
    per_event: Any


def _after(cols: Sequence[Any], values: Sequence[Any]) -> ColumnElement[bool]:
    """(c1, c2, …) > (v1, v2, …) lexicographically, written out (typed by the columns)."""
    return or_(*(and_(*(cols[j] == values[j] for j in range(i)), cols[i] > values[i])
                 for i in range(len(cols))))


_F = _FORMULA_FIRST


def format_rows(rows: Iterable[Sequence[Any]]) -> list[tuple[str, ...]]:
    """Result rows of :func:`_rows_query` as CSV cells, neutralised. The hot loop of every
    export: plain tuples, no per-cell function calls for the common case."""
    out: list[tuple[str, ...]] = []
    append = out.append
    for (uid, summary, start, email, name, partstat, responded, occ, status, source, pid,
         origin, _pk) in rows:
        answered = partstat != "NEEDS-ACTION" and partstat != ""
        start = start[:10] + "T" + start[11:19] + "Z" if start.__class__ is str else iso(start)
        append((
            "'" + uid if uid[:1] in _F else uid,
            "'" + summary if summary[:1] in _F else summary,
            start,
            "'" + email if email[:1] in _F else email,
            "'" + name if name[:1] in _F else name,
            _letter(partstat) if answered else "",
            ("'" + partstat if partstat[:1] in _F else partstat) if partstat else "NEEDS-ACTION",
            iso(responded) if answered else "",
            occ, status, source, pid,
            "'" + origin if origin[:1] in _F else origin,
        ))
    return out


def _plain_rows(rows: Iterable[Sequence[Any]]) -> Iterator[ReportRow]:
    """Result rows as :class:`ReportRow` without neutralising (tables, JSON)."""
    for (uid, summary, start, email, name, partstat, responded, occ, status, source, pid,
         origin, _pk) in rows:
        answered = partstat not in ("", "NEEDS-ACTION")
        yield ReportRow(
            event_uid=uid, event_summary=summary, event_start=iso(start), email=email,
            name=name, rsvp=_letter(partstat) if answered else "",
            partstat=partstat or "NEEDS-ACTION",
            responded_at=iso(responded) if answered else "", occurrence=occ, status=status,
            source=source, event_id=pid, origin=origin)


def sqlite_path(svc: Services) -> str | None:
    """The database file when it is SQLite (and a file), else None."""
    url = make_url(svc.config.database_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return url.database


def compiled_sqlite(query: Any) -> tuple[str, list[str], dict[str, Any]]:
    """``query`` as SQLite SQL: (sql, the names of its ? parameters in order, their values).
    Plain values only (str, int): no bind processing happens on this path."""
    compiled = query.compile(dialect=sqlite_dialect.dialect(),
                             compile_kwargs={"render_postcompile": True})
    params = dict(compiled.params)
    names = list(compiled.positiontup or [])
    for name in names:
        if name != EVENT.key and not isinstance(params[name], str | int):
            raise TypeError(f"raw SQLite export with a {type(params[name]).__name__} parameter")
    return str(compiled), names, params


def _sqlite_connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None,
                           cached_statements=16)
    conn.execute("PRAGMA query_only=1")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


class RawExport:
    """The rows of a :class:`Plan` through a private ``sqlite3`` connection, in batches,
    inside one read transaction (a consistent snapshot under WAL; writers are not blocked).
    Memory holds one batch, whatever the number of rows."""

    def __init__(self, path: str, plan: Plan, batch: int) -> None:
        self.conn = _sqlite_connect(path)
        self.batch = batch
        self.closed = False
        self.conn.execute("BEGIN")
        sql, names, params = compiled_sqlite(plan.ids)
        self.ids = [r[0] for r in self.conn.execute(sql, [params[n] for n in names])]
        self.pos = 0
        self.sql, self.names, self.params = compiled_sqlite(plan.per_event)
        self.cursor: sqlite3.Cursor | None = None

    def fetch(self) -> list[Any]:
        out: list[Any] = []
        while len(out) < self.batch:
            if self.cursor is None:
                if self.pos >= len(self.ids):
                    break
                self.params[EVENT.key] = self.ids[self.pos]
                self.pos += 1
                self.cursor = self.conn.execute(self.sql, [self.params[n] for n in self.names])
            rows = self.cursor.fetchmany(self.batch - len(out))
            if rows:
                out += rows
            else:
                self.cursor = None
        if not out:
            self.close()
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("COMMIT")
            self.conn.close()


async def _batches(svc: Services, plan: Plan, batch: int) -> AsyncIterator[list[Any]]:
    """The plan's rows in lists of ``batch``, by the fastest way for the engine."""
    path = sqlite_path(svc)
    if path is not None:
        export = await asyncio.to_thread(RawExport, path, plan, batch)
        try:
            while rows := await asyncio.to_thread(export.fetch):
                yield rows
        finally:
            await asyncio.to_thread(export.close)
        return
    async with svc.engine.connect() as conn:
        result = await conn.stream(plan.single.execution_options(yield_per=batch))
        async for part in result.partitions(batch):
            yield [tuple(r) for r in part]


def row_query(*, event_id: int | None = None, organizer: str | None = None,
              domain: str | None = None, event_ids: Iterable[int] | None = None) -> Any:
    """The report's rows in one statement (what PostgreSQL runs)."""
    return _rows_query(Scope.of(event_id, organizer, domain, event_ids))


async def stream_rows(session: AsyncSession, *, event_id: int | None = None,
                      organizer: str | None = None, domain: str | None = None,
                      event_ids: Iterable[int] | None = None) -> AsyncIterator[ReportRow]:
    q = _rows_query(Scope.of(event_id, organizer, domain, event_ids))
    result = await session.stream(q.execution_options(yield_per=2000))
    async for part in result.partitions(2000):
        for row in _plain_rows(part):
            yield row


async def count_rows(svc: Services, *, event_id: int | None = None,
                     organizer: str | None = None, domain: str | None = None,
                     event_ids: Iterable[int] | None = None) -> int:
    """How many rows the report has (one per subscription plus one per occurrence answer)."""
    scope = Scope.of(event_id, organizer, domain, event_ids)
    subs = scope.where(select(func.count()).select_from(Event).join(
        Subscription, Subscription.event_id == Event.id))
    occ = scope.where(select(func.count()).select_from(Event).join(
        Subscription, Subscription.event_id == Event.id).join(
        Answer, Answer.subscription_id == Subscription.id).where(Answer.occurrence != ""))
    async with svc.sessions() as session:
        return int((await session.execute(subs)).scalar_one()) + int(
            (await session.execute(occ)).scalar_one())


# --------------------------------------------------------------------------------------------
# The SQLite CSV export: per event, only the columns that vary, lines built in Python


def _csv_cell(value: str) -> str:
    """One cell as csv.writer (QUOTE_MINIMAL, "\\r\\n") writes it, neutralised first."""
    if value[:1] in _F:
        value = "'" + value
    if '"' in value or "," in value or "\n" in value or "\r" in value:
        value = '"' + value.replace('"', '""') + '"'
    return value


def _event_rows_query() -> Any:
    """The rows of the event :data:`EVENT` without its own columns (the export writes them
    once per event): its subscriptions and their answers to single occurrences."""
    whole = select(Subscription.email.label("email"), Subscription.name,
                   Subscription.partstat, Subscription.responded_at,
                   literal("").label("occurrence"), Subscription.status, Subscription.source,
                   Subscription.origin).where(Subscription.event_id == EVENT)
    single = select(Subscription.email, Subscription.name, Answer.partstat,
                    Answer.received_at, Answer.occurrence, Subscription.status,
                    Subscription.source, Subscription.origin
                    ).join(Answer, Answer.subscription_id == Subscription.id
                           ).where(Subscription.event_id == EVENT, Answer.occurrence != "")
    return union_all(whole, single).order_by("email", "occurrence")


def _events_query(scope: Scope) -> Any:
    return scope.where(select(Event.id, Event.organizer_uid, Event.summary, Event.start_at,
                              Event.public_id)).order_by(Event.start_at, Event.id)


def export_queries(*, event_id: int | None = None, organizer: str | None = None,
                   domain: str | None = None) -> tuple[Any, Any]:
    """The two statements of the SQLite CSV export: the events in order, then the rows of
    each (bench/report runs the same ones in the sqlite3 shell)."""
    return _events_query(Scope.of(event_id, organizer, domain)), _event_rows_query()


class SqliteCsvExport:
    """Report CSV from SQLite through a private ``sqlite3`` connection, one read
    transaction (a WAL snapshot: writers are not blocked, the daemon's pooled connection
    stays free). Events in order, then each event's rows sorted by the database in memory
    (one event at a time, not one external sort of everything); memory holds one chunk.
    The same cells as :func:`format_rows` + csv.writer, byte for byte (tested)."""

    def __init__(self, path: str, scope: Scope, batch: int = 5000) -> None:
        self.conn = _sqlite_connect(path)
        self.batch = batch
        self.closed = False
        self.rows = 0
        self.conn.execute("BEGIN")
        sql, names, params = compiled_sqlite(_events_query(scope))
        self.events = self.conn.execute(sql, [params[n] for n in names]).fetchall()
        self.pos = 0
        self.sql, self.names, self.params = compiled_sqlite(_event_rows_query())
        self.cursor: sqlite3.Cursor | None = None
        self.prefix = self.pid = ""
        self.cells: dict[str, tuple[bool, str, str]] = {}  # partstat -> answered, Y/N/M, cell
        self.origins: dict[str, str] = {}

    def _next_event(self) -> bool:
        if self.pos >= len(self.events):
            return False
        eid, uid, summary, start, self.pid = self.events[self.pos]
        self.pos += 1
        self.prefix = f"{_csv_cell(uid)},{_csv_cell(summary)},{iso(start)},"
        self.params[EVENT.key] = eid
        self.cursor = self.conn.execute(self.sql, [self.params[n] for n in self.names])
        return True

    def chunk(self) -> str:
        """The next lines (about ``batch`` rows); "" at the end."""
        lines: list[str] = []
        while len(lines) < self.batch:
            if self.cursor is None and not self._next_event():
                break
            assert self.cursor is not None
            rows = self.cursor.fetchmany(self.batch - len(lines))
            if not rows:
                self.cursor = None
                continue
            self._lines(rows, lines)
        if not lines:
            self.close()
            return ""
        self.rows += len(lines)
        return "".join(lines)

    def _lines(self, rows: list[Any], lines: list[str]) -> None:
        prefix, pid, cells, origins, first = self.prefix, self.pid, self.cells, self.origins, _F
        append = lines.append
        for email, name, partstat, responded, occ, status, source, origin in rows:
            p = cells.get(partstat)
            if p is None:
                answered = partstat != "NEEDS-ACTION" and partstat != ""
                p = cells[partstat] = (answered, _letter(partstat) if answered else "",
                                       _csv_cell(partstat) if partstat else "NEEDS-ACTION")
            o = origins.get(origin)
            if o is None:
                if len(origins) > 10000:
                    origins.clear()
                o = origins[origin] = _csv_cell(origin)
            if email[:1] in first:
                email = "'" + email
            if name[:1] in first:
                name = "'" + name
            mid = f"{email},{name},"
            if mid.count(",") != 2 or '"' in mid or "\n" in mid or "\r" in mid:
                mid = f"{_csv_cell(email)},{_csv_cell(name)},"
            if p[0] and responded:
                append(f"{prefix}{mid}{p[1]},{p[2]},{responded[:10]}T{responded[11:19]}Z,"
                       f"{occ},{status},{source},{pid},{o}\r\n")
            else:
                append(f"{prefix}{mid}{p[1]},{p[2]},,{occ},{status},{source},{pid},{o}\r\n")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("COMMIT")
            self.conn.close()


# --------------------------------------------------------------------------------------------
# CSV


def csv_header(bom: bool = False, columns: Sequence[str] = COLUMNS) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerow(columns)
    return ("\ufeff" if bom else "") + buf.getvalue()


def csv_lines(rows: Iterable[Any]) -> str:
    """Report or history rows (dataclasses) as CSV lines, neutralised."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    for row in rows:
        writer.writerow([safe_cell(str(v)) for v in astuple(row)])
    return buf.getvalue()


def csv_cells(rows: Iterable[Sequence[str]]) -> str:
    """Ready cells (already neutralised, :func:`format_rows`) as CSV lines."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\r\n").writerows(rows)
    return buf.getvalue()


async def csv_chunks(svc: Services, *, event_id: int | None = None,
                     organizer: str | None = None, domain: str | None = None,
                     bom: bool = False, batch: int = 2000,
                     event_ids: Iterable[int] | None = None,
                     progress: Callable[[int], None] | None = None) -> AsyncIterator[str]:
    """CSV text in chunks, for streaming responses and files; ``progress(n)`` is told each
    chunk's number of rows."""
    yield csv_header(bom)
    scope = Scope.of(event_id, organizer, domain, event_ids)
    path = sqlite_path(svc)
    if path is not None:  # in a thread: the loop goes on serving while the rows are read
        export = await asyncio.to_thread(SqliteCsvExport, path, scope, batch)
        try:
            done = 0
            while text := await asyncio.to_thread(export.chunk):
                yield text
                if progress is not None:
                    progress(export.rows - done)
                    done = export.rows
        finally:
            await asyncio.to_thread(export.close)
        return
    async with svc.engine.connect() as conn:
        result = await conn.stream(_rows_query(scope).execution_options(yield_per=batch))
        async for part in result.partitions(batch):
            yield csv_cells(format_rows(part))
            if progress is not None:
                progress(len(part))


def csv_sync_chunks(svc: Services, *, event_id: int | None = None,
                    organizer: str | None = None, domain: str | None = None,
                    bom: bool = False, batch: int = 5000,
                    event_ids: Iterable[int] | None = None,
                    progress: Callable[[int], None] | None = None) -> Iterator[str] | None:
    """:func:`csv_chunks` without an event loop, on SQLite (None on PostgreSQL)."""
    path = sqlite_path(svc)
    if path is None:
        return None
    scope = Scope.of(event_id, organizer, domain, event_ids)

    def gen(path: str) -> Iterator[str]:
        yield csv_header(bom)
        export = SqliteCsvExport(path, scope, batch)
        try:
            done = 0
            while text := export.chunk():
                yield text
                if progress is not None:
                    progress(export.rows - done)
                    done = export.rows
        finally:
            export.close()

    return gen(path)


async def csv_text(svc: Services, **kw: Any) -> str:
    return "".join([chunk async for chunk in csv_chunks(svc, **kw)])


# --------------------------------------------------------------------------------------------
# JSON pages (keyset pagination: a cursor names the last row of the page before)


def encode_cursor(values: Sequence[Any]) -> str:
    data = [v.isoformat() if isinstance(v, datetime) else v for v in values]
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kinds: Sequence[type]) -> tuple[Any, ...]:
    """Raises ValueError for anything that is not one of our cursors."""
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise ValueError("not a cursor from this API") from None
    if not isinstance(data, list) or len(data) != len(kinds):
        raise ValueError("not a cursor from this API")
    out: list[Any] = []
    for value, kind in zip(data, kinds, strict=True):
        if kind is datetime:
            if not isinstance(value, str):
                raise ValueError("not a cursor from this API")
            dt = datetime.fromisoformat(value)
            out.append(dt if dt.tzinfo else dt.replace(tzinfo=UTC))
        elif not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError("not a cursor from this API")
        else:
            out.append(value)
    return tuple(out)


_ROW_CURSOR = (datetime, int, str, str)


async def rows_page(session: AsyncSession, *, cursor: str | None = None, limit: int = 1000,
                    event_id: int | None = None, organizer: str | None = None,
                    domain: str | None = None) -> tuple[list[ReportRow], str | None]:
    """One page of report rows and the cursor of the next page (None: this was the last)."""
    after = decode_cursor(cursor, _ROW_CURSOR) if cursor else None
    q = _rows_query(Scope.of(event_id, organizer, domain), after).limit(limit + 1)
    rows = [tuple(r) for r in (await session.execute(q)).all()]
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more:
        last = rows[-1]
        next_cursor = encode_cursor([last[2], last[12], last[3], last[7]])
    return list(_plain_rows(rows)), next_cursor


# --------------------------------------------------------------------------------------------
# Answer history


def _history_query(scope: Scope, after: tuple[Any, ...] | None = None,
                   one_event: bool = False) -> Any:
    q = scope.where(select(
        Event.organizer_uid, Event.summary, Event.start_at, Subscription.email,
        Subscription.name, RsvpHistory.occurrence, RsvpHistory.received_at,
        RsvpHistory.partstat, RsvpHistory.outcome, RsvpHistory.sequence, RsvpHistory.stamp,
        RsvpHistory.comment, Subscription.source, Subscription.origin, Event.public_id,
        Event.id, RsvpHistory.id,
    ).select_from(RsvpHistory)
     .join(Subscription, Subscription.id == RsvpHistory.subscription_id)
     .join(Event, Event.id == Subscription.event_id))
    keys = [Event.start_at, Event.id, RsvpHistory.id]
    if one_event:
        q = q.where(Event.id == EVENT)
    if after is not None:
        q = q.where(Event.start_at >= after[0]).where(_after(keys, after))
    return q.order_by(*keys)


def _history_rows(rows: Iterable[Sequence[Any]]) -> Iterator[HistoryRow]:
    for (uid, summary, start, email, name, occ, received, partstat, outcome, seq, stamp,
         comment, source, origin, pid, _pk, _hid) in rows:
        yield HistoryRow(
            event_uid=uid, event_summary=summary, event_start=iso(start), email=email,
            name=name, occurrence=occ, received_at=iso(received), partstat=partstat,
            rsvp=_letter(partstat), outcome=outcome, late="yes" if outcome == "late" else "",
            stale="yes" if outcome == "stale" else "",
            sequence="" if seq is None else str(seq), answer_stamp=iso(stamp),
            comment=comment, source=source, origin=origin, event_id=pid)


async def stream_history(session: AsyncSession, *, event_id: int | None = None,
                         organizer: str | None = None, domain: str | None = None
                         ) -> AsyncIterator[HistoryRow]:
    """Every answer received, in the order of the events, then as received."""
    q = _history_query(Scope.of(event_id, organizer, domain))
    result = await session.stream(q.execution_options(yield_per=2000))
    async for part in result.partitions(2000):
        for row in _history_rows(part):
            yield row


_HISTORY_CURSOR = (datetime, int, int)


async def history_page(session: AsyncSession, *, cursor: str | None = None,
                       limit: int = 1000, event_id: int | None = None,
                       organizer: str | None = None, domain: str | None = None
                       ) -> tuple[list[HistoryRow], str | None]:
    after = decode_cursor(cursor, _HISTORY_CURSOR) if cursor else None
    q = _history_query(Scope.of(event_id, organizer, domain), after).limit(limit + 1)
    rows = [tuple(r) for r in (await session.execute(q)).all()]
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = encode_cursor([rows[-1][2], rows[-1][15], rows[-1][16]]) if more else None
    return list(_history_rows(rows)), next_cursor


async def history_csv_chunks(svc: Services, *, event_id: int | None = None,
                             organizer: str | None = None, domain: str | None = None,
                             bom: bool = False, batch: int = 2000,
                             progress: Callable[[int], None] | None = None
                             ) -> AsyncIterator[str]:
    yield csv_header(bom, HISTORY_COLUMNS)
    scope = Scope.of(event_id, organizer, domain)
    plan = Plan(_history_query(scope), _event_ids_query(scope),
                _history_query(Scope(), one_event=True))
    async for rows in _batches(svc, plan, batch):
        yield csv_lines(_history_rows(rows))
        if progress is not None:
            progress(len(rows))


async def history_csv_text(svc: Services, **kw: Any) -> str:
    return "".join([chunk async for chunk in history_csv_chunks(svc, **kw)])


# --------------------------------------------------------------------------------------------
# Counts


@dataclass
class Counts:
    """Answers of a set of subscriptions. Y, N, M and no_answer split ``invited`` by the
    answer; bounced and unsubscribed count addresses that get no more mail (whatever they
    answered before), as GET /events does."""

    invited: int = 0
    yes: int = 0
    no: int = 0
    maybe: int = 0
    no_answer: int = 0
    bounced: int = 0
    unsubscribed: int = 0

    def add(self, status: str, partstat: str, n: int = 1) -> None:
        self.invited += n
        if status == "bounced":
            self.bounced += n
        elif status == "unsubscribed":
            self.unsubscribed += n
        self.answer(partstat, n)

    def answer(self, partstat: str, n: int) -> None:
        letter = _letter(partstat or "")
        if letter == "Y":
            self.yes += n
        elif letter == "N":
            self.no += n
        elif letter == "M":
            self.maybe += n
        else:
            self.no_answer += n

    def __iadd__(self, other: Counts) -> Counts:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {"invited": self.invited, "Y": self.yes, "N": self.no, "M": self.maybe,
                "no_answer": self.no_answer, "bounced": self.bounced,
                "unsubscribed": self.unsubscribed}


@dataclass
class EventSummary:
    pk: int
    id: str  # API id
    uid: str  # the organizer's UID
    summary: str
    start: datetime
    end: datetime
    status: str
    recurring: bool
    organizer: str
    domain: str
    counts: Counts = field(default_factory=Counts)


async def event_summaries(session: AsyncSession, *, event_id: int | None = None,
                          organizer: str | None = None, domain: str | None = None,
                          since: datetime | None = None, until: datetime | None = None,
                          limit: int | None = None, offset: int = 0) -> list[EventSummary]:
    """The events of a scope, in start order, each with its counts."""
    scope = Scope.of(event_id, organizer, domain)
    q = scope.where(select(Event.id, Event.public_id, Event.organizer_uid, Event.summary,
                           Event.start_at, Event.end_at, Event.status, Event.recurring,
                           Event.organizer_email, Event.organizer_domain))
    if since is not None:
        q = q.where(Event.start_at >= since)
    if until is not None:
        q = q.where(Event.start_at < until)
    q = q.order_by(Event.start_at, Event.id).offset(offset)
    if limit is not None:
        q = q.limit(limit)
    out = {r[0]: EventSummary(*r) for r in (await session.execute(q)).all()}
    if out:
        counts = await session.execute(
            select(Subscription.event_id, Subscription.status, Subscription.partstat,
                   func.count()).where(Subscription.event_id.in_(list(out)))
            .group_by(Subscription.event_id, Subscription.status, Subscription.partstat))
        for pk, status, partstat, n in counts:
            out[pk].counts.add(status, partstat, n)
    return list(out.values())


async def totals(session: AsyncSession, *, event_id: int | None = None,
                 organizer: str | None = None, domain: str | None = None) -> Counts:
    scope = Scope.of(event_id, organizer, domain)
    c = Counts()
    q = scope.where(select(Subscription.status, Subscription.partstat, func.count())
                    .select_from(Event).join(Subscription, Subscription.event_id == Event.id))
    for status, partstat, n in await session.execute(
            q.group_by(Subscription.status, Subscription.partstat)):
        c.add(status, partstat, n)
    return c


async def event_count(session: AsyncSession, *, organizer: str | None = None,
                      domain: str | None = None, since: datetime | None = None) -> int:
    q = Scope.of(None, organizer, domain).where(select(func.count(Event.id)))
    if since is not None:
        q = q.where(Event.start_at >= since)
    return int((await session.execute(q)).scalar_one())


@dataclass
class OrganizerSummary:
    organizer: str
    events: int
    counts: Counts = field(default_factory=Counts)


async def organizer_summaries(session: AsyncSession, domain: str) -> list[OrganizerSummary]:
    """Every organizer under ``domain`` with their number of events and counts."""
    domain = domain.lower()
    out: dict[str, OrganizerSummary] = {}
    for email, n in await session.execute(
            select(Event.organizer_email, func.count(Event.id))
            .where(Event.organizer_domain == domain).group_by(Event.organizer_email)
            .order_by(Event.organizer_email)):
        out[email] = OrganizerSummary(email, n)
    for email, status, partstat, n in await session.execute(
            select(Event.organizer_email, Subscription.status, Subscription.partstat,
                   func.count()).join(Subscription, Subscription.event_id == Event.id)
            .where(Event.organizer_domain == domain)
            .group_by(Event.organizer_email, Subscription.status, Subscription.partstat)):
        out[email].counts.add(status, partstat, n)
    return list(out.values())


@dataclass
class SourceSummary:
    """Where customers came from: ``source`` (page | api | forwarded) and ``origin`` (the
    page slug, "button", "email-cta", the API key prefix, "forwarded by …")."""

    source: str
    origin: str
    counts: Counts = field(default_factory=Counts)


async def source_summaries(session: AsyncSession, *, event_id: int | None = None,
                           organizer: str | None = None, domain: str | None = None
                           ) -> list[SourceSummary]:
    scope = Scope.of(event_id, organizer, domain)
    out: dict[tuple[str, str], SourceSummary] = {}
    q = scope.where(select(Subscription.source, Subscription.origin, Subscription.status,
                           Subscription.partstat, func.count())
                    .select_from(Event).join(Subscription, Subscription.event_id == Event.id))
    q = q.group_by(Subscription.source, Subscription.origin, Subscription.status,
                   Subscription.partstat)
    for source, origin, status, partstat, n in await session.execute(q):
        key = (source, origin or "")
        out.setdefault(key, SourceSummary(*key)).counts.add(status, partstat, n)
    return sorted(out.values(), key=lambda s: (-s.counts.invited, s.source, s.origin))


def occurrence_keys(content: str, limit: int = 200) -> list[str]:
    """The occurrences of a recurring event (keys as in Answer.occurrence), at most
    ``limit``; [] when the series cannot be read."""
    from dateutil.rrule import rruleset, rrulestr

    from ..itip import content as content_mod
    from ..itip.parse import normalize_time, occurrence_key

    try:
        comps = content_mod.load(content)
        master = next((c for c in comps if c.get("RECURRENCE-ID") is None), None)
        if master is None or master.get("DTSTART") is None:
            return []
        start = normalize_time(master["DTSTART"].dt, None)
        series = rruleset()
        rule = master.get("RRULE")
        if rule is not None:
            series.rrule(rrulestr(rule.to_ical().decode(), dtstart=start))
        else:
            series.rdate(start)
        for name, add in (("RDATE", series.rdate), ("EXDATE", series.exdate)):
            props = master.get(name)
            for prop in props if isinstance(props, list) else [props] if props else []:
                for item in prop.dts:
                    add(normalize_time(item.dt, None))
        keys = []
        for when in series:
            keys.append(occurrence_key(when))
            if len(keys) >= limit:
                break
        return keys
    except (ValueError, TypeError, KeyError, AttributeError):
        return []


async def occurrence_counts(session: AsyncSession, event: Event,
                            limit: int = 200) -> list[tuple[str, Counts]]:
    """Per occurrence of a recurring event: a customer's answer for that occurrence if they
    gave one, else their answer to the whole series."""
    base = Counts()
    for status, partstat, n in await session.execute(
            select(Subscription.status, Subscription.partstat, func.count())
            .where(Subscription.event_id == event.id)
            .group_by(Subscription.status, Subscription.partstat)):
        base.add(status, partstat, n)
    keys = occurrence_keys(event.content, limit) if event.recurring else []
    per: dict[str, Counts] = {}
    overrides = await session.execute(
        select(Answer.occurrence, Subscription.partstat, Answer.partstat, func.count())
        .join(Subscription, Subscription.id == Answer.subscription_id)
        .where(Subscription.event_id == event.id, Answer.occurrence != "")
        .group_by(Answer.occurrence, Subscription.partstat, Answer.partstat))
    for occ, whole, single, n in overrides:
        c = per.setdefault(occ, Counts())
        c.answer(whole, -n)
        c.answer(single, n)
    out = []
    for occ in sorted(set(keys) | set(per)):
        c = Counts()
        c += base
        if occ in per:
            c += per[occ]
        out.append((occ, c))
    return out


# --------------------------------------------------------------------------------------------
# Answers over time


@dataclass(frozen=True)
class TimelinePoint:
    at: datetime  # end of the bucket
    invited: int
    yes: int
    no: int
    maybe: int


def _hour(col: Any, dialect: str) -> Any:
    if dialect == "sqlite":
        return func.strftime("%Y-%m-%d %H:00:00", col)
    return func.date_trunc("hour", func.timezone("UTC", col))


def _as_hour(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_STEPS = [timedelta(hours=h) for h in (1, 3, 6, 12, 24, 48, 168, 336, 720)]


async def timeline(session: AsyncSession, dialect: str, *, event_id: int | None = None,
                   organizer: str | None = None, domain: str | None = None,
                   until: datetime | None = None, max_points: int = 240
                   ) -> list[TimelinePoint]:
    """Cumulative invited, Y, N and M over time (whole-event answers as applied, each
    change counted once: an ACCEPTED that becomes DECLINED moves one from Y to N)."""
    scope = Scope.of(event_id, organizer, domain)
    delta: dict[datetime, list[int]] = {}
    created = _hour(Subscription.created_at, dialect)
    for bucket, n in await session.execute(scope.where(
            select(created, func.count()).select_from(Event)
            .join(Subscription, Subscription.event_id == Event.id)).group_by(created)):
        delta.setdefault(_as_hour(bucket), [0, 0, 0, 0])[0] += n
    h = scope.where(select(
        RsvpHistory.received_at.label("t"), RsvpHistory.partstat.label("p"),
        func.lag(RsvpHistory.partstat).over(
            partition_by=RsvpHistory.subscription_id,
            order_by=[RsvpHistory.received_at, RsvpHistory.id]).label("prev"))
        .select_from(RsvpHistory)
        .join(Subscription, Subscription.id == RsvpHistory.subscription_id)
        .join(Event, Event.id == Subscription.event_id)
        .where(RsvpHistory.outcome == "applied", RsvpHistory.occurrence == "")).subquery()
    hb = _hour(h.c.t, dialect)
    slot = {"Y": 1, "N": 2, "M": 3}
    for bucket, new, prev, n in await session.execute(
            select(hb, h.c.p, h.c.prev, func.count()).group_by(hb, h.c.p, h.c.prev)):
        d = delta.setdefault(_as_hour(bucket), [0, 0, 0, 0])
        if (i := slot.get(_letter(new or ""))) is not None:
            d[i] += n
        if (j := slot.get(_letter(prev or ""))) is not None:
            d[j] -= n
    if not delta:
        return []
    first, last = min(delta), max(delta) + timedelta(hours=1)
    if until is not None and until > last:
        last = until
    step = next((s for s in _STEPS if (last - first) / s <= max_points), _STEPS[-1])
    points: list[TimelinePoint] = []
    totals = [0, 0, 0, 0]
    t = first
    hours = sorted(delta)
    i = 0
    while t < last:
        t = min(t + step, last)
        while i < len(hours) and hours[i] < t:
            totals = [a + b for a, b in zip(totals, delta[hours[i]], strict=True)]
            i += 1
        points.append(TimelinePoint(t, *totals))
    return [TimelinePoint(first, 0, 0, 0, 0), *points]


# --------------------------------------------------------------------------------------------
# Mail


def summary_text(title: str, events: Sequence[EventSummary], total: Counts,
                 extra: str = "") -> str:
    """The body of a report mail: the counts, per event when there are a few."""
    c = total
    lines = [f"Report: {title}", "",
             f"Invited {c.invited}: yes {c.yes}, no {c.no}, maybe {c.maybe}, no answer "
             f"{c.no_answer} (bounced {c.bounced}, unsubscribed {c.unsubscribed})."]
    if extra:
        lines += ["", extra]
    if events:
        lines += ["", "Per event (start UTC, invited, Y / N / M, no answer):"]
        for e in events[:50]:
            lines.append(f"  {e.start:%Y-%m-%d %H:%M}  {e.summary[:60]}  {e.counts.invited}, "
                         f"{e.counts.yes} / {e.counts.no} / {e.counts.maybe}, "
                         f"{e.counts.no_answer}" + ("  (cancelled)" if e.status == "cancelled"
                                                     else ""))
        if len(events) > 50:
            lines.append(f"  … and {len(events) - 50} more in the attachment")
    lines += ["", "Every answer is in the attached CSV (one row per customer, and one per "
              "answer to a single occurrence)."]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class PreparedMail:
    to: str
    subject: str
    text: str
    filename: str
    data: bytes
    rows: int


async def prepare_mail(svc: Services, *, to: str, title: str, event_id: int | None = None,
                       organizer: str | None = None, domain: str | None = None,
                       event_ids: Iterable[int] | None = None, history: bool = False,
                       bom: bool = True, extra: str = "",
                       filename: str = "report.csv") -> PreparedMail:
    """Everything a report mail needs, read before any write transaction starts."""
    ids = tuple(event_ids) if event_ids is not None else None
    async with svc.sessions() as session:
        if ids is not None:
            events = [e for i in ids for e in await event_summaries(session, event_id=i)]
            events.sort(key=lambda e: (e.start, e.pk))
            total = Counts()
            for e in events:
                total += e.counts
        else:
            events = await event_summaries(session, event_id=event_id, organizer=organizer,
                                           domain=domain, limit=1000)
            total = await totals(session, event_id=event_id, organizer=organizer,
                                 domain=domain)
    rows = 0

    def tick(n: int) -> None:
        nonlocal rows
        rows += n

    if history:
        chunks = history_csv_chunks(svc, event_id=event_id, organizer=organizer,
                                    domain=domain, bom=bom, progress=tick)
        filename = filename.removesuffix(".csv") + "-history.csv"
    else:
        chunks = csv_chunks(svc, event_id=event_id, organizer=organizer, domain=domain,
                            event_ids=ids, bom=bom, progress=tick)
    text = "".join([chunk async for chunk in chunks])
    return PreparedMail(to=to, subject=f"Report: {title}",
                        text=summary_text(title, events, total, extra), filename=filename,
                        data=text.encode("utf-8"), rows=rows)


async def queue_mail(svc: Services, session: AsyncSession, mail: PreparedMail) -> None:
    from . import notify

    await notify.send(svc, session, to=mail.to, subject=mail.subject, text=mail.text,
                      attachment=(mail.filename, mail.data, "text/csv"))


async def mail_report(svc: Services, *, to: str, title: str, **scope: Any) -> PreparedMail:
    """Mail the report's CSV to ``to`` through the outbox (CLI --send, API send)."""
    mail = await prepare_mail(svc, to=to, title=title, **scope)
    async with svc.sessions.begin() as session:
        await queue_mail(svc, session, mail)
    return mail
