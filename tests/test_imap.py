"""The IMAP poller against a real Dovecot that each test starts on a free loopback port.

Dovecot runs in the foreground (``dovecot -F -c CONF``) with a configuration of its own: one
passwd-file user, a Maildir, and its base/state directories in a private work directory, its
configuration and log under tmp_path. Messages are put in with IMAP APPEND (Python's imaplib),
as a provider's MX would deliver them. No system Dovecot, no systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import imaplib
import ipaddress
import json
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from ciserver import config as config_mod
from ciserver import daemon, imap
from ciserver.addresses import Kind
from ciserver.services import events, inbox, subscriptions
from ciserver.services.context import Services
from ciserver.store import db, models

from .conftest import DOMAIN, ORGANIZER, Sink, free_port, make_config
from .fixtures import load_fixture
from .organizer_mail import organizer_mail

DOVECOT = shutil.which("dovecot") or next(
    (p for p in ("/usr/sbin/dovecot", "/usr/local/sbin/dovecot") if os.path.exists(p)), None)
needs_dovecot = pytest.mark.skipif(
    DOVECOT is None, reason="dovecot is not installed (Debian: apt-get install dovecot-imapd; "
                            ".ci/run installs it)")

USER, PASSWORD = "ciuser", "s3cret-pass"
CREATE = f"create@{DOMAIN}"
FEB_20 = datetime(2026, 2, 20, 15, 0, tzinfo=UTC)  # the reply fixtures are live then
START = datetime(2026, 3, 5, 0, 0, tzinfo=UTC)  # 19:00 New York
EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "ciserver.example.toml"


# --------------------------------------------------------------------------------------------
# A throw-away PKI (for the TLS tests)


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def make_pki(d: Path) -> Pki:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("ciserver test CA"))
          .issuer_name(name("ciserver test CA")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                       crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False,
                                       decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                         critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("localhost"))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    d.mkdir(parents=True, exist_ok=True)
    pki = Pki(ca=d / "ca.pem", cert=d / "server.pem", key=d / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pki.key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pki.key.chmod(0o600)
    return pki


# --------------------------------------------------------------------------------------------
# Dovecot


@dataclass
class Dovecot:
    """A private Dovecot: ``start()``, ``stop()``, and imaplib helpers to look inside."""

    conf_dir: Path  # dovecot.conf and dovecot.log (under tmp_path)
    work: Path  # base_dir, state_dir, passwd-file and the Maildir (short path, see below)
    pki: Pki | None = None
    capabilities: str = ""  # imap_capability override ("" = Dovecot's own list)
    port: int = field(default_factory=free_port)
    tls_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config(self) -> Path:
        return self.conf_dir / "dovecot.conf"

    @property
    def log(self) -> Path:
        return self.conf_dir / "dovecot.log"

    def write_config(self) -> None:
        """Root and non-root runs differ: Dovecot refuses mail access as root and login
        processes running as root, so as root it uses its own system users (dovecot,
        dovenull, from the Debian package) and the mail user ``nobody``; as anyone else
        every process runs as that user."""
        home = self.work / "home"
        home.mkdir(parents=True, exist_ok=True)
        (self.work / "run").mkdir(exist_ok=True)
        (self.work / "state").mkdir(exist_ok=True)
        if os.geteuid() == 0:
            for name in ("dovecot", "dovenull", "nobody"):
                try:
                    pwd.getpwnam(name)
                except KeyError:
                    pytest.skip(f"running Dovecot as root needs the system user {name!r} "
                                "(dovecot and dovenull come with the dovecot-core package)")
            mail = pwd.getpwnam("nobody")
            uid, gid = mail.pw_uid, mail.pw_gid
            os.chown(home, uid, gid)
            internal, login, group, chroots = "dovecot", "dovenull", "dovecot", ""
        else:
            uid, gid = os.getuid(), os.getgid()
            try:
                internal = login = pwd.getpwuid(uid).pw_name
                group = grp.getgrgid(gid).gr_name
            except KeyError:
                pytest.skip(f"Dovecot needs a user and group name for uid {uid} / gid {gid}")
            chroots = ("service anvil {\n  chroot =\n}\n"
                       "service imap-login {\n  chroot =\n}\n")
        users = self.work / "users"
        users.write_text(f"{USER}:{{PLAIN}}{PASSWORD}:{uid}:{gid}::{home}\n")
        users.chmod(0o644)
        tls = "ssl = no\n"
        tls_listener = "  inet_listener imaps {\n    port = 0\n  }\n"
        if self.pki is not None:
            tls = (f"ssl = yes\nssl_cert = <{self.pki.cert}\nssl_key = <{self.pki.key}\n")
            tls_listener = ("  inet_listener imaps {\n    address = 127.0.0.1\n"
                            f"    port = {self.tls_port}\n    ssl = yes\n  }}\n")
        caps = f"imap_capability = {self.capabilities}\n" if self.capabilities else ""
        self.conf_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            "protocols = imap\n"
            "listen = 127.0.0.1\n"
            f"base_dir = {self.work / 'run'}\n"
            f"state_dir = {self.work / 'state'}\n"
            f"log_path = {self.log}\n"
            f"default_internal_user = {internal}\n"
            f"default_login_user = {login}\n"
            f"default_internal_group = {group}\n"
            f"first_valid_uid = {min(uid, 100)}\n"
            f"first_valid_gid = {min(gid, 100)}\n"
            "auth_mechanisms = plain\n"
            "disable_plaintext_auth = no\n"
            "auth_failure_delay = 0\n"
            f"mail_location = maildir:{home}/Maildir\n"
            f"{tls}{caps}"
            "passdb {\n  driver = passwd-file\n"
            f"  args = scheme=PLAIN username_format=%u {users}\n}}\n"
            "userdb {\n  driver = passwd-file\n"
            f"  args = username_format=%u {users}\n}}\n"
            "service imap-login {\n"
            f"  inet_listener imap {{\n    address = 127.0.0.1\n    port = {self.port}\n  }}\n"
            f"{tls_listener}"
            "}\n"
            f"{chroots}")

    def start(self) -> None:
        assert DOVECOT is not None
        self.write_config()
        # A session of its own: stop() can end the children the master leaves behind.
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.config)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"dovecot exited: {err}\n{self.log_text()}")
            with contextlib.suppress(OSError), socket.create_connection(
                    ("127.0.0.1", self.port), timeout=1) as s:
                s.settimeout(2)
                if s.recv(100).startswith(b"* OK"):
                    return
            time.sleep(0.05)
        raise AssertionError(f"dovecot did not greet on port {self.port}\n{self.log_text()}")

    def stop(self) -> None:
        """Stop the master, then end what it leaves behind: an imap process in IDLE lingers
        about 10 s after its master is gone (a clean "server down" for the client)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own process group (see start)
        if self.proc.stderr:
            self.proc.stderr.close()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @contextlib.contextmanager
    def session(self, mailbox: str = "INBOX") -> Iterator[imaplib.IMAP4]:
        client = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        try:
            client.login(USER, PASSWORD)
            client.select(mailbox)
            yield client
        finally:
            with contextlib.suppress(Exception):
                client.logout()

    def append(self, raw: bytes, mailbox: str = "INBOX") -> None:
        with self.session() as client:
            typ, data = client.append(mailbox, None, None, raw)
            assert typ == "OK", data

    def flags(self, mailbox: str = "INBOX") -> list[set[str]]:
        """The flags of every message in ``mailbox``, in UID order."""
        with self.session(mailbox) as client:
            typ, data = client.uid("FETCH", "1:*", "(FLAGS)")
            assert typ == "OK", data
            out = []
            for item in data:
                if not item:
                    continue
                line = item if isinstance(item, bytes) else item[0]
                m = re.search(rb"FLAGS \(([^)]*)\)", line)
                if m:
                    out.append(set(m.group(1).decode().split()) - {"\\Recent"})
            return out


@pytest.fixture
def dovecot_factory(tmp_path: Path) -> Iterator[Callable[..., Dovecot]]:
    """Start Dovecots; the work directory is a short path of its own: unix socket paths
    have a 108-byte limit, and (as root) the mail user must reach its Maildir while
    pytest's tmp root is private (0700)."""
    if DOVECOT is None:
        pytest.skip("dovecot is not installed (Debian: apt-get install dovecot-imapd)")
    started: list[Dovecot] = []
    works: list[str] = []

    def make(pki: Pki | None = None, capabilities: str = "") -> Dovecot:
        work = tempfile.mkdtemp(prefix="cisdv-")
        os.chmod(work, 0o755)
        works.append(work)
        server = Dovecot(tmp_path / f"dovecot{len(started)}", Path(work), pki=pki,
                         capabilities=capabilities)
        started.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()
        for work in works:
            shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def dovecot(dovecot_factory: Callable[..., Dovecot]) -> Dovecot:
    return dovecot_factory()


# --------------------------------------------------------------------------------------------
# Helpers


def account(server: Dovecot, **overrides: Any) -> config_mod.ImapAccount:
    values: dict[str, Any] = {"host": "127.0.0.1", "port": server.port, "tls": "none",
                              "username": USER, "password": PASSWORD, "poll_interval": 300,
                              "retry_max": 1, "timeout": 10}
    values.update(overrides)
    return config_mod.ImapAccount(**values)


@contextlib.asynccontextmanager
async def running(svc: Services, acct: config_mod.ImapAccount) -> AsyncIterator[imap.Poller]:
    poller = imap.Poller(svc, acct)
    stop = asyncio.Event()
    task = asyncio.create_task(poller.run(stop))
    try:
        yield poller
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)  # a clean stop, well before any timeout
        assert poller.state == "stopped"


async def until(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0,
                what: str = "condition") -> float:
    """Wait until ``predicate`` holds; returns the seconds it took."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what}: not met within {timeout} s")


async def inbox_rows(svc: Services) -> list[models.InboxMessage]:
    async with svc.sessions() as session:
        q = select(models.InboxMessage).order_by(models.InboxMessage.id)
        return list((await session.execute(q)).scalars().all())


async def inbox_count(svc: Services) -> int:
    async with svc.sessions() as session:
        q = select(func.count(models.InboxMessage.id))
        return int((await session.execute(q)).scalar_one())


def invite(uid: str, summary: str = "Knicks vs Celtics", sequence: int = 0,
           delivered_to: str | None = None) -> bytes:
    raw = organizer_mail("google", uid=uid, sequence=sequence,
                         dtstamp=datetime(2026, 2, 1, 12, 0, tzinfo=UTC), start=START,
                         end=START + timedelta(hours=3), summary=summary,
                         location="Madison Square Garden, New York")
    if delivered_to:
        raw = f"Delivered-To: {delivered_to}\r\nReturn-Path: <{ORGANIZER}>\r\n".encode() + raw
    return raw


async def event_by_uid(svc: Services, uid: str) -> models.Event:
    async with svc.sessions() as session:
        return await events.find(session, uid)


# --------------------------------------------------------------------------------------------
# Configuration


def test_accounts_from_toml_and_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        f'[server]\ndomain = "{DOMAIN}"\n'
        '[imap]\naccounts = [\n'
        '  {host = "imap.fastmail.com", username = "create@invites.example.com", '
        'password = "pw", after = "move", move_to = "Done"},\n'
        '  {host = "mail.example.net", port = 143, tls = "starttls", username = "u", '
        f'password = "pw2", idle = false, poll_interval = 30, deliver_to = "{CREATE}"}},\n'
        ']\n')
    cfg = config_mod.load(path, {})
    a, b = cfg.imap.accounts
    assert (a.host, a.effective_port, a.tls, a.after, a.move_to, a.mailbox) == (
        "imap.fastmail.com", 993, "implicit", "move", "Done", "INBOX")
    assert (b.effective_port, b.tls, b.idle, b.poll_interval, b.deliver_to) == (
        143, "starttls", False, 30, CREATE)
    assert "pw" not in repr(a)  # a logged config never shows the password

    env = {"CISERVER_SERVER__DOMAIN": DOMAIN, "CISERVER_IMAP__ACCOUNTS": json.dumps(
        [{"host": "imap.example.org", "username": "x", "password": "y", "port": "1993",
          "idle": "false"}])}
    (c,) = config_mod.load(None, env).imap.accounts
    assert (c.host, c.port, c.idle) == ("imap.example.org", 1993, False)
    assert config_mod.load(None, {}).imap.accounts == []  # no polling by default


@pytest.mark.parametrize(("text", "env", "expected"), [
    ('[imap]\naccounts = "imap.example.com"\n', {},
     "[imap] accounts: expected a list of tables like [{host ="),
    ('[imap]\naccounts = [{host = "h", username = "u", password = "p", port = "x"}]\n', {},
     "[imap] accounts[0].port: expected an integer, got 'x'"),
    ('[imap]\naccounts = [{host = "h", username = "u", password = "p"}, '
     '{host = "h", username = "u", password = "p", tls = "ssl"}]\n', {},
     '[imap] accounts[1].tls: expected "none" | "starttls" | "implicit", got \'ssl\''),
    ('[imap]\naccounts = [{host = "h", user = "u", password = "p"}]\n', {},
     "[imap] accounts[0].user: unknown key (known: host, port"),
    ('[imap]\naccounts = [{host = "h", password = "p"}]\n', {},
     "[imap] accounts[0].username: required"),
    ('[imap]\naccounts = [{host = "h", username = "u", password = "p", after = "delete"}]\n',
     {}, '[imap] accounts[0].after: expected "seen" | "move"'),
    ('[imap]\naccounts = [{host = "h", username = "u", password = "p", after = "move", '
     'move_to = "INBOX"}]\n', {}, "[imap] accounts[0].move_to: expected a folder other than"),
    ('[imap]\naccounts = [{host = "h", username = "u", password = "p", '
     'deliver_to = "create@elsewhere.example"}]\n', {},
     "[imap] accounts[0].deliver_to: expected an address on [server] domain"),
    ('[imap]\naccounts = [{host = "h", username = "u", password = "p", poll_interval = 0}]\n',
     {}, "[imap] accounts[0].poll_interval: expected a positive integer"),
    ('[imap]\naccounts = ["imap.example.com"]\n', {}, "[imap] accounts[0]: expected a table"),
    ("", {"CISERVER_IMAP__ACCOUNTS": "[{host: 1}]"},
     "environment CISERVER_IMAP__ACCOUNTS: [imap] accounts: expected a list of tables"),
    ("", {"CISERVER_IMAP__ACCOUNTS": '[{"host": "h", "username": "u", "password": "p", '
          '"port": "many"}]'},
     "environment CISERVER_IMAP__ACCOUNTS: [imap] accounts[0].port: expected an integer"),
])
def test_account_errors_name_file_section_key_and_form(tmp_path: Path, text: str,
                                                       env: dict[str, str],
                                                       expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f'[server]\ndomain = "{DOMAIN}"\n' + text)
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(path, env)
    assert expected in str(info.value)
    if not env:
        assert str(path) in str(info.value)


def test_wrong_password_type_is_reported_without_the_value(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[imap]\naccounts = [{host = "h", username = "u", password = 123456}]\n')
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(path, {})
    assert "[imap] accounts[0].password: expected a string" in str(info.value)
    assert "123456" not in str(info.value)


def test_example_documents_every_account_key_with_its_default() -> None:
    text = EXAMPLE.read_text()
    assert tomllib.loads(text)["imap"]["accounts"] == []
    for f in fields(config_mod.ImapAccount):
        default = json.dumps(f.default) if not isinstance(f.default, bool) else (
            "true" if f.default else "false")
        assert re.search(rf"^#\s+{f.name} = {re.escape(default)}\s", text, re.M), f.name
        assert f.metadata["help"][:30] in text.replace("\n#   ", " "), f"{f.name}: no help"


# --------------------------------------------------------------------------------------------
# Recipients


def test_recipients_come_from_envelope_headers_then_to_cc_then_deliver_to(
        sqlite_svc: Services) -> None:
    book = sqlite_svc.book
    rsvp = book.address(Kind.RSVP, 7)
    forged = f"rsvp+{'a' * 26}@{DOMAIN}"

    def headers(text: str) -> Any:
        return imap.parse_headers(text.replace("\n", "\r\n").encode() + b"\r\nbody\r\n")

    both = headers(f"Delivered-To: {rsvp.upper()}\nX-Original-To: box@provider.example\n"
                   f"To: Fans <fans@example.org>, {CREATE}\n")
    assert imap.recipients(book, both, CREATE) == [rsvp]  # the envelope wins
    listed = headers(f"Delivered-To: box@provider.example\nTo: Someone <someone@example.org>,"
                     f" <{rsvp}>\nCc: CREATE@{DOMAIN.upper()}, {forged}\n")
    assert imap.recipients(book, listed, CREATE) == [rsvp, CREATE]
    none = headers("To: box@provider.example\n")
    assert imap.recipients(book, none, CREATE) == [CREATE]
    # Only a forged token of our domain: kept, so that the inbox shows nothing was applied.
    stray = headers(f"To: {forged}\nCc: box@provider.example\n")
    assert imap.recipients(book, stray, CREATE) == [forged]
    assert imap.envelope_sender(headers(f"Return-Path: <{ORGANIZER}>\n")) == ORGANIZER
    assert imap.envelope_sender(headers("Return-Path: <>\n")) == ""


def test_folder_names_are_quoted_in_modified_utf7() -> None:
    assert imap.mailbox_name("INBOX") == '"INBOX"'
    assert imap.mailbox_name("~peter/mail/台北/日本語") == '"~peter/mail/&U,BTFw-/&ZeVnLIqe-"'
    assert imap.mailbox_name('R&D "new"') == '"R&-D \\"new\\""'


async def test_a_silent_server_times_out_and_a_stop_is_prompt(
        sqlite_svc: Services, caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts and never greets: the account's timeout ends each attempt; a
    stop of the daemon does not wait for it."""
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    try:
        acct = config_mod.ImapAccount(host="127.0.0.1", port=port, tls="none", username=USER,
                                      password=PASSWORD, timeout=1, retry_max=1)
        async with running(sqlite_svc, acct) as poller:
            await until(lambda: poller.failures >= 2, what="timed-out attempts")
        assert "timed out; reconnecting in" in caplog.text
        slow = config_mod.ImapAccount(host="127.0.0.1", port=port, tls="none", username=USER,
                                      password=PASSWORD, timeout=60)
        t0 = time.monotonic()
        async with running(sqlite_svc, slow) as poller:
            await until(lambda: poller.state == "connecting", what="connecting")
            await asyncio.sleep(0.2)
        assert time.monotonic() - t0 < 5 and poller.failures == 0
    finally:
        silent.close()


# --------------------------------------------------------------------------------------------
# Against Dovecot


@needs_dovecot
async def test_invites_and_replies_arrive_once_and_idle_is_prompt(
        sqlite_svc: Services, dovecot: Dovecot) -> None:
    svc = sqlite_svc
    svc.clock = lambda: FEB_20
    uid = "imap-game-1@google.com"
    # Delivered before ciserver runs: the provider's MX put it in the mailbox.
    await asyncio.to_thread(dovecot.append, invite(uid, delivered_to=CREATE))

    async with running(svc, account(dovecot)) as poller:
        await until(lambda: poller.handled == 1, what="the first message handled")
        (row,) = await inbox_rows(svc)
        assert (row.source, row.rcpt_to, row.mail_from) == ("imap", CREATE, ORGANIZER)
        assert row.peer.startswith(f"{USER}@127.0.0.1/INBOX uid ")
        assert await inbox.drain(svc) == 1
        event = await event_by_uid(svc, uid)
        assert event.summary == "Knicks vs Celtics"
        assert await asyncio.to_thread(dovecot.flags) == [{"\\Seen"}]

        # A customer of that event, and their answer from Google Calendar, delivered while
        # the poller is in IDLE: it arrives in seconds, not after poll_interval (300 s).
        async with svc.sessions.begin() as session:
            ev = await session.merge(event)
            result = await subscriptions.invite(svc, session, ev, "fan.two@gmail.com",
                                                send=False)
            sub_id = result.subscription.id
        token = svc.book.token(sub_id)
        await until(lambda: poller.state == "idle", what="the poller in IDLE")
        reply = load_fixture("google_reply_tentative.eml", token=token, uid=event.uid,
                             sequence=0)
        await asyncio.to_thread(dovecot.append, reply)
        took = await until(lambda: poller.handled == 2, timeout=15, what="the reply handled")
        assert took < 10, f"IDLE should deliver at once; took {took:.1f} s"
        rows = await inbox_rows(svc)
        assert rows[1].rcpt_to == f"rsvp+{token}@{DOMAIN}"  # from its To: header
        await inbox.drain(svc)
        async with svc.sessions() as session:
            sub = await session.get(models.Subscription, sub_id)
            assert sub is not None and sub.partstat == "TENTATIVE"
        assert await asyncio.to_thread(dovecot.flags) == [{"\\Seen"}, {"\\Seen"}]

        # A forged token: taken off the server, recorded, never applied.
        forged = "a" * 26
        fake = load_fixture("outlook_reply_accept.eml", token=forged, uid=event.uid,
                            sequence=0).replace(b"fan.one@example.com", b"fan.two@gmail.com")
        await asyncio.to_thread(dovecot.append, fake)
        await until(lambda: poller.handled == 3, what="the forged reply taken")
        await inbox.drain(svc)
        row = (await inbox_rows(svc))[2]
        assert (row.rcpt_to, row.status) == (f"rsvp+{forged}@{DOMAIN}", "ignored")
        async with svc.sessions() as session:
            sub = await session.get(models.Subscription, sub_id)
            assert sub is not None and sub.partstat == "TENTATIVE"
        assert poller.sessions == 1 and poller.failures == 0

    # A restart of the poller takes nothing twice.
    async with running(svc, account(dovecot)) as again:
        await until(lambda: again.sweeps >= 1 and again.state == "idle",
                    what="a full check after the restart")
        assert again.handled == 0
    assert await inbox_count(svc) == 3


@needs_dovecot
@pytest.mark.parametrize("capabilities", ["", "IMAP4rev1 LITERAL+"],
                         ids=["MOVE+IDLE", "COPY+EXPUNGE+polling"])
async def test_after_move_moves_each_message_once_committed(
        sqlite_svc: Services, dovecot_factory: Callable[..., Dovecot],
        capabilities: str) -> None:
    """With Dovecot's own capabilities the poller uses MOVE and IDLE; with a server that
    offers neither (nor UIDPLUS), COPY + \\Deleted + EXPUNGE and polling."""
    svc = sqlite_svc
    server = dovecot_factory(capabilities=capabilities)
    await asyncio.to_thread(server.append, invite("move-1@google.com"))
    acct = account(server, after="move", move_to="Processed",
                   poll_interval=300 if not capabilities else 1)
    async with running(svc, acct) as poller:
        await until(lambda: poller.handled == 1, what="the first message moved")
        await asyncio.to_thread(server.append, invite("move-2@google.com"))
        await until(lambda: poller.handled == 2, what="the second message moved")
        mode = "idle" if not capabilities else "waiting"
        await until(lambda: poller.state == mode, what=f"the poller {mode}")
    assert await asyncio.to_thread(server.flags, "INBOX") == []
    assert await asyncio.to_thread(server.flags, "Processed") == [{"\\Seen"}, {"\\Seen"}]
    assert await inbox_count(svc) == 2
    assert await inbox.drain(svc) == 2
    for uid in ("move-1@google.com", "move-2@google.com"):
        await event_by_uid(svc, uid)


@needs_dovecot
async def test_reconnects_after_dovecot_restarts(sqlite_svc: Services, dovecot: Dovecot,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    svc = sqlite_svc
    caplog.set_level(logging.INFO, logger="ciserver.imap")
    async with running(svc, account(dovecot)) as poller:
        await until(lambda: poller.state == "idle", what="the poller in IDLE")
        await asyncio.to_thread(dovecot.stop)
        await until(lambda: poller.failures >= 2, what="failed reconnects while it is down")
        await asyncio.to_thread(dovecot.start)
        await until(lambda: poller.sessions == 2, timeout=15, what="a new session")
        await asyncio.to_thread(dovecot.append, invite("after-restart@google.com"))
        await until(lambda: poller.handled == 1, what="mail after the restart")
    assert "reconnecting in" in caplog.text
    assert await asyncio.to_thread(dovecot.flags) == [{"\\Seen"}]


@needs_dovecot
async def test_a_failed_commit_leaves_the_message_unflagged_until_it_succeeds(
        sqlite_svc: Services, dovecot: Dovecot, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    svc = sqlite_svc
    real_accept = inbox.accept
    calls = 0

    async def flaky_accept(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("database is unavailable")
        return await real_accept(*args, **kwargs)

    monkeypatch.setattr(imap.inbox, "accept", flaky_accept)
    await asyncio.to_thread(dovecot.append, invite("flaky@google.com"))
    async with running(svc, account(dovecot)) as poller:
        await until(lambda: poller.failures == 1, what="the failed commit")
        assert await asyncio.to_thread(dovecot.flags) == [set()]  # not flagged: not lost
        assert await inbox_count(svc) == 0
        await until(lambda: poller.handled == 1, what="the retry")
    assert "could not be stored in the inbox and stays unflagged" in caplog.text
    assert await inbox_count(svc) == 1
    assert await asyncio.to_thread(dovecot.flags) == [{"\\Seen"}]


@needs_dovecot
@pytest.mark.parametrize("tls", ["implicit", "starttls"])
async def test_tls(sqlite_svc: Services, dovecot_factory: Callable[..., Dovecot],
                   tmp_path: Path, tls: str, caplog: pytest.LogCaptureFixture) -> None:
    pki = make_pki(tmp_path / "pki")
    server = dovecot_factory(pki=pki)
    port = server.tls_port if tls == "implicit" else server.port
    await asyncio.to_thread(server.append, invite("tls@google.com"))
    # Without our CA the certificate cannot be verified: logged, retried, nothing taken.
    async with running(sqlite_svc, account(server, tls=tls, port=port, host="localhost")
                       ) as untrusted:
        await until(lambda: untrusted.failures >= 2, what="refused certificates")
        assert untrusted.sessions == 0
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text
    assert await asyncio.to_thread(server.flags) == [set()]
    acct = account(server, tls=tls, port=port, host="localhost", ca_file=str(pki.ca))
    async with running(sqlite_svc, acct) as poller:
        await until(lambda: poller.handled == 1, what="the message over TLS")
    assert await asyncio.to_thread(server.flags) == [{"\\Seen"}]
    assert re.search(rf"Login: user=<{USER}>, method=PLAIN, .*, TLS, ",
                     server.log_text()), server.log_text()


@needs_dovecot
async def test_daemon_polls_and_a_wrong_password_breaks_nothing(
        tmp_path: Path, sink: Sink, dovecot: Dovecot,
        caplog: pytest.LogCaptureFixture) -> None:
    """`serve` starts one poller per account: the one with a wrong password is logged and
    retried; the other one delivers, the daemon processes, and the stop is clean."""
    caplog.set_level(logging.INFO)
    good = {"host": "127.0.0.1", "port": dovecot.port, "tls": "none", "username": USER,
            "password": PASSWORD, "poll_interval": 300, "retry_max": 1}
    bad = dict(good, password="not-the-password-7731")
    cfg = make_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'd.db'}", sink,
                      imap={"accounts": json.dumps([bad, good])})
    ready: asyncio.Future[Services] = asyncio.get_running_loop().create_future()

    async def on_ready(svc: Services) -> None:
        ready.set_result(svc)

    stop = asyncio.Event()
    task = asyncio.create_task(daemon.serve(cfg, on_ready=on_ready, stop=stop))
    try:
        svc = await asyncio.wait_for(ready, 20)
        await asyncio.to_thread(dovecot.append, invite("daemon@google.com"))

        async def taken() -> bool:
            async with svc.sessions() as session:
                try:
                    await events.find(session, "daemon@google.com")
                    return True
                except events.NotFound:
                    return False

        # Dovecot delays logins from an address whose logins just failed (its per-IP auth
        # penalty, 2 s and growing): the good account, on the same address as the bad one,
        # waits for it, and longer on a loaded machine (a 15 s wait once ran out in CI).
        await until(taken, timeout=45, what="the event made by the daemon")
        await until(lambda: caplog.text.count(f"login as '{USER}' refused") >= 2,
                    what="retried logins with the wrong password")
        assert not task.done()
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 20) == 0
    assert "[AUTHENTICATIONFAILED]" in caplog.text
    assert "not-the-password-7731" not in caplog.text  # passwords are never logged


@needs_dovecot
async def test_postgresql_instances_poll_an_account_one_at_a_time(
        tmp_path: Path, pg_url: str, sink: Sink, dovecot: Dovecot) -> None:
    """Two instances on one PostgreSQL database: one polls, the other stands by (no message
    is taken twice) and takes over when the first one stops."""
    cfg = make_config(tmp_path, pg_url, sink)
    first, second = Services.open(cfg), Services.open(cfg)
    await db.ensure_schema(first.engine, cfg.database_url)
    acct = account(dovecot, poll_interval=1)
    standby_stop = asyncio.Event()
    standby = imap.Poller(second, acct)
    standby_task: asyncio.Task[None] | None = None
    try:
        async with running(first, acct) as active:
            await until(lambda: active.state == "idle", what="the first instance in IDLE")
            standby_task = asyncio.create_task(standby.run(standby_stop))
            await until(lambda: standby.state == "standby", what="the second one standing by")
            for i in range(3):
                await asyncio.to_thread(dovecot.append, invite(f"pg-{i}@google.com"))
            await until(lambda: active.handled == 3, what="three messages by the first")
            await asyncio.sleep(1.5)  # the standby instance re-checks meanwhile
            assert standby.state == "standby" and standby.sessions == 0
        await until(lambda: standby.state == "idle", what="the take-over")
        await asyncio.to_thread(dovecot.append, invite("pg-3@google.com"))
        await until(lambda: standby.handled == 1, what="mail after the take-over")
        assert await inbox_count(first) == 4
    finally:
        standby_stop.set()
        if standby_task is not None:
            await asyncio.wait_for(standby_task, 15)
        await first.close()
        await second.close()
