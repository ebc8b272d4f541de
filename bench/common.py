"""Helpers shared by the benchmarks: free ports, config files, SMTP load, a daemon process."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def smtp_load(port: int, messages: list[tuple[str, str, bytes]],
                    concurrency: int = 20) -> tuple[float, int]:
    """Send every (mail_from, rcpt, raw) on its own connection, ``concurrency`` sessions at
    a time (what Postfix's smtp-source -s 20 does). Returns (seconds, failures)."""
    queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
    for m in messages:
        queue.put_nowait(m)
    failures = 0

    async def session() -> None:
        nonlocal failures
        while True:
            try:
                mail_from, rcpt, raw = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                     timeout=60)
            try:
                await client.connect()
                await client.sendmail(mail_from, [rcpt], raw)
                await client.quit()
            except Exception:
                failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(session() for _ in range(concurrency)))
    return time.perf_counter() - start, failures


def write_config(path: Path, **sections: dict[str, object]) -> Path:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if isinstance(v, bool):
                lines.append(f"{k} = {'true' if v else 'false'}")
            elif isinstance(v, int):
                lines.append(f"{k} = {v}")
            elif isinstance(v, list):
                lines.append(f"{k} = [{', '.join(repr(x).replace(chr(39), chr(34)) for x in v)}]")
            else:
                lines.append(f'{k} = "{v}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def clean_env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CISERVER_")}
    env["CISERVER_CONFIG"] = str(config)
    return env


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "ciserver", "serve"],
                                env=clean_env(config), stdout=fh, stderr=subprocess.STDOUT)


def cpu_seconds(pid: int, with_children: bool = True) -> float:
    """CPU time (user + system) of a process and, by default, its live child processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = (int(fields[11]) + int(fields[12])) / ticks
    if with_children:
        for task in Path(f"/proc/{pid}/task").iterdir():
            children = (task / "children").read_text().split()
            total += sum(cpu_seconds(int(c)) for c in children)
    return total


def rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0
