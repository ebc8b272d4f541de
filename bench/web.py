"""bench/web: the public invite endpoint under load, against a bare Starlette endpoint.

ciserver: a real `ciserver serve` on SQLite; ``POST /api/v1/events/{id}/invites`` with a
different address in every request, so each one really subscribes a customer and queues
their invite (the rate limits are lifted through the config file). Two runs of ciserver per
round:

* endpoint: the relay is held up (its smarthost accepts connections and never answers), so
  the figures are the endpoint's own: parse, check, rate-limit, commit, answer;
* with delivery: the relay sends every queued invite meanwhile, into a null SMTP server, in
  the same process: what one instance does when a campaign link is clicked en masse.

Anchor, in the same run: a Starlette app whose one endpoint reads the JSON body and answers
202, served by uvicorn with the daemon's settings (event loop, HTTP parser, no access log).

Load: wrk (Debian package ``wrk``) with a Lua script that makes every request's address
unique; without wrk, an asyncio client (httpx) in a process of its own -- the same generator
for all servers either way. Rounds alternate between the anchor and ciserver so that a drift
in machine speed hits all alike; the best round of each is kept.

    .venv/bin/python -m bench.web [--seconds 10] [--connections 64] [--rounds 2]

Prints requests/s, p50 and p99 latency of each, the ratios of the rates to the anchor's
(target >= 0.5), and how many customers ended up subscribed with an invite queued.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from ciserver import config as config_mod
from ciserver.services import events
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import OutboxItem, Subscription

from .common import ROOT, free_port, rss_mb, start_daemon, wait_port, write_config

DOMAIN = "invites.example.com"
ORGANIZER = "zach@team.example"

# wrk: one Lua state per thread; every request gets a fresh address from (run, thread, n).
WRK_SCRIPT = r"""
local threads = {}
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  run = args[1] or "r"
  n = 0
end
function request()
  n = n + 1
  local body = '{"email":"fan-' .. run .. '-' .. tid .. '-' .. n .. '@bench' .. (n % 50)
    .. '.example","name":"Fan ' .. n .. '"}'
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
function done(summary, latency, requests)
  io.write(string.format(
    'WRK {"requests": %d, "seconds": %f, "p50_us": %d, "p99_us": %d, "non2xx": %d, '
    .. '"errors": %d}\n', summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write
    + summary.errors.timeout))
end
"""


# --------------------------------------------------------------------------------------------
# The anchor: a bare Starlette endpoint, served like the daemon serves its app.


def anchor_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def invite(request: Request) -> JSONResponse:
        data = await request.json()
        return JSONResponse({"status": "queued", "events": [request.path_params["event_id"]],
                             "email": data.get("email")}, status_code=202)

    return Starlette(routes=[Route("/api/v1/events/{event_id}/invites", invite,
                                   methods=["POST"])])


def serve_anchor(port: int, event_loop: str) -> None:
    import uvicorn

    from ciserver.cli import run_loop

    # The settings of ciserver.daemon.serve: same loop choice, same HTTP parser (auto).
    server = uvicorn.Server(uvicorn.Config(anchor_app(), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False,
                                           lifespan="off", server_header=False,
                                           proxy_headers=False))
    run_loop(server.serve(), event_loop)


# --------------------------------------------------------------------------------------------
# Load generators


def wrk_load(url: str, seconds: int, connections: int, run_id: str,
             tmp: Path) -> dict[str, float]:
    script = tmp / "invite.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s", "--latency",
         "-s", str(script), url, "--", run_id],
        capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("WRK "))
    r = json.loads(line[4:])
    return {"rps": r["requests"] / r["seconds"], "p50": r["p50_us"] / 1000,
            "p99": r["p99_us"] / 1000, "requests": r["requests"], "non2xx": r["non2xx"],
            "errors": r["errors"]}


async def _httpx_load(url: str, seconds: float, connections: int, run_id: str
                      ) -> dict[str, float]:
    import httpx

    latencies: list[float] = []
    bad = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def worker(w: int) -> None:
            nonlocal bad
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                body = {"email": f"fan-{run_id}-{w}-{n}@bench{n % 50}.example",
                        "name": f"Fan {n}"}
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code >= 300:
                    bad += 1

        start = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(connections)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {"rps": len(latencies) / elapsed, "p50": latencies[len(latencies) // 2] * 1000,
            "p99": latencies[int(len(latencies) * 0.99)] * 1000,
            "requests": len(latencies), "non2xx": bad, "errors": 0}


def httpx_load(url: str, seconds: int, connections: int, run_id: str,
               tmp: Path) -> dict[str, float]:
    """The same load from an asyncio client in a process of its own."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.web", "--client", url, "--seconds", str(seconds),
         "--connections", str(connections), "--run-id", run_id],
        capture_output=True, text=True, timeout=seconds + 120, check=True, cwd=ROOT).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------------------------
# ciserver


async def seed(cfg: config_mod.Config) -> str:
    await db.upgrade(cfg.database_url)
    svc = Services.open(cfg)
    try:
        start = datetime(2027, 3, 4, 0, 30, tzinfo=UTC)
        async with svc.sessions.begin() as session:
            event = await events.create_via_api(
                svc, session, organizer=ORGANIZER, organizer_name="Zach Lowe",
                summary="Knicks vs Celtics", start=start, end=start + timedelta(hours=3),
                location="Madison Square Garden")
            return event.public_id
    finally:
        await svc.close()


async def counted(cfg: config_mod.Config) -> tuple[int, int]:
    """(subscriptions, invites queued or sent)."""
    svc = Services.open(cfg)
    try:
        async with svc.sessions() as session:
            subs = (await session.execute(select(func.count(Subscription.id)))).scalar_one()
            queued = (await session.execute(select(func.count(OutboxItem.id)).where(
                OutboxItem.kind == "invite"))).scalar_one()
            return int(subs), int(queued)
    finally:
        await svc.close()


def report(name: str, r: dict[str, float]) -> str:
    extra = f", {r['non2xx']:.0f} non-2xx" if r["non2xx"] else ""
    extra += f", {r['errors']:.0f} socket errors" if r["errors"] else ""
    return (f"  {name:<26}: {r['rps']:8.0f} req/s   p50 {r['p50']:7.2f} ms   "
            f"p99 {r['p99']:7.2f} ms   ({r['requests']:.0f} requests{extra})")


def config_for(tmp: Path, name: str, web_port: int, smarthost: int, event_loop: str) -> Path:
    return write_config(
        tmp / f"{name}.toml",
        server={"domain": DOMAIN, "state_dir": str(tmp / "state"), "log_level": "warning",
                "public_url": f"http://127.0.0.1:{web_port}", "event_loop": event_loop},
        database={"url": f"sqlite+aiosqlite:///{tmp / 'ciserver.db'}"},
        smtp={"listen": f"127.0.0.1:{free_port()}"},
        # The load comes from one IP and sends thousands of invites to one event a second:
        # lift the three public limits (0 = unlimited).
        web={"listen": f"127.0.0.1:{web_port}", "rate_limit": 0,
             "rate_limit_per_address": 0, "rate_limit_per_event": 0},
        # Held up: a connection waits 5 s for a greeting that never comes, and a failed
        # batch is retried an hour later.
        relay={"smarthost": f"127.0.0.1:{smarthost}", "tls": "none", "timeout": 5,
               "retry_base": 3600},
        organizers={"allow": [ORGANIZER]})


def ours(cfg_path: Path, tmp: Path, web_port: int, path: str, load: Any, seconds: int,
         connections: int, run_id: str) -> tuple[dict[str, float], float]:
    daemon = start_daemon(cfg_path, tmp / "daemon.log")
    try:
        wait_port(web_port)
        url = f"http://127.0.0.1:{web_port}{path}"
        load(url, 1, connections, f"{run_id}w", tmp)  # warm-up
        result = load(url, seconds, connections, run_id, tmp)
        rss = rss_mb(daemon.pid)
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
    return result, rss


async def run(seconds: int, connections: int, rounds: int, client: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="ciserver-bench-web-"))
    web_port, sink_port = free_port(), free_port()
    event_loop = os.environ.get("BENCH_EVENT_LOOP", "auto")
    # The held-up smarthost: the kernel completes the connections, nobody ever answers.
    tarpit = socket.socket()
    tarpit.bind(("127.0.0.1", 0))
    tarpit.listen(1024)
    configs = {
        "endpoint": config_for(tmp, "endpoint", web_port, tarpit.getsockname()[1], event_loop),
        "delivery": config_for(tmp, "delivery", web_port, sink_port, event_loop),
    }
    cfg = config_mod.load(configs["endpoint"], {})
    event_id = await seed(cfg)
    path = f"/api/v1/events/{event_id}/invites"
    load = wrk_load if client == "wrk" else httpx_load
    print(f"bench/web: POST {path} with a new address every request; {connections} "
          f"connections, {seconds} s per run, {rounds} rounds; load: {client}; "
          f"store: SQLite; {os.cpu_count()} CPUs")

    sink = subprocess.Popen([sys.executable, "-m", "bench.null_smtp", str(sink_port)],
                            cwd=ROOT)
    best: dict[str, dict[str, float]] = {}
    daemon_rss = 0.0

    def keep(name: str, r: dict[str, float]) -> None:
        if name not in best or r["rps"] > best[name]["rps"]:
            best[name] = r

    try:
        wait_port(sink_port)
        for n in range(rounds):
            port = free_port()
            anchor = subprocess.Popen([sys.executable, "-m", "bench.web", "--anchor",
                                       str(port)], cwd=ROOT,
                                      env={**os.environ, "BENCH_EVENT_LOOP": event_loop})
            try:
                wait_port(port)
                url = f"http://127.0.0.1:{port}{path}"
                load(url, 1, connections, f"w{n}", tmp)  # warm-up
                keep("anchor", load(url, seconds, connections, f"a{n}", tmp))
            finally:
                anchor.terminate()
                anchor.wait()
            for mode, cfg_path in configs.items():
                r, rss = ours(cfg_path, tmp, web_port, path, load, seconds, connections,
                              f"{mode[0]}{n}")
                keep(mode, r)
                daemon_rss = max(daemon_rss, rss)
    finally:
        sink.terminate()
        sink.wait()
        tarpit.close()
    subs, queued = await counted(cfg)
    anchor_rps = best["anchor"]["rps"]
    print(report("bare Starlette endpoint", best["anchor"]))
    print(report("ciserver, endpoint", best["endpoint"]))
    print(report("ciserver, with delivery", best["delivery"]))
    print(f"  ratio, endpoint           : {best['endpoint']['rps'] / anchor_rps:8.2f}"
          "   (target >= 0.5)")
    print(f"  ratio, with delivery      : {best['delivery']['rps'] / anchor_rps:8.2f}")
    print(f"  customers subscribed      : {subs} in all runs, with {queued} invites queued "
          "or sent")
    print(f"  daemon peak RSS           : {daemon_rss:.0f} MB   (log: {tmp / 'daemon.log'})")
    failed = sum(best[m]["non2xx"] + best[m]["errors"] for m in ("endpoint", "delivery"))
    if failed or subs != queued:
        print("  WARNING: some requests failed or some invites are missing")
    shutil.rmtree(tmp / "state", ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--load", choices=["auto", "wrk", "httpx"], default="auto",
                   help="load generator (auto: wrk if installed, else httpx)")
    # internal: the anchor server and the httpx client run as processes of their own
    p.add_argument("--anchor", type=int, help=argparse.SUPPRESS)
    p.add_argument("--client", help=argparse.SUPPRESS)
    p.add_argument("--run-id", default="r", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.anchor:
        serve_anchor(a.anchor, os.environ.get("BENCH_EVENT_LOOP", "auto"))
        return
    if a.client:
        print(json.dumps(asyncio.run(_httpx_load(a.client, a.seconds, a.connections,
                                                 a.run_id))))
        return
    client = a.load if a.load != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    asyncio.run(run(a.seconds, a.connections, a.rounds, client))


if __name__ == "__main__":
    main()
