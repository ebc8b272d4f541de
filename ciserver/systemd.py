"""systemd integration without a dependency: sd_notify(3) and the service watchdog.

The protocol is one datagram of newline-separated ``KEY=VALUE`` fields sent to the AF_UNIX
socket that ``$NOTIFY_SOCKET`` names: a path, or ``@name`` for the abstract namespace. The unit
(systemd/ciserver.service) is ``Type=notify``: systemd considers the service started when
READY=1 arrives, shows STATUS= in ``systemctl status``, and restarts the service if WATCHDOG=1
does not come at least every ``WatchdogSec=`` (``$WATCHDOG_USEC``; we ping at half of it).

Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, MutableMapping

log = logging.getLogger("ciserver.systemd")

ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def socket_address(value: str) -> str | None:
    """The AF_UNIX address of ``$NOTIFY_SOCKET``, or None if it is not one we can use."""
    if value.startswith("@"):  # abstract namespace: a leading NUL byte on the wire
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. vsock: (systemd in a VM); not used by a service on the host


class Notifier:
    """Sends notifications to systemd; ``enabled`` is False when not run by systemd."""

    def __init__(self, environ: MutableMapping[str, str] | None = None, *,
                 unset_environment: bool = False) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(raw) if raw else None
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not an AF_UNIX socket; not notifying systemd",
                        raw)
        self.watchdog_usec = 0
        usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_usec = int(usec)
        if unset_environment:
            # Like sd_notify(unset_environment=1): child processes (the inbox worker) must
            # not talk to systemd in our name; NotifyAccess=main would refuse them anyway.
            for key in ENV_KEYS:
                env.pop(key, None)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 pings (half the timeout), or None: no watchdog."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def notify(self, *fields: str) -> bool:
        """Send one datagram of ``fields`` (``"READY=1"``, ``"STATUS=..."``); True if sent."""
        if self.address is None:
            return False
        message = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8")
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.settimeout(2.0)  # systemd reads at once; never hang the loop long
            self._sock.sendto(message, self.address)
        except OSError as exc:
            log.debug("could not notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        # MONOTONIC_USEC: systemd >= 253 matches it to the reload it is waiting for.
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    async def run_watchdog(self, healthy: Callable[[], bool]) -> None:
        """Ping every half watchdog period while ``healthy()``; runs until cancelled.

        The ping comes from the event loop itself, so a loop that is blocked (or a daemon
        whose essential task died, see ``healthy``) stops pinging and systemd restarts it."""
        interval = self.watchdog_interval
        if interval is None or not self.enabled:
            return
        reported = False
        while True:
            if healthy():
                self.watchdog()
            elif not reported:
                log.error("a part of the daemon stopped working; no longer answering the "
                          "systemd watchdog, which will restart the service")
                reported = True
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
