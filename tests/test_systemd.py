"""Running under systemd: the unit file (systemd-analyze verify and security), sd_notify from
the daemon to a real datagram socket, and the daemon under the unit's seccomp filters.

`systemd-analyze verify` needs the programs the unit runs to exist, so the tests check a copy
of systemd/ciserver.service in tmp_path whose /opt/ciserver/bin/ciserver (the install path of
the README) is this virtual environment's `ciserver`; nothing else is changed. Both analyses
work offline: no running systemd is needed, only the Debian package `systemd` (.ci/run
installs it; without it these tests are skipped, saying so).

Without a systemd to start the unit here, MemoryDenyWriteExecute=, SystemCallFilter=,
SystemCallArchitectures= and RestrictAddressFamilies= are checked the way systemd enforces
them: the same seccomp filters (syscall groups as `systemd-analyze syscall-filter` lists
them, through libseccomp), loaded before `ciserver serve` is executed, and the whole path is
exercised: uvloop, SMTP in, the inbox worker process, DKIM signing with `cryptography`, SMTP
out, the web.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import secrets
import shutil
import signal
import smtplib
import socket
import struct
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from ciserver.systemd import Notifier, socket_address

from .conftest import DOMAIN, ORGANIZER, Sink
from .organizer_mail import organizer_mail
from .test_e2e import CISERVER, Daemon, wait_until

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "ciserver.service"
INSTALL_PATH = "/opt/ciserver/bin/ciserver"  # where README installs it; the unit says so
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package systemd; "
                            ".ci/run installs it)")
LIBSECCOMP = ctypes.util.find_library("seccomp")
ANALYZE_ENV = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LANG": "C.UTF-8"}


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value given (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def installed_unit(tmp_path: Path) -> Path:
    """The unit as installed on this machine: ciserver at this environment's path."""
    exe = Path(sys.executable).parent / "ciserver"
    if not exe.exists():
        exe = Path(shutil.which("ciserver") or "/nonexistent")
    assert exe.exists(), "the ciserver command is not installed in this environment"
    text = UNIT.read_text()
    assert INSTALL_PATH in text
    target = tmp_path / "ciserver.service"
    target.write_text(text.replace(INSTALL_PATH, str(exe)))
    return target


# --------------------------------------------------------------------------------------------
# The unit file


def test_unit_has_what_production_needs() -> None:
    s = unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        assert key in s, f"{key} missing"
        return s[key][-1]

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert re.fullmatch(r"\d+s?", one("Service.WatchdogSec"))
    assert one("Service.ExecStartPre") == f"{INSTALL_PATH} db upgrade"
    assert one("Service.ExecStart") == f"{INSTALL_PATH} serve"
    assert one("Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Service.Environment") == "CISERVER_CONFIG=%E/ciserver/ciserver.toml"
    assert one("Service.StateDirectory") == "ciserver"
    assert one("Service.ConfigurationDirectory") == "ciserver"
    assert one("Service.User") == "ciserver" or one("Service.DynamicUser") == "yes"
    assert one("Service.CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert one("Service.AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert one("Service.Restart") == "on-failure"
    assert "Service.TimeoutStopSec" in s
    assert one("Service.UMask") == "0077"
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectHome",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "ProtectClock", "ProtectHostname", "LockPersonality",
                "MemoryDenyWriteExecute", "RestrictNamespaces", "RestrictRealtime",
                "RestrictSUIDSGID", "RemoveIPC"):
        assert one(f"Service.{key}") == "yes", key
    assert one("Service.ProtectSystem") == "strict"
    assert one("Service.RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one("Service.SystemCallArchitectures") == "native"
    assert s["Service.SystemCallFilter"][0] == "@system-service"
    # The daemon starts `ciserver worker inbox` and thread pools: no low task limit.
    assert "Service.TasksMax" not in s or int(one("Service.TasksMax")) >= 512
    assert one("Install.WantedBy") == "multi-user.target"


@needs_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    # --man=no: no man page lookups for Documentation=; --recursive-errors=no: problems of
    # other units of this machine (network-online.target, ...) are not ours to fail on.
    result = subprocess.run([ANALYZE, "verify", "--man=no", "--recursive-errors=no",
                             str(unit)], capture_output=True, text=True, env=ANALYZE_ENV,
                            timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if "ciserver" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


@needs_analyze
def test_systemd_analyze_security_is_ok_or_better(tmp_path: Path) -> None:
    unit = installed_unit(tmp_path)
    result = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, env=ANALYZE_ENV, timeout=60)
    out = result.stdout + result.stderr
    found = re.search(r"Overall exposure level for ciserver\.service: (\d+\.\d+) (\w+)", out)
    assert found, out
    score, level = float(found.group(1)), found.group(2)
    assert level in ("OK", "SAFE", "PERFECT"), out
    assert score < 2.0, out  # 1.4 when written; a regression shows here first
    passed = {m.group(1) for m in re.finditer(r"^[✓+] (\S+)", out, re.MULTILINE)}
    for check in ("MemoryDenyWriteExecute=", "NoNewPrivileges=", "ProtectSystem=",
                  "User=/DynamicUser=", "SystemCallFilter=~@privileged",
                  "SystemCallArchitectures=", "CapabilityBoundingSet=~CAP_SYS_ADMIN",
                  "RestrictAddressFamilies=~AF_PACKET", "PrivateTmp=", "UMask="):
        assert check in passed, f"{check} is not satisfied:\n{out}"


# --------------------------------------------------------------------------------------------
# sd_notify


class NotifySocket:
    """What systemd listens on: a datagram socket, with the sender's credentials."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            self.name = f"@ciserver-test-{secrets.token_hex(6)}"
            self.sock.bind("\0" + self.name[1:])
        else:
            self.name = str(path)
            self.sock.bind(self.name)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.received: list[tuple[float, int, list[str]]] = []  # time, sender pid, fields

    def receive(self, timeout: float) -> tuple[int, list[str]] | None:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except TimeoutError:
            return None
        pid = -1
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", cdata[:12])[0]
        fields = data.decode().split("\n")
        self.received.append((time.monotonic(), pid, fields))
        return pid, fields

    def wait_for(self, field: str, timeout: float = 30.0) -> tuple[int, list[str]]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            got = self.receive(left)
            if got is not None and field in got[1]:
                return got
        raise AssertionError(f"no {field} within {timeout} s; got {self.received}")

    def close(self) -> None:
        self.sock.close()


def test_notifier_speaks_the_protocol(tmp_path: Path) -> None:
    listener = NotifySocket(tmp_path / "notify")
    env = {"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "5000000",
           "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
    n = Notifier(env, unset_environment=True)
    assert env == {"OTHER": "kept"}  # children do not inherit the socket
    assert n.enabled and n.watchdog_interval == 2.5
    assert n.ready("ready: line\nbreak")
    assert listener.receive(1) == (os.getpid(), ["READY=1", "STATUS=ready: line break"])
    assert n.watchdog() and listener.receive(1) == (os.getpid(), ["WATCHDOG=1"])
    assert n.reloading()
    _, fields = listener.receive(1) or (0, [])
    assert fields[0] == "RELOADING=1" and fields[1].startswith("MONOTONIC_USEC=")
    n.close()
    listener.close()

    assert not Notifier({}).enabled and not Notifier({}).ready()  # not under systemd
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None  # the watchdog is another process's
    assert socket_address("@abc") == "\0abc" and socket_address("/run/x") == "/run/x"
    assert socket_address("vsock:2:1234") is None
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody")}).ready()  # no error


def test_daemon_notifies_systemd(tmp_path: Path, sink: Sink) -> None:
    """READY=1 once both ports accept connections, WATCHDOG=1 at half of WATCHDOG_USEC,
    RELOADING=1 / READY=1 around a SIGHUP, STOPPING=1 on SIGTERM; only from the daemon's
    own pid (systemd's NotifyAccess=main), and the worker process does not inherit
    NOTIFY_SOCKET."""
    d = Daemon(tmp_path, sink)
    listener = NotifySocket()  # the abstract namespace ("@..."), as systemd may use
    d.env.update({"NOTIFY_SOCKET": listener.name, "WATCHDOG_USEC": "400000"})
    log = d.log.open("ab")
    d.proc = subprocess.Popen([*CISERVER, "serve"], env=d.env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        pid, _ = listener.wait_for("READY=1")
        # At this instant, without retrying: both listeners answer.
        with smtplib.SMTP("127.0.0.1", d.smtp_port, timeout=5) as client:
            assert client.noop()[0] == 250
        assert httpx.get(f"{d.url}/healthz", timeout=5).status_code == 200
        assert pid == d.proc.pid
        ready = next(f for _, _, f in listener.received if "READY=1" in f)
        assert any(f.startswith("STATUS=ready") for f in ready)

        start = time.monotonic()
        pings = 0
        while time.monotonic() - start < 1.5:
            got = listener.receive(1.5 - (time.monotonic() - start))
            pings += bool(got and "WATCHDOG=1" in got[1])
        assert pings >= 5, listener.received  # every 0.2 s

        children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
        assert children, "the inbox worker process is running"
        for child in children:
            environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            assert not any(e.startswith(b"NOTIFY_SOCKET=") for e in environ)

        d.proc.send_signal(signal.SIGHUP)
        listener.wait_for("RELOADING=1")
        listener.wait_for("READY=1")
        d.proc.send_signal(signal.SIGTERM)
        listener.wait_for("STOPPING=1")
        assert d.proc.wait(timeout=30) == 0
        while listener.receive(0.2) is not None:
            pass
        assert {pid for _, pid, _ in listener.received} == {d.proc.pid}
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        log.close()
        listener.close()


# --------------------------------------------------------------------------------------------
# The daemon under the unit's seccomp filters

# Loads the filters systemd would load for the unit, then executes the command. One filter
# per setting, as systemd does; the kernel applies the strictest answer of all.
SANDBOX = textwrap.dedent('''
    import ctypes, ctypes.util, errno, json, os, sys

    spec = json.loads(sys.argv[1])
    lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)

    class Cmp(ctypes.Structure):
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64),
                    ("b", ctypes.c_uint64)]

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_uint, ctypes.POINTER(Cmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    ALLOW = 0x7FFF0000
    LT, EQ, GT, MASKED_EQ = 2, 4, 6, 7

    def errno_action(e):
        return 0x00050000 | e

    def rule(ctx, action, name, *cmps):
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a system call of this architecture
        arr = (Cmp * len(cmps))(*cmps) if cmps else None
        r = lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr)
        if r < 0 and r != -errno.EEXIST:
            raise OSError(-r, f"seccomp rule for {name}")

    def load(ctx):
        r = lib.seccomp_load(ctx)  # also sets no_new_privs (NoNewPrivileges=yes)
        lib.seccomp_release(ctx)
        if r < 0:
            raise OSError(-r, "seccomp_load")

    if spec["mdwe"]:  # MemoryDenyWriteExecute=yes, as systemd builds it
        ctx = lib.seccomp_init(ALLOW)
        eperm = errno_action(errno.EPERM)
        rule(ctx, eperm, "mmap", Cmp(2, MASKED_EQ, 6, 6))  # PROT_WRITE|PROT_EXEC
        rule(ctx, eperm, "mmap2", Cmp(2, MASKED_EQ, 6, 6))
        rule(ctx, eperm, "mprotect", Cmp(2, MASKED_EQ, 4, 4))  # PROT_EXEC
        rule(ctx, eperm, "pkey_mprotect", Cmp(2, MASKED_EQ, 4, 4))
        rule(ctx, eperm, "shmat", Cmp(2, MASKED_EQ, 0o100000, 0o100000))  # SHM_EXEC
        load(ctx)
    if spec["families"]:  # RestrictAddressFamilies= (an allow list)
        ctx = lib.seccomp_init(ALLOW)
        nope = errno_action(errno.EAFNOSUPPORT)
        allowed = sorted(spec["families"])
        rule(ctx, nope, "socket", Cmp(0, LT, allowed[0], 0))
        rule(ctx, nope, "socket", Cmp(0, GT, allowed[-1], 0))
        for family in range(allowed[0], allowed[-1]):
            if family not in allowed:
                rule(ctx, nope, "socket", Cmp(0, EQ, family, 0))
        load(ctx)
    # SystemCallFilter= with SystemCallErrorNumber=, native architecture only (libseccomp's
    # default: other ABIs are killed, SystemCallArchitectures=native).
    ctx = lib.seccomp_init(errno_action(spec["errno"]))
    for name in spec["allow"]:
        rule(ctx, ALLOW, name)
    load(ctx)
    os.execv(sys.argv[2], sys.argv[2:])
''')


def syscall_groups() -> dict[str, list[str]]:
    assert ANALYZE is not None
    out = subprocess.run([ANALYZE, "syscall-filter"], capture_output=True, text=True,
                         env=ANALYZE_ENV, timeout=60).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and current is not None:
            item = line.strip()
            if item and not item.startswith("#"):
                current.append(item)
    return groups


def sandbox_spec() -> dict[str, object]:
    """The unit's seccomp-relevant settings, resolved like systemd resolves them."""
    s = unit_settings(UNIT.read_text())
    groups = syscall_groups()

    def expand(item: str) -> set[str]:
        if not item.startswith("@"):
            return {item}
        return set().union(*(expand(m) for m in groups[item]))

    filters = s["Service.SystemCallFilter"]
    assert not filters[0].startswith("~"), "an allow list comes first"
    allowed = expand("@default")  # systemd adds it to every allow list
    for line in filters:
        deny = line.startswith("~")
        items = set().union(*(expand(i) for i in line.lstrip("~").split()))
        allowed = allowed - items if deny else allowed | items
    errno_name = s.get("Service.SystemCallErrorNumber", ["EPERM"])[-1]
    families = [getattr(socket, f) for f in s["Service.RestrictAddressFamilies"][-1].split()]
    return {"allow": sorted(allowed), "errno": getattr(__import__("errno"), errno_name),
            "families": families,
            "mdwe": s.get("Service.MemoryDenyWriteExecute", ["no"])[-1] == "yes"}


needs_seccomp = pytest.mark.skipif(
    ANALYZE is None or LIBSECCOMP is None or not sys.platform.startswith("linux"),
    reason="needs systemd-analyze (Debian systemd) and libseccomp (Debian libseccomp2)")


@needs_seccomp
def test_the_filters_bite(tmp_path: Path) -> None:
    """The emulation is not vacuous: what the unit forbids fails."""
    launcher = tmp_path / "sandbox.py"
    launcher.write_text(SANDBOX)
    probe = textwrap.dedent('''
        import mmap, os, socket
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
            print("wx-mapped")
        except OSError as e:
            print("wx", e.errno)
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW)
            print("netlink-open")
        except OSError as e:
            print("netlink", e.errno)
        try:
            os.setuid(os.getuid())  # @setuid is part of ~@privileged
            print("setuid-ok")
        except OSError as e:
            print("setuid", e.errno)
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
        print(open("/proc/self/status").read().split("Seccomp:")[1].split()[0])
    ''')
    out = subprocess.run([sys.executable, str(launcher), json.dumps(sandbox_spec()),
                          sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["wx", "1", "netlink", "97", "setuid", "1", "2"], out.stdout


@needs_seccomp
def test_daemon_runs_under_the_units_seccomp_filters(tmp_path: Path, sink: Sink) -> None:
    """MemoryDenyWriteExecute= and SystemCallFilter= with Python, uvloop and cryptography
    (DKIM signing): mail in, the worker process, mail out signed, the web; a clean stop."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_file = tmp_path / "dkim.pem"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    d = Daemon(tmp_path, sink)
    d.config.write_text(d.config.read_text() +
                        f'[dkim]\nselector = "s1"\nkey_file = "{key_file}"\n')
    d.env["CISERVER_SERVER__EVENT_LOOP"] = "uvloop"
    launcher = tmp_path / "sandbox.py"
    launcher.write_text(SANDBOX)
    log = d.log.open("ab")
    d.proc = subprocess.Popen(
        [sys.executable, str(launcher), json.dumps(sandbox_spec()), *CISERVER, "serve"],
        env=d.env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _healthy(d), timeout=30)
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        assert re.search(r"^Seccomp:\s+2$", status, re.MULTILINE)
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.MULTILINE)
        start = datetime(2027, 3, 4, tzinfo=UTC)
        d.smtp(f"create@{DOMAIN}", organizer_mail(
            "google", uid="sandboxed@team.example", start=start,
            end=start + timedelta(hours=2), summary="Sandboxed game"), ORGANIZER)
        wait_until(lambda: bool(sink.to(ORGANIZER)), timeout=30)
        confirmation = sink.to(ORGANIZER)[0].raw
        assert b"DKIM-Signature:" in confirmation and b"s=s1" in confirmation
        children = Path(f"/proc/{d.proc.pid}/task/{d.proc.pid}/children").read_text().split()
        assert children
        for child in children:  # the worker inherited the filters
            assert "Seccomp:\t2" in Path(f"/proc/{child}/status").read_text()
        assert httpx.get(f"{d.url}/metrics", timeout=5).status_code == 200
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(timeout=30) == 0
        text = d.log.read_text()
        assert "Traceback" not in text and "Operation not permitted" not in text, text
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        log.close()


def _healthy(d: Daemon) -> bool:
    assert d.proc is not None and d.proc.poll() is None, d.log.read_text()
    try:
        return httpx.get(f"{d.url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
