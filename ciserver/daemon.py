"""`ciserver serve`: every part of the server as tasks of one asyncio loop.

SMTP listener, IMAP pollers, inbox processor, relay workers and the web app (uvicorn) share
the loop.
SIGTERM/SIGINT stop it gracefully: stop accepting (SMTP and HTTP), let the message or
delivery in hand finish, give back claimed work, exit 0.
SIGHUP re-reads the configuration file and applies what can change while running (see
RELOADABLE); the rest is logged as needing a restart.
Under systemd (Type=notify) it reports READY=1 once every listener accepts connections,
STOPPING=1 when it stops, STATUS= lines, and answers the watchdog (ciserver.systemd).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import fields
from typing import Any

import uvicorn
from sqlalchemy import update

from . import config as config_mod
from . import imap, metrics, relay, smtp
from .config import Config, split_hostport
from .services import inbox, schedule
from .services.context import Services
from .store import db
from .store.models import InboxMessage, OutboxItem
from .systemd import Notifier
from .web.app import create_app

log = logging.getLogger("ciserver")


class _Uvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tune_gc() -> None:
    """Move what startup allocated out of the collector's sight and collect young objects
    less often: mail processing allocates many short-lived objects, and the default
    thresholds made the cyclic collector a visible share of CPU in bench/inbound."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


_SYSLOG_PRIORITY = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                    (logging.INFO, 6))


class OneLineFormatter(logging.Formatter):
    """One line per log record: journald (and grep) see one entry per event. A message
    that contains line breaks is joined with "; "; only a traceback spans several lines.

    Under journald (``$JOURNAL_STREAM`` names our stderr) the time and level come from the
    journal: each line starts with a syslog priority prefix (``<3>``, ``<4>``, ``<6>``, see
    sd-daemon(3)) instead, so ``journalctl -p warning`` works, tracebacks included."""

    def __init__(self, journal: bool = False) -> None:
        super().__init__("%(name)s: %(message)s" if journal
                         else "%(levelname)s %(name)s: %(message)s")
        self.journal = journal

    def formatMessage(self, record: logging.LogRecord) -> str:
        lines = [line.strip() for line in record.message.splitlines()]
        record.message = "; ".join(line for line in lines if line)
        return super().formatMessage(record)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if not self.journal:
            return text
        prio = next((p for level, p in _SYSLOG_PRIORITY if record.levelno >= level), 7)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines())


def logging_to_journal(environ: dict[str, str] | None = None) -> bool:
    """True if stderr is the journal's stream ($JOURNAL_STREAM is "device:inode" of it)."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return value == f"{st.st_dev}:{st.st_ino}"


def _level(name: str) -> int:
    return int(getattr(logging, name.upper(), logging.INFO))


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(OneLineFormatter(journal=logging_to_journal()))
    logging.basicConfig(level=_level(level), handlers=[handler])
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command log


# ---------------------------------------------------------------------------------------------
# SIGHUP: configuration reload

# What a running daemon (and its worker processes) applies from a changed file: values read
# where they are used, or objects rebuilt by reload_config. Everything else (listeners,
# database, domain and secret, TLS files, IMAP accounts, relay transport, processes) is
# reported as needing a restart.
RELOADABLE: dict[str, set[str] | None] = {  # section -> keys (None = every key)
    "server": {"log_level"},
    "organizers": None,
    "web": {"rate_limit", "rate_limit_per_address", "rate_limit_per_event",
            "rate_limit_invites_per_address",
            "trusted_proxies"},
    "relay": {"rate_limit", "domain_rate_limit", "retry_base", "retry_max",
              "max_queue_lifetime", "timeout", "claim_timeout"},
    "smtp": {"max_recipients"},
    "dkim": None,  # the signer is rebuilt from the new keys (key rotation)
    "reports": None,  # services.schedule reads its settings on every round
}


def _reloadable(section: str, key: str) -> bool:
    keys = RELOADABLE.get(section, set())
    return keys is None or key in keys


def reload_config(config: Config, svc: Services, *, app: Any = None,
                  relayer: relay.Relay | None = None,
                  who: str = "") -> tuple[list[str], list[str]] | None:
    """Re-read the configuration (file and environment, as at start) and apply what can
    change safely to the running ``config`` (shared by every part of the process).

    Returns (applied, needs a restart) as "[section] key" strings, or None if the new
    configuration is invalid (then nothing changes). Logs one line either way."""
    path = None if config.source == "(defaults)" else config.source
    try:
        new = config_mod.load(path)
    except config_mod.ConfigError as exc:
        log.error("%sconfiguration reload failed; the running configuration stays: %s", who,
                  exc)
        return None
    applied: list[str] = []
    restart: list[str] = []
    for section in config_mod.SECTIONS:
        old_part, new_part = getattr(config, section), getattr(new, section)
        for f in fields(old_part):
            old_value, new_value = getattr(old_part, f.name), getattr(new_part, f.name)
            if old_value == new_value:
                continue
            name = f"[{section}] {f.name}"
            if _reloadable(section, f.name):
                setattr(old_part, f.name, new_value)
                applied.append(name)
            else:
                restart.append(name)
    if any(a.startswith("[dkim]") for a in applied):
        config.dkim_signer = svc.signer = new.dkim_signer
    if relayer is not None and {"[relay] rate_limit", "[relay] domain_rate_limit"} & {*applied}:
        d = relayer.destinations  # the token buckets of [relay] rate_limit, domain_rate_limit
        d.overall = relay.TokenBucket(config.relay.rate_limit)
        d.rates.clear()
    if app is not None:
        state = app.state
        for attr, key in (("ip_limiter", "rate_limit"),
                          ("address_limiter", "rate_limit_per_address"),
                          ("event_limiter", "rate_limit_per_event"),
                          ("invites_limiter", "rate_limit_invites_per_address")):
            limiter = getattr(state, attr, None)  # web.app's RateLimiters keep their windows
            if limiter is not None:
                limiter.limit = getattr(config.web, key)
    root, level = logging.getLogger(), _level(config.server.log_level)
    root.setLevel(min(root.level, level))  # this line is seen at the old or the new level
    where = f"{who}configuration reloaded from {config.source}"
    if not applied and not restart:
        log.info("%s: no changes", where)
    elif restart:
        log.warning("%s: applied %s; needs a restart: %s", where,
                    ", ".join(applied) or "nothing", ", ".join(restart))
    else:
        log.info("%s: applied %s", where, ", ".join(applied))
    root.setLevel(level)
    return applied, restart


async def _release_stale_claims(svc: Services) -> None:
    """SQLite has exactly one daemon: whatever it had claimed before a crash is free now."""
    if svc.dialect != "sqlite":
        return  # PostgreSQL instances share work; their claims expire on their own
    async with svc.sessions.begin() as session:
        await session.execute(update(InboxMessage).where(InboxMessage.status == "processing")
                              .values(status="new", claimed_until=None))
        await session.execute(update(OutboxItem).where(OutboxItem.state == "sending")
                              .values(state="pending", claimed_until=None))


async def serve(config: Config, on_ready: Callable[[Services], Awaitable[None]] | None = None,
                stop: asyncio.Event | None = None) -> int:
    notifier = Notifier(unset_environment=True)
    notifier.status("starting: checking the database schema")
    stop_event = stop = stop or asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    # Pinging from the start: a schema creation runs in a thread, the loop stays responsive.
    watchdog = asyncio.create_task(notifier.run_watchdog(
        lambda: stop_event.is_set() or not any(t.done() for t in tasks)), name="watchdog")
    svc = Services.open(config)
    try:
        state = await db.ensure_schema(svc.engine, config.database_url)
    except db.SchemaError as exc:
        log.error("%s", exc)
        watchdog.cancel()
        await svc.close()
        return 1
    if state == "created":
        log.info("created the database schema at %s", _safe_url(config.database_url))
    await _release_stale_claims(svc)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    worker_procs: set[asyncio.subprocess.Process] = set()
    workers = config.server.inbox_processes > 0 and config.from_environ
    if workers:
        try:  # the workers' counters reach /metrics through files (see ciserver.metrics)
            metrics.start_multiprocess(config.state_path)
        except OSError as exc:
            log.warning("metrics of the inbox worker processes are not collected: cannot "
                        "use %s: %s", config.state_path / "metrics", exc)

    if 0 < len(config.server.secret_key) < 16:  # a warning: refusing would break upgrades
        log.warning("[server] secret_key is %d characters: every token is as strong as this "
                    "key; use 16 or more, or leave it out to have one generated",
                    len(config.server.secret_key))
    host, port = split_hostport(config.web.listen, "web", "listen", config.source)
    try:  # bound here, not by uvicorn, which would exit the process on a busy port
        web_socket = socket.create_server((host, port), family=_family(host))
    except OSError as exc:
        raise OSError(f"[web] listen = {host}:{port}: {exc.strerror or exc}") from None
    try:
        smtp_server = await smtp.start(svc)
    except BaseException:
        web_socket.close()
        raise
    app = create_app(svc)
    # log_config=None: uvicorn's warnings go through our handler (one line, journald).
    web = _Uvicorn(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                  log_config=None, access_log=False, lifespan="off",
                                  server_header=False, proxy_headers=False))
    relayer = relay.Relay(svc)

    ready = asyncio.Event()

    def on_sighup() -> None:
        tell = ready.is_set() and not stop_event.is_set()  # not before READY, not after STOPPING
        if tell:
            notifier.reloading()
        try:
            reload_config(config, svc, app=app, relayer=relayer)
        except Exception:  # never leave systemd waiting in "reloading"
            log.exception("configuration reload failed")
        for proc in worker_procs:  # the workers apply the same file themselves
            _tell_worker(proc, b"reload\n")
        if tell:
            notifier.ready(_ready_status(config))

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    tasks.append(asyncio.create_task(web.serve(sockets=[web_socket]), name="web"))
    if workers:
        tasks += [asyncio.create_task(
                      _supervise_inbox_process(config, svc, stop, i, worker_procs),
                      name=f"inbox-process-{i}")
                  for i in range(config.server.inbox_processes)]
    else:  # in this loop (also when the config cannot be handed to a child process)
        tasks.append(asyncio.create_task(inbox.run(svc, stop), name="inbox"))
    tasks.append(asyncio.create_task(relayer.run(stop), name="relay"))
    tasks += imap.start(svc, stop)  # one poller per [imap] account; each ends when stop is set
    tasks.append(asyncio.create_task(schedule.run(svc, stop), name="reports"))
    while not web.started and not tasks[0].done():  # noqa: ASYNC110 - uvicorn has no event
        await asyncio.sleep(0.02)
    if tasks[0].done():  # the web port could not be bound
        log.error("the web server could not start on %s", config.web.listen)
        stop.set()
    else:
        log.info("web on http://%s:%s, public URL %s", host, port, config.base_url)
        log.info("ciserver ready: mail domain %s, database %s", svc.book.domain,
                 _safe_url(config.database_url))
        notifier.ready(_ready_status(config))  # SMTP and web both accept connections now
        ready.set()
        if on_ready is not None:
            await on_ready(svc)
    reporter = asyncio.create_task(_report_status(svc, notifier, stop), name="status")
    await stop.wait()
    log.info("stopping: no new connections; finishing work in hand")
    notifier.stopping("stopping: finishing the work in hand")
    smtp_server.close()
    web.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)
    await smtp_server.wait_closed()
    await svc.close()
    watchdog.cancel()
    reporter.cancel()
    await asyncio.gather(watchdog, reporter, return_exceptions=True)
    notifier.close()
    log.info("stopped")
    return 0


def _ready_status(config: Config) -> str:
    return f"ready: SMTP on {config.smtp.listen}, web on {config.web.listen}"


async def _report_status(svc: Services, notifier: Notifier, stop: asyncio.Event,
                         every: float = 30.0) -> None:
    """Under systemd: the queues in one STATUS= line (`systemctl status ciserver`)."""
    if not notifier.enabled:
        return
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        try:
            st = await metrics.queue_state(svc.engine, svc.now())
        except Exception as exc:  # the database may be away for a moment
            notifier.status(f"running; database not answering: {type(exc).__name__}")
            continue
        waiting = st.outbox.get("pending", 0) + st.outbox.get("sending", 0)
        text = (f"{_ready_status(svc.config)}; inbox {st.inbox.get('new', 0)} waiting; "
                f"outbox {waiting} waiting")
        if waiting:
            text += f" (oldest {int(st.age(st.outbox_oldest))} s)"
        notifier.status(text)


def _tell_worker(proc: asyncio.subprocess.Process, line: bytes) -> None:
    if proc.stdin is not None and proc.returncode is None:
        with contextlib.suppress(OSError, RuntimeError):
            proc.stdin.write(line)


def worker_command(config: Config) -> list[str]:
    cmd = [sys.executable, "-m", "ciserver"]
    if config.source != "(defaults)":
        cmd += ["-c", config.source]
    return [*cmd, "worker", "inbox"]


async def _outbox_signals(proc: asyncio.subprocess.Process, svc: Services) -> None:
    """The worker writes a byte to its stdout when it queued mail: wake our relay workers
    now instead of at their next poll."""
    assert proc.stdout is not None
    while chunk := await proc.stdout.read(4096):
        if chunk:
            svc.wake_outbox()


async def _supervise_inbox_process(config: Config, svc: Services, stop: asyncio.Event,
                                   n: int,
                                   procs: set[asyncio.subprocess.Process] | None = None) -> None:
    """Run one inbox worker process; restart it if it dies, SIGTERM it when we stop.

    Parsing and applying mail is the CPU-heavy part of ingest; in a process of its own it
    no longer slows down the SMTP sessions of this loop (bench/inbound measures both).
    Its stdin is a pipe from us: a "reload" line makes it re-read the configuration (no
    signal race while it starts: the line waits in the pipe until it reads)."""
    backoff = 1.0
    procs = set() if procs is None else procs
    while not stop.is_set():
        proc = await asyncio.create_subprocess_exec(*worker_command(config),
                                                    stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE)
        procs.add(proc)
        waiter = asyncio.ensure_future(proc.wait())
        stopper = asyncio.ensure_future(stop.wait())
        listener = asyncio.ensure_future(_outbox_signals(proc, svc))
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        listener.cancel()
        if proc.returncode is not None:
            procs.discard(proc)
        if stop.is_set():
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(waiter, 60)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
            procs.discard(proc)
            return
        log.warning("inbox worker %d exited with status %s; restarting in %.0f s", n,
                    proc.returncode, backoff)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), backoff)
        backoff = min(backoff * 2, 60.0)


async def _reload_requests(on_line: Callable[[bytes], None]) -> None:
    """Lines from our stdin (the daemon's pipe); ends at EOF."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    try:
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    except (OSError, ValueError, AttributeError):  # no usable stdin (run by hand)
        return
    while line := await reader.readline():
        on_line(line.strip())


async def inbox_worker(config: Config) -> int:
    """`ciserver worker inbox`: the inbox processor on its own (started by `serve`)."""
    metrics.join_multiprocess()  # count into the daemon's /metrics
    svc = Services.open(config)
    try:
        if await db.current_revision(svc.engine) != db.head_revision(config.database_url):
            log.error("inbox worker: the database schema is not current")
            return 1
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        parent = os.getppid()

        async def orphaned() -> None:  # the daemon died without stopping us: stop too
            while not stop.is_set():
                if os.getppid() != parent:
                    log.warning("inbox worker: the daemon is gone; stopping")
                    stop.set()
                await asyncio.sleep(1)

        watcher = asyncio.create_task(orphaned())

        def signal_outbox() -> None:
            with contextlib.suppress(OSError):  # the daemon's end may be gone: it polls too
                os.write(sys.stdout.fileno(), b"o")

        svc.outbox_signal = signal_outbox
        # The worker also relays: fan-outs then use a second core (bench/fanout), and no
        # extra process (memory) is needed for it.
        relayer = relay.Relay(svc)

        def reload(line: bytes = b"reload") -> None:
            if line == b"reload":
                try:
                    reload_config(config, svc, relayer=relayer, who="inbox worker: ")
                except Exception:  # the worker goes on with what it has
                    log.exception("inbox worker: configuration reload failed")

        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, reload)  # `kill -HUP` by hand
        requests = asyncio.create_task(_reload_requests(reload))
        sending = asyncio.create_task(relayer.run(stop, poll=0.5))
        await inbox.run(svc, stop, poll=0.1)
        await sending
        watcher.cancel()
        requests.cancel()
        return 0
    finally:
        await svc.close()


def _safe_url(url: str) -> str:
    """The database URL without a password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, _, host = rest.rpartition("@")
        return f"{scheme}://{creds.split(':')[0]}@{host}"
    return url
