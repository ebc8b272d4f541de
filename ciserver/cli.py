"""The `ciserver` command line (click): run, migrate, keys, reports, inspection and repair."""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import config as config_mod
from .services.context import Services
from .store import db

T = TypeVar("T")
# Piped output is not squeezed to 80 columns: people paste it and scripts grep it.
console = Console(width=None if sys.stdout.isatty() else 220)


# Stored text is data, never markup or terminal control: customer names from public invite
# requests, summaries, Origin headers, envelope senders and SMTP answers are written by
# strangers. Tables get rich Text cells (no [markup] parsed), and C0/C1 control characters
# (ESC and the rest) never reach the terminal.
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _plain(value: object, *, lines: bool = False) -> str:
    """``value`` as terminal-safe text: tab, CR and LF become spaces (LF kept with
    ``lines``), every other control character U+FFFD."""
    text = "" if value is None else str(value)
    if lines:
        text = text.replace("\r\n", "\n")

    def one(m: re.Match[str]) -> str:
        c = m.group()
        if c == "\n" and lines:
            return c
        return " " if c in "\t\r\n" else "\ufffd"

    return _CONTROLS.sub(one, text)


def _cell(value: object, style: str = "") -> Text:
    """A table cell (or title) shown literally."""
    return Text(_plain(value), style=style)


def _cells(*values: object) -> list[Text]:
    return [_cell(v) for v in values]


def _config(ctx: click.Context) -> config_mod.Config:
    cfg: config_mod.Config = ctx.obj
    return cfg


def _require_sqlite_file(url: str) -> None:
    """A command that reads the store must not leave an empty SQLite file behind when
    pointed at the wrong path (SQLite creates the file on connect)."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:") \
            and not Path(parsed.database).exists():
        raise click.ClickException(
            f"no database at {parsed.database}: check [database] url, or create it with "
            "`ciserver db upgrade` (`ciserver serve` does too)")


def run_with(ctx: click.Context, fn: Callable[[Services], Awaitable[T]],
             check_schema: bool = True) -> T:
    """Open the store, check the schema, run ``fn``, close."""
    cfg = _config(ctx)
    if check_schema:
        _require_sqlite_file(cfg.database_url)

    async def main() -> T:
        svc = Services.open(cfg)
        try:
            if check_schema:
                head = db.head_revision(cfg.database_url)
                current = await db.current_revision(svc.engine)
                if current != head:
                    raise click.ClickException(
                        f"the database at {cfg.database_url} is not at the current schema "
                        f"(has {current or 'none'}, needs {head}): run `ciserver db upgrade`")
            return await fn(svc)
        finally:
            await svc.close()

    return asyncio.run(main())


@click.group()
@click.option("-c", "--config", "config_path", envvar="CISERVER_CONFIG",
              type=click.Path(dir_okay=False), help="TOML config file (env CISERVER_CONFIG).")
@click.version_option(package_name="ciserver")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """ciserver: calendar invites that stay up to date, and answers that are counted."""
    try:
        # `dkim keygen` makes the key file the configuration may already name
        ctx.obj = config_mod.load(config_path, check_files=ctx.invoked_subcommand != "dkim")
    except config_mod.ConfigError as exc:
        raise click.ClickException(f"configuration error: {exc}") from None


def run_loop(coro: Any, kind: str) -> Any:
    """asyncio.run on uvloop when it is installed and wanted (bench/inbound measures it)."""
    if kind in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise click.ClickException("[server] event_loop = \"uvloop\" but uvloop is "
                                           "not installed (pip install uvloop)") from None
        else:
            return uvloop.run(coro)
    return asyncio.run(coro)


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run the daemon in the foreground (SMTP, web/API, inbox, relay)."""
    from .daemon import serve as serve_daemon
    from .daemon import setup_logging, tune_gc

    cfg = _config(ctx)
    setup_logging(cfg.server.log_level)
    tune_gc()
    try:
        code = run_loop(serve_daemon(cfg), cfg.server.event_loop)
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    sys.exit(code)


@main.command()
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Where the demo keeps its database (default: STATE_DIR/demo).")
@click.option("--port", default=8080, show_default=True, help="Web port on 127.0.0.1.")
@click.option("--exit", "exit_after", is_flag=True, help="Stop after the story.")
@click.pass_context
def demo(ctx: click.Context, state_dir: str | None, port: int, exit_after: bool) -> None:
    """Play the whole story on loopback, with a built-in smarthost, then keep running."""
    from .daemon import setup_logging
    from .demo import run

    cfg = _config(ctx)
    setup_logging("warning")
    target = Path(state_dir) if state_dir else cfg.state_path / "demo"
    try:
        code = asyncio.run(run(target, web_port=port, say=click.echo,
                               keep_running=not exit_after))
    except KeyboardInterrupt:
        code = 0
    except OSError as exc:
        raise click.ClickException(f"cannot start the demo: {exc}") from None
    sys.exit(code)


@main.command("worker", hidden=True)
@click.argument("kind", type=click.Choice(["inbox"]))
@click.pass_context
def worker(ctx: click.Context, kind: str) -> None:
    """Internal: a worker process that `serve` starts and stops."""
    from .daemon import inbox_worker, setup_logging, tune_gc

    cfg = _config(ctx)
    setup_logging(cfg.server.log_level)
    tune_gc()
    sys.exit(run_loop(inbox_worker(cfg), cfg.server.event_loop))


# ---------------------------------------------------------------------------------------------
@main.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply the Alembic migrations up to the newest schema."""
    cfg = _config(ctx)
    asyncio.run(db.upgrade(cfg.database_url))
    click.echo(f"database is at revision {db.head_revision(cfg.database_url)}")


@db_group.command("current")
@click.pass_context
def db_current(ctx: click.Context) -> None:
    """Show the schema revision of the database."""

    async def fn(svc: Services) -> str | None:
        return await db.current_revision(svc.engine)

    _require_sqlite_file(_config(ctx).database_url)
    click.echo(run_with(ctx, fn, check_schema=False) or "empty (run `ciserver db upgrade`)")


@db_group.command("backup")
@click.argument("file", type=click.Path(dir_okay=False))
@click.pass_context
def db_backup(ctx: click.Context, file: str) -> None:
    """Copy the SQLite database to FILE, safely while the daemon runs (SQLite's online
    backup API: one consistent snapshot; the daemon keeps writing meanwhile). Never
    overwrites FILE. For PostgreSQL it explains pg_dump and exits with status 1."""
    import sqlite3

    from sqlalchemy.engine import URL, make_url

    cfg = _config(ctx)
    url = make_url(cfg.database_url)
    if url.get_backend_name() != "sqlite":
        target = URL.create("postgresql", username=url.username, host=url.host,
                            port=url.port, database=url.database
                            ).render_as_string(hide_password=False)  # no password shown
        click.echo(
            "[database] url is PostgreSQL: `ciserver db backup` copies SQLite databases.\n"
            "Back up PostgreSQL with pg_dump, safe while ciserver runs (one consistent "
            "snapshot):\n"
            f"  pg_dump --format=custom --file={file} '{target}'\n"
            "Restore into an empty database, then start ciserver:\n"
            f"  pg_restore --no-owner --dbname='{target}' {file}\n"
            "(the password comes from ~/.pgpass or PGPASSWORD)\n"
            "Keep the token secret with it: [server] secret_key, or STATE_DIR/secret_key.",
            err=True)
        sys.exit(1)
    source = Path(url.database or "")
    if not url.database or url.database == ":memory:" or not source.is_file():
        raise click.ClickException(f"no SQLite database file at {source} ([database] url)")
    out = Path(file)
    if out.exists():
        raise click.ClickException(f"{out} exists: give a new file name (a backup never "
                                   "overwrites)")
    try:
        size, revision = _sqlite_backup(source, out)
    except FileExistsError:
        raise click.ClickException(f"{out} exists: give a new file name (a backup never "
                                   "overwrites)") from None
    except (OSError, sqlite3.Error) as exc:
        raise click.ClickException(f"backup of {source} to {out} failed: {exc}") from None
    click.echo(f"backed up {source} to {out}: {size} bytes, schema revision {revision}")
    if not cfg.server.secret_key:
        click.echo(f"Keep {cfg.state_path / 'secret_key'} with it (or set [server] "
                   "secret_key): the reply addresses and links in invites already sent are "
                   "made with it.")


def _sqlite_backup(source: Path, out: Path) -> tuple[int, str]:
    """Copy ``source`` to ``out`` (must not exist): a partial file in the same directory,
    checked, then linked into place, which fails rather than replace a file that appeared
    meanwhile. Returns (bytes, schema revision)."""
    import os
    import sqlite3

    partial = out.with_name(f".{out.name}.{os.getpid()}.partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # secrets inside
    os.close(fd)
    try:
        src = sqlite3.connect(str(source), timeout=30)
        dst = sqlite3.connect(str(partial))
        try:
            # pages=-1: the whole database in one step, from one read snapshot. In WAL mode
            # the daemon's writes go on meanwhile; a stepwise copy would restart after each.
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal
            check = dst.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"the copy does not check out: {check}")
            row = dst.execute("SELECT version_num FROM alembic_version").fetchone()
        finally:
            dst.close()
            src.close()
        with partial.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.link(partial, out)  # FileExistsError instead of overwriting
        return out.stat().st_size, str(row[0]) if row else "none"
    finally:
        partial.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Health: `ciserver status`

INBOX_STUCK = 300  # seconds a new inbox message may wait before status calls it stuck
OUTBOX_OVERDUE = 900  # seconds a due outbox item may wait before the relay counts as stuck


def _local(host: str) -> str:
    """Where to connect to a listener bound to ``host`` (all interfaces = loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)  # noqa: S104


async def _probe_smtp(host: str, port: int, seconds: float) -> tuple[bool, str]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), seconds)
    except (OSError, TimeoutError) as exc:
        return False, f"{host}:{port}: cannot connect ({exc or type(exc).__name__})"
    try:
        banner = (await asyncio.wait_for(reader.readline(), seconds)).decode("latin-1").strip()
        writer.write(b"QUIT\r\n")
        await writer.drain()
    except (OSError, TimeoutError) as exc:
        return False, f"{host}:{port}: no greeting ({exc or type(exc).__name__})"
    finally:
        writer.close()
    return banner.startswith("220"), f"{host}:{port}: {banner[:80] or 'no greeting'}"


async def _probe_http(host: str, port: int, path: str, seconds: float) -> tuple[bool, str]:
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}{path}"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), seconds)
    except (OSError, TimeoutError) as exc:
        return False, f"{where}: cannot connect ({exc or type(exc).__name__})"
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        line = (await asyncio.wait_for(reader.readline(), seconds)).decode("latin-1").strip()
    except (OSError, TimeoutError) as exc:
        return False, f"{where}: no answer ({exc or type(exc).__name__})"
    finally:
        writer.close()
    parts = line.split(" ", 2)
    ok = len(parts) >= 2 and parts[1] == "200"
    return ok, f"{where}: {' '.join(parts[1:]) if len(parts) > 1 else 'no answer'}"


@main.command()
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds for each check.")
@click.pass_context
def status(ctx: click.Context, timeout: float) -> None:
    """Is the server healthy? Checks the database (reachable, at the current schema), the
    SMTP and web listeners (a 220 greeting, GET /healthz), the inbox (failures in the last
    hour, mail waiting over 5 minutes) and the outbox (depth, oldest, due mail not sent for
    15 minutes, failures in the last hour). Exit status 1 if something is wrong."""
    from . import metrics

    cfg = _config(ctx)
    rows: list[tuple[str, str, str]] = []  # check, ok | warn | FAIL, detail

    async def database() -> metrics.QueueState | None:
        url = cfg.database_url
        if url.startswith("sqlite"):
            path = Path(url.split("///", 1)[1]) if "///" in url else None
            if path is not None and not path.is_file():
                rows.append(("database", "FAIL", f"no database file at {path} (start the "
                                                 "daemon or run `ciserver db upgrade`)"))
                return None
        engine = db.make_engine(url)
        try:
            current = await asyncio.wait_for(db.current_revision(engine), timeout)
            head = db.head_revision(url)
            if current != head:
                rows.append(("database", "FAIL", f"schema at {current or 'none'}, this "
                             f"ciserver needs {head}: run `ciserver db upgrade`"))
            else:
                rows.append(("database", "ok", f"{_shown_url(url)} at revision {head}"))
            return await asyncio.wait_for(
                metrics.queue_state(engine, datetime.now(UTC), detail=True), timeout)
        except Exception as exc:
            rows.append(("database", "FAIL", f"{_shown_url(url)}: {type(exc).__name__}: "
                                             f"{str(exc).splitlines()[0] if str(exc) else ''}"))
            return None
        finally:
            await engine.dispose()

    async def main() -> metrics.QueueState | None:
        st = await database()
        host, port = config_mod.split_hostport(cfg.smtp.listen, "smtp", "listen", cfg.source)
        ok, detail = await _probe_smtp(_local(host), port, timeout)
        rows.append(("smtp listener", "ok" if ok else "FAIL", detail))
        host, port = config_mod.split_hostport(cfg.web.listen, "web", "listen", cfg.source)
        ok, detail = await _probe_http(_local(host), port, "/healthz", timeout)
        rows.append(("web listener", "ok" if ok else "FAIL", detail))
        return st

    st = asyncio.run(main())
    if st is not None:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(st.inbox.items())) or "empty"
        stuck = st.age(st.inbox_oldest)
        if st.inbox_failed_recently:
            rows.append(("inbox", "FAIL", f"{st.inbox_failed_recently} failed in the last hour "
                         f"(`ciserver inbox list --status failed`); {counts}"))
        elif stuck > INBOX_STUCK:
            rows.append(("inbox", "FAIL", f"the oldest new message waits for {_age_s(stuck)}: "
                         f"is the inbox processor running? {counts}"))
        else:
            rows.append(("inbox", "ok", counts))
        waiting = st.outbox.get("pending", 0) + st.outbox.get("sending", 0)
        detail = f"{waiting} waiting"
        if waiting:
            detail += f", oldest queued {_age_s(st.age(st.outbox_oldest))} ago"
        detail += f"; {st.outbox.get('failed', 0)} failed in all"
        overdue = st.age(st.outbox_overdue)
        if overdue > OUTBOX_OVERDUE:
            rows.append(("outbox", "FAIL", f"mail due {_age_s(overdue)} ago is not sent: is "
                         f"the relay running? {detail}"))
        elif st.outbox_failed_recently:
            rows.append(("outbox", "warn", f"{st.outbox_failed_recently} failed in the last "
                         f"hour (`ciserver queue list --state failed`); {detail}"))
        else:
            rows.append(("outbox", "ok", detail))
    style = {"ok": "green", "warn": "yellow", "FAIL": "bold red"}
    table = Table("check", "state", "detail", title=_cell(f"ciserver status ({cfg.source})"))
    for check, state, detail in rows:
        table.add_row(_cell(check), _cell(state, style[state]), _cell(detail))
    console.print(table)
    failed = [check for check, state, _ in rows if state == "FAIL"]
    if failed:
        console.print(f"[bold red]unhealthy[/]: {', '.join(failed)}")
        sys.exit(1)
    console.print("[green]healthy[/]")


def _age_s(seconds: float) -> str:
    from datetime import timedelta

    return _age(timedelta(seconds=seconds))


def _shown_url(url: str) -> str:
    from .daemon import _safe_url

    return _safe_url(url)


# ---------------------------------------------------------------------------------------------
@main.group()
def apikey() -> None:
    """API keys (shown once, stored hashed)."""


@apikey.command("create")
@click.option("--organizer", help="Key for one organizer's events (EMAIL).")
@click.option("--domain", help="Key for every organizer under DOMAIN (reports).")
@click.option("--admin", is_flag=True, help="Key that sees everything.")
@click.option("--label", default="", help="A note to recognise the key by.")
@click.pass_context
def apikey_create(ctx: click.Context, organizer: str | None, domain: str | None, admin: bool,
                  label: str) -> None:
    """Create a key; the key alone is the last line of output."""
    from .services import apikeys

    if sum(bool(x) for x in (organizer, domain, admin)) != 1:
        raise click.UsageError("give exactly one of --organizer EMAIL, --domain DOMAIN, --admin")
    if organizer and "@" not in organizer:
        raise click.BadParameter(f"{organizer!r} is not an email address", param_hint="--organizer")

    async def fn(svc: Services) -> tuple[Any, str]:
        return await apikeys.create(svc, organizer=organizer, domain=domain, admin=admin,
                                    label=label)

    row, key = run_with(ctx, fn)
    who = row.organizer_email or row.domain or "everything"
    click.echo(f"created {row.scope} key {row.prefix}… for {who} (store it now; it is not "
               "shown again)", err=False)
    click.echo(key)


@apikey.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array (for scripts).")
@click.pass_context
def apikey_list(ctx: click.Context, as_json: bool) -> None:
    """List keys (prefixes only, never the keys) with their last use (to the minute)."""
    import json

    from .services import apikeys

    def when(value: datetime | None) -> str:
        return f"{value:%Y-%m-%d %H:%M}" if value else ""

    rows = run_with(ctx, apikeys.listing)
    if as_json:
        click.echo(json.dumps([{
            "id": r.id, "prefix": r.prefix, "scope": r.scope, "organizer": r.organizer_email,
            "domain": r.domain, "label": r.label,
            "created_at": r.created_at.isoformat(),
            "last_used_at": r.last_used_at.isoformat() if r.last_used_at else None,
            "revoked_at": r.revoked_at.isoformat() if r.revoked_at else None,
        } for r in rows], indent=2))
        return
    table = Table("id", "prefix", "scope", "for", "label", "created", "last used", "revoked")
    for r in rows:
        table.add_row(*_cells(r.id, r.prefix, r.scope, r.organizer_email or r.domain or "*",
                              r.label, when(r.created_at), when(r.last_used_at) or "never",
                              when(r.revoked_at)))
    console.print(table)


@apikey.command("revoke")
@click.argument("key_ref")
@click.pass_context
def apikey_revoke(ctx: click.Context, key_ref: str) -> None:
    """Revoke a key by id or prefix."""
    from .services import apikeys

    async def fn(svc: Services) -> bool:
        return await apikeys.revoke(svc, key_ref)

    if not run_with(ctx, fn):
        raise click.ClickException(f"no active key {key_ref!r}")
    click.echo(f"revoked {key_ref}")


# ---------------------------------------------------------------------------------------------
@main.group()
def events() -> None:
    """Events."""


@events.command("list")
@click.option("--organizer", help="Only this organizer's events.")
@click.option("--domain", help="Only events of organizers under DOMAIN.")
@click.option("--status", type=click.Choice(["confirmed", "cancelled"]))
@click.option("--limit", default=100, show_default=True)
@click.pass_context
def events_list(ctx: click.Context, organizer: str | None, domain: str | None,
                status: str | None, limit: int) -> None:
    """List events with their answer counts."""
    from .services import events as ev
    from .web.api import counts_for

    async def fn(svc: Services) -> list[tuple[Any, Any]]:
        async with svc.sessions() as session:
            rows = await ev.listing(session, organizer=organizer, domain=domain, status=status,
                                    limit=limit)
            counts = await counts_for(session, [e.id for e in rows])
            return [(e, counts[e.id]) for e in rows]

    rows = run_with(ctx, fn)
    table = Table("id", "start (UTC)", "summary", "organizer", "status", "seq", "invited",
                  "Y", "N", "M", "page")
    cfg = _config(ctx)
    for e, c in rows:
        table.add_row(*_cells(e.public_id, f"{e.start_at:%Y-%m-%d %H:%M}", e.summary,
                              e.organizer_email, e.status, e.sequence, c.invited, c.yes, c.no,
                              c.maybe, f"{cfg.base_url}/e/{e.public_id}"))
    console.print(table)


async def _find_event(session: Any, ref: str) -> Any:
    """The event EVENT names (API id, customer UID or organizer's UID), or a ClickException:
    none, or an organizer's UID that several organizers' events share (co-organizers),
    listing those events so the user can pick one by its API id."""
    from .services import events as ev

    try:
        return await ev.find(session, ref, unique=True)
    except ev.NotFound as exc:
        raise click.ClickException(str(exc)) from None
    except ev.Ambiguous as exc:
        lines = [f"{_plain(repr(ref))} matches {exc.matches} events (organizers share that "
                 "UID): give the API id of one"]
        lines += [f"  {e.public_id}  {_plain(e.organizer_email)}  "
                  f"{e.start_at:%Y-%m-%d %H:%M} UTC  {_plain(e.summary)[:60]}"
                  for e in exc.candidates]
        raise click.ClickException("\n".join(lines)) from None


def _people_csv(path: str) -> list[tuple[int, str, str]]:
    """(line, email, name) of the CSV file's customers, read exactly as POST
    /events/{id}/attendees reads an upload (ciserver/peoplecsv.py: character set by BOM,
    else UTF-8, else Windows-1252; ``,``/``;``/tab; header names). A file that cannot be
    read is a ClickException naming it: a customer list from a spreadsheet is the most
    ordinary input there is and must never end in a traceback. "-" reads standard input."""
    from . import peoplecsv

    where = "standard input" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as exc:
        raise click.ClickException(f"--csv {_plain(where)}: cannot read it "
                                   f"({_plain(exc.strerror or exc)})") from None
    try:
        return [(p.line, p.email, p.name) for p in peoplecsv.parse(peoplecsv.decode(data))]
    except peoplecsv.CsvError as exc:
        raise click.ClickException(f"--csv {_plain(where)}: {_plain(exc)}") from None


@main.command()
@click.argument("event")
@click.option("--csv", "csv_file", metavar="FILE",
              help="CSV of customers: email[,name], or columns named by a header row "
                   "(email, name / first name, last name); any of , ; tab; \"-\" for stdin.")
@click.option("--email", "emails", multiple=True, help="A customer address (repeatable).")
@click.pass_context
def invite(ctx: click.Context, event: str, csv_file: str | None,
           emails: tuple[str, ...]) -> None:
    """Send EVENT's invite to customers (the twin of POST /events/{id}/attendees). A bad
    address refuses the whole list, naming its CSV line."""
    from .services import subscriptions

    where = "standard input" if csv_file == "-" else csv_file
    rows = [(f"{where}, line {line}", e, n)
            for line, e, n in (_people_csv(csv_file) if csv_file else [])]
    if csv_file and not rows and not emails:  # not "give --csv FILE": the user did
        raise click.ClickException(f"--csv {_plain(where)}: no customers in it")
    rows += [("--email", e, "") for e in emails]
    if not rows:
        raise click.UsageError("give --csv FILE or --email ADDRESS")
    for place, address, _ in rows:  # all or nothing: check every address first
        try:
            subscriptions.check_email(address)
        except subscriptions.InvalidAddress as exc:
            raise click.ClickException(f"{_plain(place)}: {_plain(exc)}") from None
    people = [(e, n) for _, e, n in rows]

    async def fn(svc: Services) -> tuple[int, int]:
        async with svc.sessions.begin() as session:
            target = await _find_event(session, event)
            try:
                return await subscriptions.invite_many(svc, session, target, people, "api")
            except (subscriptions.InvalidAddress, subscriptions.EventClosed) as exc:
                raise click.ClickException(str(exc)) from None

    queued, already = run_with(ctx, fn)
    click.echo(f"{queued} invite(s) queued, {already} already had it")


# ---------------------------------------------------------------------------------------------
@main.group()
def report() -> None:
    """Who is coming: per event, organizer or domain (counts, rows, history, charts)."""


def _stderr_console() -> Console:
    return Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def _progress_bar() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(),
                    MofNCompleteColumn(), TextColumn("rows"), TimeRemainingColumn(),
                    console=_stderr_console(), transient=sys.stderr.isatty())


def _counts_cells(c: Any) -> list[Text]:
    return _cells(c.invited, c.yes, c.no, c.maybe, c.no_answer, c.bounced, c.unsubscribed)


_COUNT_HEADERS = ("invited", "Y", "N", "M", "no answer", "bounced", "unsub.")


def _report(ctx: click.Context, opts: dict[str, Any], title: str, **scope: Any) -> None:
    """Every `report` command: a table, CSV (stdout or --output), a chart, or a mail."""
    from .services import reports, subscriptions

    fmt, history, chart = opts["fmt"], opts["history"], opts["chart"]
    output: str | None = opts["output"]
    if output and fmt == "table" and not chart:
        fmt = "csv"  # --output FILE writes the CSV
    show_progress = opts["progress"]
    if show_progress is None:
        show_progress = sys.stderr.isatty() and (bool(output) or not sys.stdout.isatty())

    async def find_event(svc: Services) -> Any:
        async with svc.sessions() as session:
            event = await _find_event(session, scope.pop("event_ref"))
        scope["event_id"] = event.id
        return event

    async def fn(svc: Services) -> Any:
        event = await find_event(svc) if "event_ref" in scope else None
        if opts["send"]:
            to = opts["to"] or (event.organizer_email if event else scope.get("organizer"))
            if not to:
                raise click.UsageError("--send for a domain report needs --to EMAIL")
            try:  # a bare name would be completed by a relay into someone else's mailbox
                to = subscriptions.check_email(to)
            except subscriptions.InvalidAddress as exc:
                raise click.BadParameter(str(exc), param_hint="'--to'") from None
            name = f"{event.public_id}.csv" if event else "report.csv"
            mail = await reports.mail_report(svc, to=to, title=event.summary if event else title,
                                             history=history, filename=name,
                                             bom=svc.config.reports.attachment_bom, **scope)
            return ("sent", mail)
        if chart:
            from .services import charts

            if event is not None:
                svg = await (charts.event_timeline(svc, event) if chart == "timeline"
                             else charts.event_games(svc, event))
            elif chart == "timeline":
                svg = await charts.scope_timeline(svc, title=f"Answers over time: {title}",
                                                  **scope)
            else:
                svg = await charts.scope_games(svc, title=f"Yes / no / maybe: {title}",
                                               limit=opts["limit"], **scope)
            _write_out(output, [svg])
            return ("done", None)
        if fmt == "csv":
            await _export(svc, output, history, opts["bom"], show_progress, title, scope)
            return ("done", None)
        return ("table", await _tables(svc, event, history, opts["limit"], scope))

    kind, value = run_with(ctx, fn)
    if kind == "sent":
        click.echo(_plain(f"report queued for delivery to {value.to} ({value.filename}, "
                          f"{value.rows} rows)"))
    elif kind == "table":
        for item in value:
            console.print(item)


def _write_out(output: str | None, chunks: Any) -> None:
    out = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115
    try:
        for chunk in chunks:
            out.write(chunk.encode("utf-8"))
    finally:
        if output:
            out.close()
        else:
            out.flush()


async def _export(svc: Services, output: str | None, history: bool, bom: bool,
                  show_progress: bool, title: str, scope: dict[str, Any]) -> None:
    """CSV to a file or stdout; the progress bar (if any) goes to stderr."""
    from .services import reports

    progress = _progress_bar() if show_progress else None
    advance: Any = None
    if progress is not None:
        total = await reports.count_rows(svc, **scope) if not history else None
        task = progress.add_task(escape(_plain(f"{title} → {output or 'stdout'}")),
                                 total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)

        progress.start()
    out = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115, ASYNC230
    try:
        fast = None if history else reports.csv_sync_chunks(svc, bom=bom, progress=advance,
                                                            **scope)
        if fast is not None:  # SQLite: no event loop between the rows and the file
            for chunk in fast:
                out.write(chunk.encode("utf-8"))
        else:
            chunks = (reports.history_csv_chunks(svc, bom=bom, progress=advance, **scope)
                      if history else reports.csv_chunks(svc, bom=bom, progress=advance,
                                                         **scope))
            async for chunk in chunks:
                out.write(chunk.encode("utf-8"))
    finally:
        if output:
            out.close()
        else:
            out.flush()
        if progress is not None:
            progress.stop()


async def _tables(svc: Services, event: Any, history: bool, limit: int,
                  scope: dict[str, Any]) -> list[Any]:
    """Rich tables: counts (per event, occurrence, organizer, source), then rows or history."""
    from .services import reports

    out: list[Any] = []
    async with svc.sessions() as session:
        events = await reports.event_summaries(session, limit=limit, **scope)
        per = Table("start (UTC)", "event", "id", *_COUNT_HEADERS,
                    title="answers per event" if event is None else _cell(event.summary))
        for e in events:
            summary = _cell(e.summary)
            if e.status == "cancelled":
                summary.append(" (cancelled)", style="dim")
            per.add_row(_cell(f"{e.start:%Y-%m-%d %H:%M}"), summary, _cell(e.id),
                        *_counts_cells(e.counts))
        if event is None:
            total = await reports.totals(session, **scope)
            per.add_section()
            n = await reports.event_count(session, organizer=scope.get("organizer"),
                                          domain=scope.get("domain"))
            per.add_row("", Text(f"all {n} event(s)", style="bold"), "",
                        *_counts_cells(total))
        out.append(per)
        if event is not None and event.recurring:
            occ = Table("occurrence (UTC)", *_COUNT_HEADERS, title="per occurrence")
            for key, c in await reports.occurrence_counts(session, event, limit):
                occ.add_row(_cell(key), *_counts_cells(c))
            out.append(occ)
        if scope.get("domain"):
            orgs = Table("organizer", "events", *_COUNT_HEADERS, title="per organizer")
            for o in await reports.organizer_summaries(session, scope["domain"]):
                orgs.add_row(*_cells(o.organizer, o.events), *_counts_cells(o.counts))
            out.append(orgs)
        src = Table("source", "origin", *_COUNT_HEADERS, title="where customers came from")
        for s in await reports.source_summaries(session, **scope):
            src.add_row(*_cells(s.source, s.origin), *_counts_cells(s.counts))
        out.append(src)
        shown = 0
        if history:
            table = Table("received (UTC)", "event", "email", "occurrence", "answer", "outcome",
                          "seq", "comment", title="answer history")
            async for h in reports.stream_history(session, **scope):
                if shown >= limit:
                    shown += 1
                    continue
                style = {"late": "yellow", "stale": "dim", "counter": "cyan"}.get(h.outcome)
                table.add_row(*_cells(h.received_at, h.event_summary, h.email, h.occurrence,
                                      f"{h.rsvp or '-'} {h.partstat}",
                                      h.outcome.upper() if h.outcome != "applied"
                                      else h.outcome, h.sequence, h.comment[:60]),
                              style=style)
                shown += 1
        else:
            table = Table("event", "start (UTC)", "email", "name", "rsvp", "partstat",
                          "responded", "occurrence", "status", "source", "origin",
                          title="answers")
            async for r in reports.stream_rows(session, **scope):
                if shown >= limit:
                    shown += 1
                    continue
                table.add_row(*_cells(r.event_summary, r.event_start, r.email, r.name,
                                      r.rsvp or "-", r.partstat, r.responded_at, r.occurrence,
                                      r.status, r.source, r.origin))
                shown += 1
        out.append(table)
        if shown > limit:
            out.append(f"[dim]{shown - limit} more row(s) not shown: --limit N, or --format csv "
                       "for all[/dim]")
    return out


def _report_options(fn: Any) -> Any:
    options = [
        click.option("--format", "fmt", type=click.Choice(["table", "csv"]), default="table",
                     show_default=True),
        click.option("--history", is_flag=True,
                     help="Every answer received, with its time; late answers (after the event "
                          "ended) and stale ones are kept and flagged."),
        click.option("-o", "--output", type=click.Path(dir_okay=False, writable=True),
                     help="Write the CSV (or --chart) to FILE, with a progress bar."),
        click.option("--progress/--no-progress", default=None,
                     help="Progress bar on stderr while exporting [default: when stderr is a "
                          "terminal and the CSV goes to a file or a pipe]."),
        click.option("--chart", type=click.Choice(["timeline", "games"]),
                     help="An SVG chart instead: answers over time, or Y / N / M per game."),
        click.option("--limit", default=200, show_default=True,
                     help="Rows (and events) shown in tables and charts."),
        click.option("--send", is_flag=True, help="Mail the CSV to the organizer."),
        click.option("--to", help="Mail the report to this address instead."),
        click.option("--bom", is_flag=True, help="Start the CSV with a UTF-8 BOM (for Excel)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@report.command("event")
@click.argument("event")
@_report_options
@click.pass_context
def report_event(ctx: click.Context, /, event: str, **opts: Any) -> None:
    """One event (EVENT = the API id or the event's UID)."""
    _report(ctx, opts, f"event {event}", event_ref=event)


@report.command("organizer")
@click.argument("email")
@_report_options
@click.pass_context
def report_organizer(ctx: click.Context, /, email: str, **opts: Any) -> None:
    """All events of one organizer."""
    _report(ctx, opts, f"organizer {email}", organizer=email.lower())


@report.command("domain")
@click.argument("domain")
@_report_options
@click.pass_context
def report_domain(ctx: click.Context, /, domain: str, **opts: Any) -> None:
    """All events of every organizer under DOMAIN."""
    _report(ctx, opts, f"domain {domain}", domain=domain.lower())


# ---------------------------------------------------------------------------------------------
INBOX_STATUSES = ("new", "processing", "done", "ignored", "rejected", "quarantined", "failed")
QUEUE_STATES = ("pending", "sending", "sent", "failed", "cancelled")


@main.group("inbox")
def inbox_group() -> None:
    """Received mail: inspect and retry."""


@inbox_group.command("list")
@click.option("--status", type=click.Choice(INBOX_STATUSES))
@click.option("--limit", default=50, show_default=True)
@click.pass_context
def inbox_list(ctx: click.Context, status: str | None, limit: int) -> None:
    """Newest messages first."""
    from .services import inbox

    async def fn(svc: Services) -> Any:
        return await inbox.listing(svc, status, limit)

    table = Table("id", "received (UTC)", "status", "from", "to", "size", "result / error")
    for m in run_with(ctx, fn):
        note = (m.error or m.result).splitlines()[0] if (m.error or m.result) else ""
        table.add_row(*_cells(m.id, f"{m.received_at:%Y-%m-%d %H:%M:%S}", m.status,
                              m.mail_from, m.rcpt_to.replace("\n", ", "), m.size, note[:100]))
    console.print(table)


@inbox_group.command("show")
@click.argument("inbox_id", type=int)
@click.option("--raw", is_flag=True, help="Print the raw message only.")
@click.pass_context
def inbox_show(ctx: click.Context, inbox_id: int, raw: bool) -> None:
    """One message: status, result or error, headers."""
    from .services import inbox

    async def fn(svc: Services) -> Any:
        return await inbox.get(svc, inbox_id)

    m = run_with(ctx, fn)
    if m is None:
        raise click.ClickException(f"no inbox message {inbox_id}")
    if raw:
        sys.stdout.buffer.write(m.raw)
        return
    click.echo(_plain(
        f"id:          {m.id}\nreceived:    {m.received_at:%Y-%m-%d %H:%M:%S} UTC "
        f"via {m.source} from {_plain(m.peer)}\nenvelope:    {_plain(m.mail_from)} -> "
        f"{_plain(m.rcpt_to.replace(chr(10), ', '))}\nmessage-id:  {_plain(m.message_id)}\n"
        f"size:        {m.size} bytes\nstatus:      {m.status} (attempts {m.attempts})",
        lines=True))
    if m.result:
        click.echo("result:\n  " + _plain(m.result, lines=True).replace("\n", "\n  "))
    if m.error:
        click.echo("error:\n  " + _plain(m.error, lines=True).replace("\n", "\n  "))
    head = m.raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    click.echo("headers:\n  " + _plain(head.decode("utf-8", "replace"),
                                         lines=True).replace("\n", "\n  "))


@inbox_group.command("retry")
@click.argument("ids", type=int, nargs=-1)
@click.option("--all-failed", is_flag=True, help="Retry every failed message.")
@click.pass_context
def inbox_retry(ctx: click.Context, ids: tuple[int, ...], all_failed: bool) -> None:
    """Process messages again (the daemon picks them up)."""
    from .services import inbox

    if not ids and not all_failed:
        raise click.UsageError("give message ids or --all-failed")

    async def fn(svc: Services) -> int:
        await _require_ids(svc, "inbox message", ids)
        return await inbox.retry(svc, list(ids) or None)

    click.echo(f"{run_with(ctx, fn)} message(s) queued for processing again")


@inbox_group.command("import")
@click.argument("files", type=click.Path(exists=True, dir_okay=False), nargs=-1, required=True)
@click.option("--to", "rcpt", required=True, help="Recipient, e.g. create@DOMAIN.")
@click.pass_context
def inbox_import(ctx: click.Context, files: tuple[str, ...], rcpt: str) -> None:
    """Feed saved .eml files into the inbox as if they had arrived by SMTP."""
    from .services import inbox

    contents = [Path(f).read_bytes() for f in files]

    async def fn(svc: Services) -> list[int]:
        if svc.book.parse(rcpt) is None:
            raise click.BadParameter(f"{rcpt} is not one of this server's addresses",
                                     param_hint="--to")
        return [await inbox.accept(svc, data, "", [rcpt], source="cli") for data in contents]

    ids = run_with(ctx, fn)
    click.echo(f"stored as inbox message(s) {', '.join(map(str, ids))}")


# ---------------------------------------------------------------------------------------------
@main.group("queue")
def queue_group() -> None:
    """Outgoing mail: inspect, retry, purge."""


async def _require_ids(svc: Services, what: str, ids: tuple[int, ...]) -> None:
    """Ids given on the command line must exist: "0 item(s)" for a mistyped id reads like
    success."""
    from sqlalchemy import select

    from .store.models import InboxMessage, OutboxItem

    if not ids:
        return
    model: Any = InboxMessage if what == "inbox message" else OutboxItem
    async with svc.sessions() as session:
        found = set((await session.execute(select(model.id).where(model.id.in_(ids))
                                           )).scalars())
    missing = [str(i) for i in ids if i not in found]
    if missing:
        raise click.ClickException(f"no {what} {', '.join(missing)}: nothing done")


def _queue_filter(q: Any, ids: tuple[int, ...], state: str | None, domain: str | None) -> Any:
    from .store.models import OutboxItem

    if ids:
        q = q.where(OutboxItem.id.in_(ids))
    if state:
        q = q.where(OutboxItem.state == state)
    if domain:
        q = q.where(OutboxItem.rcpt_domain == domain.lower())
    return q


@queue_group.command("list")
@click.option("--state", type=click.Choice(QUEUE_STATES))
@click.option("--domain", help="Only mail to this recipient domain.")
@click.option("--limit", default=50, show_default=True)
@click.pass_context
def queue_list(ctx: click.Context, state: str | None, domain: str | None, limit: int) -> None:
    """Queue depth and age, the state per destination domain with its last error, then the
    newest items."""
    from sqlalchemy import case, func, select

    from .store.models import OutboxItem

    async def fn(svc: Services) -> tuple[Any, Any, Any, Any]:
        async with svc.sessions() as session:
            depth = (await session.execute(
                select(OutboxItem.state, func.count(), func.min(OutboxItem.queued_at))
                .group_by(OutboxItem.state))).all()
            waiting = OutboxItem.state.in_(("pending", "sending", "failed"))
            per_domain = (await session.execute(
                _queue_filter(select(
                    OutboxItem.rcpt_domain,
                    func.sum(case((OutboxItem.state == "pending", 1), else_=0)),
                    func.sum(case((OutboxItem.state == "sending", 1), else_=0)),
                    func.sum(case((OutboxItem.state == "failed", 1), else_=0)),
                    func.min(OutboxItem.queued_at), func.max(OutboxItem.id),
                ).where(waiting), (), state, domain)
                .group_by(OutboxItem.rcpt_domain)
                .order_by(func.count().desc()).limit(20))).all()
            errors = {}
            for row in per_domain:
                last = (await session.execute(
                    select(OutboxItem.last_response).where(
                        OutboxItem.rcpt_domain == row[0], OutboxItem.last_response != "",
                        OutboxItem.state.in_(("pending", "failed")))
                    .order_by(OutboxItem.updated_at.desc()).limit(1))).scalar_one_or_none()
                errors[row[0]] = last or ""
            q = _queue_filter(select(OutboxItem), (), state, domain)
            items = (await session.execute(
                q.order_by(OutboxItem.id.desc()).limit(limit))).scalars().all()
            return depth, per_domain, errors, items

    depth, per_domain, errors, items = run_with(ctx, fn)
    now = datetime.now(UTC)
    click.echo("depth: " + (", ".join(f"{s} {n}" for s, n, _ in depth) or "empty"))
    oldest = [q for s, _, q in depth if s in ("pending", "sending") and q is not None]
    if oldest:
        click.echo(f"oldest waiting: {_age(now - min(oldest))}")
    if per_domain:
        domains = Table("domain", "pending", "sending", "failed", "oldest", "last error",
                        title="per destination domain")
        for dom, pending, sending, failed, first, _ in per_domain:
            domains.add_row(*_cells(dom, pending or 0, sending or 0, failed or 0,
                                    _age(now - first) if first else "",
                                    errors.get(dom, "")[:70]))
        console.print(domains)
    table = Table("id", "kind", "to", "state", "attempts", "queued (UTC)", "next try",
                  "last answer")
    for i in items:
        table.add_row(*_cells(i.id, i.kind, i.rcpt_to, i.state, i.attempts,
                              f"{i.queued_at:%Y-%m-%d %H:%M:%S}",
                              f"{i.next_attempt_at:%Y-%m-%d %H:%M:%S}"
                              if i.state == "pending" else "",
                              (i.last_response or "")[:80]))
    console.print(table)


def _age(delta: Any) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


@queue_group.command("retry")
@click.argument("ids", type=int, nargs=-1)
@click.option("--state", default="failed", show_default=True, type=click.Choice(QUEUE_STATES),
              help="Which items to retry when no ids are given.")
@click.option("--domain", help="Only mail to this recipient domain.")
@click.pass_context
def queue_retry(ctx: click.Context, ids: tuple[int, ...], state: str, domain: str | None) -> None:
    """Send items again now."""
    from sqlalchemy import update

    from .store.models import OutboxItem

    async def fn(svc: Services) -> int:
        await _require_ids(svc, "queue item", ids)
        async with svc.sessions.begin() as session:
            q = _queue_filter(update(OutboxItem), ids, None if ids else state, domain)
            q = q.where(OutboxItem.state != "sending")  # a worker has it in hand
            res = await session.execute(q.values(state="pending", attempts=0,
                                                 next_attempt_at=svc.now(),
                                                 queued_at=svc.now()))
            return int(getattr(res, "rowcount", 0) or 0)

    click.echo(f"{run_with(ctx, fn)} item(s) will be sent again")


@queue_group.command("purge")
@click.argument("ids", type=int, nargs=-1)
@click.option("--state", type=click.Choice(QUEUE_STATES),
              help="Purge every item in this state (e.g. failed, sent).")
@click.option("--domain", help="Only mail to this recipient domain.")
@click.pass_context
def queue_purge(ctx: click.Context, ids: tuple[int, ...], state: str | None,
                domain: str | None) -> None:
    """Delete items from the queue."""
    from sqlalchemy import delete

    from .store.models import OutboxItem

    if not ids and not state and not domain:
        raise click.UsageError("give ids, --state or --domain (purging everything is refused)")

    async def fn(svc: Services) -> int:
        await _require_ids(svc, "queue item", ids)
        async with svc.sessions.begin() as session:
            q = _queue_filter(delete(OutboxItem), ids, state, domain)
            q = q.where(OutboxItem.state != "sending")  # never under a worker's feet
            res = await session.execute(q)
            return int(getattr(res, "rowcount", 0) or 0)

    click.echo(f"{run_with(ctx, fn)} item(s) purged")


# ---------------------------------------------------------------------------------------------
@main.group("dkim")
def dkim_group() -> None:
    """DKIM keys for signing outgoing mail."""


@dkim_group.command("keygen")
@click.option("--selector", help="DNS selector [default: ciserver-YYYYMM, "
                                 "ciserver-YYYYMM-ed25519 with --ed25519].")
@click.option("--out", type=click.Path(dir_okay=False),
              help="Private key file [default: STATE_DIR/dkim-SELECTOR.pem].")
@click.option("--bits", type=click.IntRange(1024, 4096), default=2048, show_default=True,
              help="RSA key size.")
@click.option("--ed25519", "ed", is_flag=True,
              help="An ed25519 key (RFC 8463) for the optional second signature.")
@click.option("--domain", help="Signing domain [default: [dkim] domain, else [server] domain].")
@click.option("--force", is_flag=True, help="Replace an existing key file.")
@click.pass_context
def dkim_keygen(ctx: click.Context, selector: str | None, out: str | None, bits: int, ed: bool,
                domain: str | None, force: bool) -> None:
    """Write a new private key (mode 0600) and print the DNS record and config lines."""
    import datetime
    import json
    import os
    import tempfile

    from . import signing

    cfg = _config(ctx)
    selector = selector or (f"ciserver-{datetime.date.today():%Y%m}"
                            + ("-ed25519" if ed else ""))
    if not config_mod.DNS_NAME.fullmatch(selector):
        raise click.BadParameter(f"{selector!r} is not a DNS label", param_hint="--selector")
    domain = (domain or cfg.dkim.domain or cfg.server.domain).rstrip(".")
    path = Path(out) if out else cfg.state_path / f"dkim-{selector}.pem"
    if path.exists() and not force:
        raise click.ClickException(f"{path} exists; give another --out, or --force to replace "
                                   "it (signatures made with the old key fail once it is "
                                   "gone: rotate with a new selector instead)")
    key: signing.PrivateKey = signing.generate_ed25519() if ed else signing.generate_rsa(bits)
    try:
        if not out:
            path.parent.mkdir(parents=True, exist_ok=True)
        if force:  # a private file beside it, renamed over: the old key stays whole till then
            fd, tmp = tempfile.mkstemp(prefix=".dkim-", dir=path.parent)
        else:  # O_EXCL: never over a file that appeared meanwhile
            fd, tmp = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), ""
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(signing.private_pem(key))
            if tmp:
                os.replace(tmp, path)
        finally:
            if tmp and os.path.lexists(tmp):
                os.unlink(tmp)
    except FileExistsError:
        raise click.ClickException(f"{path} exists; give another --out, or --force") from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {path}: {exc.strerror or exc}") from None
    kind = "ed25519" if ed else f"RSA-{bits}"
    prefix = "ed25519_" if ed else ""
    click.echo(f"wrote the {kind} private key to {path} (mode 0600)\n")
    click.echo("Publish this DNS record (zone-file syntax; long values are split into "
               "255-character strings):")
    click.echo(signing.zone_line(selector, domain, key))
    click.echo("\nIts value in one piece (for DNS providers' web forms):")
    click.echo(signing.dns_value(key))
    click.echo("\nThen add to the [dkim] section of the configuration:")
    click.echo(f"{prefix}selector = {json.dumps(selector)}")
    click.echo(f"{prefix}key_file = {json.dumps(str(path.resolve()))}")
    if domain != cfg.server.domain.rstrip(".") and not cfg.dkim.domain:
        click.echo(f"domain = {json.dumps(domain)}")
