"""The SMTP listener against real clients on loopback: what it accepts, what it refuses,
and that what it accepted is stored before it says 250."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest
from sqlalchemy import func, select

from ciserver import smtp
from ciserver.services import inbox
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import InboxMessage

from .conftest import DOMAIN, ORGANIZER, Sink, make_config

CREATE = f"create@{DOMAIN}"
MSG = (f"From: Zach <{ORGANIZER}>\r\nTo: {CREATE}\r\nSubject: hello\r\n\r\nbody\r\n").encode()


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={DOMAIN}", "-addext", f"subjectAltName=DNS:{DOMAIN}",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def start(tmp_path: Path, sqlite_url: str, sink: Sink, **smtp_cfg: object
                ) -> tuple[Services, asyncio.Server, int]:
    cfg = make_config(tmp_path, sqlite_url, sink, smtp=smtp_cfg)
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    server = await smtp.start(svc)
    return svc, server, int(cfg.smtp.listen.rsplit(":", 1)[1])


@pytest.fixture
async def listener(tmp_path: Path, sqlite_url: str, sink: Sink
                   ) -> AsyncIterator[tuple[Services, int]]:
    svc, server, port = await start(tmp_path, sqlite_url, sink, max_recipients=3)
    yield svc, port
    server.close()
    await svc.close()


async def count_inbox(svc: Services) -> int:
    async with svc.sessions() as s:
        return int((await s.execute(select(func.count(InboxMessage.id)))).scalar_one())


async def raw_session(port: int, script: bytes, wait: float = 0.5) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(script)
    await writer.drain()
    out = b""
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            out += chunk
    except TimeoutError:
        pass
    writer.close()
    return out


async def test_committed_before_250_and_recipient_checks(listener: tuple[Services, int]) -> None:
    svc, port = listener
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    await client.connect()
    await client.ehlo()
    await client.mail("zach@team.example")
    for rcpt, code in (("nobody@elsewhere.example", 550), (f"postmaster@{DOMAIN}", 550),
                       (f"rsvp+{'b' * 26}@{DOMAIN}", 550), (f"rsvp@{DOMAIN}", 550)):
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
            await client.rcpt(rcpt)
        assert info.value.code == code and "5.1.1" in info.value.message
    for i in range(3):
        await client.rcpt(f"unsubscribe+{svc.book.token(i + 1)}@{DOMAIN}")
    with pytest.raises(aiosmtplib.SMTPRecipientRefused) as info:
        await client.rcpt(CREATE)
    assert info.value.code == 452  # max_recipients = 3
    reply = await client.data(MSG)
    assert reply.code == 250 and "queued as" in reply.message
    # At this instant the message is in the store (nobody processed it yet).
    assert await count_inbox(svc) == 1
    await client.quit()


async def test_store_failure_is_a_temporary_refusal(listener: tuple[Services, int],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, port = listener

    async def gone(self: object, rows: object) -> list[int]:
        raise RuntimeError("database is gone")

    monkeypatch.setattr(inbox.GroupCommit, "_insert", gone)
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    await client.connect()
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await client.sendmail(ORGANIZER, [CREATE], MSG)
    assert info.value.code == 451  # the sender keeps it and retries: nothing is lost
    await client.quit()


async def test_organizer_not_allowed_is_refused_at_data(listener: tuple[Services, int]) -> None:
    _, port = listener
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port)
    await client.connect()
    bad = MSG.replace(f"Zach <{ORGANIZER}>".encode(), b"Mallory <mallory@evil.example>")
    with pytest.raises(aiosmtplib.SMTPDataError) as info:
        await client.sendmail("mallory@evil.example", [CREATE], bad)
    assert info.value.code == 550 and "5.7.1" in info.value.message
    assert "not allowed to create events" in info.value.message
    await client.quit()


@pytest.mark.parametrize("ending", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"])
async def test_no_smuggling(listener: tuple[Services, int], ending: bytes) -> None:
    """A bare-LF "end of data" inside a message must not end it (SMTP smuggling)."""
    svc, port = listener
    smuggled = (b"MAIL FROM:<mallory@evil.example>\r\nRCPT TO:<" + CREATE.encode() + b">\r\n"
                b"DATA\r\nFrom: ceo@team.example\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
    script = (b"EHLO test\r\nMAIL FROM:<zach@team.example>\r\nRCPT TO:<" + CREATE.encode()
              + b">\r\nDATA\r\n" + MSG + ending + smuggled + b"QUIT\r\n")
    out = await raw_session(port, script)
    assert out.count(b"250 2.0.0 OK queued") == 1, out
    assert await count_inbox(svc) == 1
    async with svc.sessions() as s:
        raw = (await s.execute(select(InboxMessage.raw))).scalar_one()
    assert b"Subject: smuggled" in raw  # it stayed inside the first message's body


async def test_connection_limits_and_slow_clients(tmp_path: Path, sqlite_url: str,
                                                  sink: Sink) -> None:
    svc, server, port = await start(tmp_path, sqlite_url, sink, max_connections_per_ip=2,
                                    session_timeout=1, data_timeout=30)
    try:
        first = await asyncio.open_connection("127.0.0.1", port)
        second = await asyncio.open_connection("127.0.0.1", port)
        assert (await first[0].readline()).startswith(b"220")
        assert (await second[0].readline()).startswith(b"220")
        third = await asyncio.open_connection("127.0.0.1", port)
        assert (await third[0].readline()).startswith(b"421 4.7.0")
        assert await third[0].read() == b""  # closed
        # A client that trickles a byte at a time is cut off at the session limit.
        # (It keeps the idle timer of 30 s from firing, but not the 1 s session limit.)
        for _ in range(4):
            first[1].write(b"N")
            await first[1].drain()
            await asyncio.sleep(0.2)
        rest = await asyncio.wait_for(first[0].read(), 3)
        assert b"421 4.4.2" in rest and first[0].at_eof()
        for conn in (first, second, third):
            conn[1].close()
        await asyncio.sleep(0.1)
        fourth = await asyncio.open_connection("127.0.0.1", port)
        assert (await fourth[0].readline()).startswith(b"220")  # slots were released
        fourth[1].close()
    finally:
        server.close()
        await svc.close()


async def test_starttls(tmp_path: Path, sqlite_url: str, sink: Sink) -> None:
    cert, key = make_cert(tmp_path)
    svc, server, port = await start(tmp_path, sqlite_url, sink, tls_cert=str(cert),
                                    tls_key=str(key))
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False,
                                 tls_context=ctx)
        await client.connect()
        await client.ehlo()
        assert client.supports_extension("starttls")
        await client.starttls(server_hostname=DOMAIN, tls_context=ctx)
        reply = await client.sendmail(ORGANIZER, [CREATE], MSG)
        assert "queued as" in reply[1]
        await client.quit()
        assert await count_inbox(svc) == 1
    finally:
        server.close()
        await svc.close()
