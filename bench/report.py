"""bench/report: one organizer's full CSV export through the CLI, against `sqlite3 -csv`.

A SQLite database with 1,000,000 answers over 1,000 events (generated with the sqlite3
module's executemany: ~1,000 customers per event, 9 in 10 of them answered, and every
customer of each tenth event, a recurring one, also answered one occurrence). Two
organizers share the events, a small one (100 events) and a big one (900), so the export
runs at two sizes. For each:

  ciserver: `ciserver report organizer EMAIL --format csv > FILE`, a real process;
  anchor:   `sqlite3 -csv -header DB "SQL" > FILE` in the same run, on the same file, where
            SQL is the CLI's own query (the same union, filter and order, compiled by
            SQLAlchemy) with the CSV's formatting (ISO times, Y/N/M, formula neutralising)
            written in SQL.

Both outputs are parsed back and compared row by row (the same rows and cells; the two
quote differently). Prints both rates (rows/s), the ratio (target >= 0.5) and both
processes' peak RSS (from wait4), so one sees memory stay flat as rows grow 9-fold.

    .venv/bin/python -m bench.report [--events 1000] [--per-event 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.dialects import sqlite as sqlite_dialect

from ciserver.services import reports

from .common import clean_env, write_config

SMALL = "small@bench.example"
BIG = "big@bench.example"
BASE = datetime(2027, 1, 1, 18, 0, tzinfo=UTC)
PARTSTATS = ("ACCEPTED", "DECLINED", "TENTATIVE")


def ts(dt: datetime) -> str:
    """How SQLAlchemy stores a UTCDateTime in SQLite."""
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f")


def name_of(j: int) -> str:
    if j % 11 == 0:
        return 'O"Neil, Jr.'  # quotes and a comma
    if j % 13 == 0:
        return "=SUM(A1:A9)"  # a formula, to neutralise
    if j % 17 == 0:
        return "Zoë Ünal"
    return f"Fan {j}"


def generate(path: Path, n_events: int, per_event: int, small_events: int) -> int:
    """Fill an upgraded, empty database; returns the number of answers."""
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    now = ts(BASE - timedelta(days=30))
    events = []
    for i in range(1, n_events + 1):
        start = BASE + timedelta(hours=7 * i)
        organizer = SMALL if i <= small_events else BIG
        recurring = i % 10 == 0
        end = start + timedelta(hours=2)
        until = start + timedelta(days=21, hours=2) if recurring else end
        pid = f"bench{i:011d}"
        events.append((i, pid, f"{pid}@invites.example.com", f"game-{i}@calendar.example",
                       organizer, "bench.example", "Coach", "calendar", "",
                       f"Game {i}, Arena {i % 7}", "", "", ts(start), ts(end), "UTC", 0,
                       int(recurring), ts(until), 0, 0, "confirmed", now, now))
    conn.executemany(
        "INSERT INTO events (id, public_id, uid, organizer_uid, organizer_email, "
        "organizer_domain, organizer_name, origin, content, summary, location, description, "
        "start_at, end_at, tzid, all_day, recurring, rsvp_until, organizer_sequence, sequence,"
        " status, created_at, updated_at) VALUES "
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", events)

    def subs() -> Iterator[tuple[object, ...]]:
        sid = 0
        for i in range(1, n_events + 1):
            for j in range(per_event):
                sid += 1
                answered = j % 10 != 9
                status = "bounced" if j % 97 == 0 else "unsubscribed" if j % 89 == 0 \
                    else "active"
                source, origin = (("page", "spring-page"), ("page", "button"),
                                  ("api", "cis_benchkey0"), ("forwarded",
                                  f"forwarded by fan{j - 1:04d}@example.com"))[j % 4]
                yield (sid, i, f"fan{j:04d}@example{j % 50}.com", f"example{j % 50}.com",
                       name_of(j), status, source, origin,
                       PARTSTATS[j % 3] if answered else "NEEDS-ACTION",
                       ts(BASE - timedelta(minutes=j)) if answered else None, 0, 0, now, now)

    conn.executemany(
        "INSERT INTO subscriptions (id, event_id, email, domain, name, status, source, origin,"
        " partstat, responded_at, delivered_sequence, soft_bounces, created_at, updated_at) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", subs())

    def answers() -> Iterator[tuple[object, ...]]:
        sid = 0
        for i in range(1, n_events + 1):
            start = BASE + timedelta(hours=7 * i)
            for j in range(per_event):
                sid += 1
                when = ts(BASE - timedelta(minutes=j))
                if j % 10 != 9:
                    yield (sid, "", PARTSTATS[j % 3], 0, when, "", when)
                if i % 10 == 0:
                    occ = (start + timedelta(days=7 * (j % 4))).strftime("%Y-%m-%dT%H:%M:%SZ")
                    yield (sid, occ, PARTSTATS[(j + 1) % 3], 0, when, "", when)

    conn.executemany(
        "INSERT INTO answers (subscription_id, occurrence, partstat, sequence, stamp, comment,"
        " received_at) VALUES (?,?,?,?,?,?,?)", answers())
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    n = int(conn.execute("SELECT count(*) FROM answers").fetchone()[0])
    conn.close()
    return n


def _safe(col: str) -> str:
    firsts = ", ".join(f"'{c}'" for c in ("=", "+", "-", "@", "|", "%", "＝", "＋", "－", "＠"))
    return (f"CASE WHEN substr({col}, 1, 1) IN ({firsts}, char(9), char(13), char(10)) "
            f"THEN '''' || {col} ELSE {col} END")


def _iso(col: str) -> str:
    return f"substr({col}, 1, 10) || 'T' || substr({col}, 12, 8) || 'Z'"


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def anchor_sql(db_path: Path, organizer: str) -> str:
    """The CLI's statements for the sqlite3 shell: the organizer's events in order, then the
    rows of each (both from services.reports, compiled by SQLAlchemy, the parameters written
    in), with every cell of the CSV computed in SQL (ISO times, Y/N/M, neutralising)."""
    events_q, rows_q = reports.export_queries(organizer=organizer)
    sql, names, params = reports.compiled_sqlite(events_q)
    with sqlite3.connect(db_path) as conn:
        events = conn.execute(sql, [params[n] for n in names]).fetchall()
    mark = -987654321
    inner = str(rows_q.order_by(None).params({reports.EVENT.key: mark}).compile(
        dialect=sqlite_dialect.dialect(), compile_kwargs={"literal_binds": True}))
    assert str(mark) in inner
    answered = "(partstat != '' AND partstat != 'NEEDS-ACTION')"
    script = []
    for n, (eid, uid, summary, start, pid) in enumerate(events):
        script.append(".headers on" if n == 0 else ".headers off")
        script.append(
            f"SELECT {_safe(_lit(uid))} AS event_uid, {_safe(_lit(summary))} AS event_summary,"
            f" {_iso(_lit(start))} AS event_start, {_safe('email')} AS email,"
            f" {_safe('name')} AS name,"
            f" CASE WHEN {answered} THEN CASE upper(partstat) WHEN 'ACCEPTED' THEN 'Y'"
            f" WHEN 'DECLINED' THEN 'N' WHEN 'TENTATIVE' THEN 'M' ELSE '' END ELSE '' END"
            f" AS rsvp, CASE WHEN partstat = '' THEN 'NEEDS-ACTION' ELSE {_safe('partstat')}"
            f" END AS partstat, CASE WHEN {answered} AND responded_at IS NOT NULL"
            f" THEN {_iso('responded_at')} ELSE '' END AS responded_at, occurrence, status,"
            f" source, {_lit(pid)} AS event_id, {_safe('origin')} AS origin"
            f" FROM ({inner.replace(str(mark), str(eid))}) ORDER BY email, occurrence;")
    return "\n".join(script) + "\n"


@dataclass
class Run:
    seconds: float
    rss_mb: float


def timed(cmd: list[str], out: Path, env: dict[str, str] | None = None,
          stdin: Path | None = None) -> Run:
    """Run ``cmd`` with stdout into ``out``; wall time and peak RSS (wait4's ru_maxrss)."""
    with out.open("wb") as fh, (stdin or Path(os.devnull)).open("rb") as inp:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=inp, stdout=fh, stderr=subprocess.PIPE, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise SystemExit(f"{cmd[:4]}… failed ({proc.returncode}): {err[-2000:]}")
    return Run(seconds, usage.ru_maxrss / 1024)


def same_rows(a: Path, b: Path) -> int:
    """Both files hold the same CSV rows (parsed); returns the number of data rows."""
    with a.open(newline="", encoding="utf-8") as fa, b.open(newline="", encoding="utf-8") as fb:
        ra, rb = csv.reader(fa), csv.reader(fb)
        n = -1
        for x, y in zip(ra, rb, strict=True):
            n += 1
            if x != y:
                raise SystemExit(f"row {n} differs:\n  ciserver {x}\n  sqlite3  {y}")
        return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=1000)
    ap.add_argument("--per-event", type=int, default=1000)
    ap.add_argument("--small-events", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each; the best counts")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--dir", type=Path, help="work here, reusing a database generated by an "
                                             "earlier --keep run (implies --keep)")
    args = ap.parse_args()
    if shutil.which("sqlite3") is None:
        raise SystemExit("needs the sqlite3 command line shell (apt-get install sqlite3)")

    tmp = args.dir or Path(tempfile.mkdtemp(prefix="cis-bench-report-"))
    args.keep = args.keep or args.dir is not None
    reuse = (tmp / "ciserver.db").exists()
    try:
        db_path = tmp / "ciserver.db"
        conf = write_config(tmp / "c.toml", server={"domain": "invites.example.com",
                                                    "state_dir": str(tmp)},
                            database={"url": f"sqlite+aiosqlite:///{db_path}"})
        env = clean_env(conf)
        cli = Path(sys.executable).with_name("ciserver")
        ciserver = [str(cli)] if cli.exists() else [sys.executable, "-m", "ciserver"]
        subprocess.run([*ciserver, "db", "upgrade"], env=env, check=True,
                       stdout=subprocess.DEVNULL)
        t0 = time.perf_counter()
        if reuse:
            with sqlite3.connect(db_path) as conn:
                n_answers = conn.execute("SELECT count(*) FROM answers").fetchone()[0]
                n_events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            print(f"database: {n_answers:,} answers over {n_events:,} events (reused)")
        else:
            n_answers = generate(db_path, args.events, args.per_event, args.small_events)
            print(f"database: {n_answers:,} answers over {args.events:,} events, generated "
                  f"in {time.perf_counter() - t0:.1f} s ({db_path.stat().st_size / 1e6:.0f} MB)")
        print(f"sqlite3 {subprocess.run(['sqlite3', '--version'], capture_output=True, text=True).stdout.split()[0]}, "  # noqa: E501
              f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs\n")
        print(f"{'organizer':<20} {'rows':>10} {'ciserver':>14} {'sqlite3 -csv':>14} "
              f"{'ratio':>6} {'RSS ciserver':>13} {'RSS sqlite3':>12}")
        for organizer in (SMALL, BIG):
            mine, anchor = tmp / "ciserver.csv", tmp / "sqlite3.csv"
            script = tmp / "anchor.sql"
            script.write_text(anchor_sql(db_path, organizer))
            runs_c, runs_s = [], []
            for _ in range(args.repeat):
                runs_s.append(timed(["sqlite3", "-csv", str(db_path)], anchor,
                                    stdin=script))
                runs_c.append(timed([*ciserver, "report", "organizer", organizer, "--format",
                                     "csv"], mine, env))
            rows = same_rows(mine, anchor)
            c = min(runs_c, key=lambda r: r.seconds)
            s = min(runs_s, key=lambda r: r.seconds)
            rate_c, rate_s = rows / c.seconds, rows / s.seconds
            print(f"{organizer:<20} {rows:>10,} {rate_c:>9,.0f} r/s {rate_s:>9,.0f} r/s "
                  f"{rate_c / rate_s:>6.2f} {max(r.rss_mb for r in runs_c):>10.0f} MB "
                  f"{max(r.rss_mb for r in runs_s):>9.0f} MB")
            print(f"{'':<20} {'':>10} {c.seconds:>12.2f} s {s.seconds:>12.2f} s")
        empty = min((timed([*ciserver, "report", "organizer", "nobody@bench.example",
                            "--format", "csv"], tmp / "empty.csv", env)
                      for _ in range(args.repeat)), key=lambda r: r.seconds)
        print(f"\nciserver start-up (an export without rows): {empty.seconds:.2f} s, "
              f"{empty.rss_mb:.0f} MB")
        print("rows: data rows of each export (both parsed back and equal, cell by cell); "
              "times: the best of each; RSS: the highest peak")
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
