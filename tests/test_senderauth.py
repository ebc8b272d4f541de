"""Sender authentication for create@: DKIM with an injected DNS, Authentication-Results."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ciserver.services.senderauth import _txt_via, aligned, dkim_identity, results_identity

MESSAGE = (b"From: Zach Lowe <zach@team.example>\r\nTo: create@invites.example.com\r\n"
           b"Subject: Invitation: Game\r\nDate: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
           b"Message-ID: <1@team.example>\r\n\r\nBEGIN:VCALENDAR\r\nEND:VCALENDAR\r\n")


@dataclass
class TXT:
    strings: list[bytes]


class FakeResolver:
    """Other domains' DNS, which tests cannot reach: a dict of TXT records."""

    def __init__(self, records: dict[str, bytes]) -> None:
        self.records = records

    def resolve(self, name: str, rdtype: str) -> list[TXT]:
        if rdtype != "TXT" or name not in self.records:
            raise LookupError(name)
        value = self.records[name]
        return [TXT([value[i:i + 255] for i in range(0, len(value), 255)])]


@pytest.fixture(scope="module")
def key() -> tuple[bytes, bytes]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = private.public_key().public_bytes(serialization.Encoding.DER,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def signed(pem: bytes, domain: bytes, message: bytes = MESSAGE) -> bytes:
    sig = dkim.sign(message, b"s1", domain, pem, include_headers=[b"from", b"to", b"subject"])
    return sig + message


def test_alignment() -> None:
    assert aligned("team.example", "team.example")
    assert aligned("mail.team.example", "team.example")
    assert aligned("team.example", "eu.team.example")
    assert not aligned("evilteam.example", "team.example")
    assert not aligned("", "team.example")


def test_dkim_aligned_signature_proves_the_sender(key: tuple[bytes, bytes]) -> None:
    pem, txt = key
    dns = _txt_via(FakeResolver({"s1._domainkey.team.example": txt,
                                 "s1._domainkey.mailer.example": txt}))
    assert dkim_identity(signed(pem, b"team.example"), "Zach@Team.example", dns) == \
        "zach@team.example"
    # a valid signature by another domain proves nothing about the From address
    assert dkim_identity(signed(pem, b"mailer.example"), "zach@team.example", dns) == ""
    # a changed body breaks the signature
    tampered = signed(pem, b"team.example").replace(b"END:VCALENDAR", b"END:VEVENT")
    assert dkim_identity(tampered, "zach@team.example", dns) == ""
    # no key published, or no signature at all
    assert dkim_identity(signed(pem, b"team.example"), "zach@team.example",
                         _txt_via(FakeResolver({}))) == ""
    assert dkim_identity(MESSAGE, "zach@team.example", dns) == ""


def test_authentication_results_from_the_trusted_hop_only() -> None:
    ours = (b"Authentication-Results: mx.invites.example.com; dkim=pass header.d=team.example;"
            b" spf=pass smtp.mailfrom=team.example\r\n"
            b"Received: from out.team.example by mx.invites.example.com; "
            b"Mon, 23 Nov 2026 10:00:01 +0000\r\n")
    assert results_identity(ours + MESSAGE, "zach@team.example",
                            ["mx.invites.example.com"]) == "zach@team.example"
    dmarc = (b"Authentication-Results: mx.invites.example.com; dmarc=pass "
             b"header.from=team.example\r\nReceived: by mx.invites.example.com\r\n")
    assert results_identity(dmarc + MESSAGE, "zach@team.example",
                            ["mx.invites.example.com"]) == "zach@team.example"
    failed = ours.replace(b"dkim=pass", b"dkim=fail")
    assert results_identity(failed + MESSAGE, "zach@team.example",
                            ["mx.invites.example.com"]) == ""
    other_id = ours.replace(b"mx.invites.example.com;", b"mx.evil.example;")
    assert results_identity(other_id + MESSAGE, "zach@team.example",
                            ["mx.invites.example.com"]) == ""
    # A copy written by the sender sits below our hop's Received header: ignored.
    forged = (b"Received: by mx.invites.example.com\r\nReceived: by out.evil.example\r\n"
              b"Authentication-Results: mx.invites.example.com; dkim=pass "
              b"header.d=team.example\r\n")
    assert results_identity(forged + MESSAGE, "zach@team.example",
                            ["mx.invites.example.com"]) == ""
    # dkim=pass for another domain does not align
    unaligned = ours.replace(b"header.d=team.example", b"header.d=mailer.example")
    assert results_identity(unaligned + MESSAGE, "zach@team.example",
                            ["mx.invites.example.com"]) == ""


# --------------------------------------------------------------------------------------------
# Through the pipeline: create@ mail is authenticated before it may create anything.

class AsyncFakeResolver(FakeResolver):
    """The daemon's resolvers are async (dnspython's asyncresolver shape)."""

    async def resolve(self, name: str, rdtype: str) -> list[TXT]:  # type: ignore[override]
        return FakeResolver.resolve(self, name, rdtype)


def _invite(uid: str) -> bytes:
    from datetime import UTC, datetime, timedelta

    from .organizer_mail import organizer_mail

    start = datetime(2027, 5, 1, 23, tzinfo=UTC)
    return organizer_mail("google", uid=uid, start=start, end=start + timedelta(hours=2),
                          summary=f"Game {uid}")


@pytest.fixture
async def dkim_pipeline(tmp_path, sqlite_url, sink, key):  # type: ignore[no-untyped-def]
    from ciserver.services.context import Services
    from ciserver.store import db

    from .conftest import make_config, open_pipeline

    cfg = make_config(tmp_path, sqlite_url, sink, organizers={"sender_auth": "dkim"})
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    svc.resolver = AsyncFakeResolver({"s1._domainkey.team.example": key[1],
                                      "s1._domainkey.mailer.example": key[1]})
    async with open_pipeline(svc, sink) as p:
        yield p
    await svc.close()


async def test_dkim_decides_who_may_create(dkim_pipeline, key) -> None:  # type: ignore[no-untyped-def]
    from ciserver.store import models

    from .conftest import ORGANIZER

    p = dkim_pipeline
    signed_ok = signed(key[0], b"team.example", _invite("dkim-ok@team.example"))
    row = await p.deliver("create@invites.example.com", signed_ok, ORGANIZER)
    assert row.status == "done", row.result
    unsigned = await p.deliver("create@invites.example.com", _invite("unsigned@team.example"),
                               ORGANIZER)
    assert unsigned.status == "rejected"
    assert "could not be authenticated" in unsigned.result and "DKIM" in unsigned.result
    other = signed(key[0], b"mailer.example", _invite("other@team.example"))
    row = await p.deliver("create@invites.example.com", other, ORGANIZER)
    assert row.status == "rejected"
    tampered = signed(key[0], b"team.example", _invite("tampered@team.example")).replace(
        b"Game tampered", b"Game TAMPERED")
    row = await p.deliver("create@invites.example.com", tampered, ORGANIZER)
    assert row.status == "rejected"
    uids = [e.organizer_uid for e in await p.rows(models.Event)]
    assert uids == ["dkim-ok@team.example"]


async def test_authentication_results_mode(tmp_path, sqlite_url, sink) -> None:  # type: ignore[no-untyped-def]
    from ciserver.services.context import Services
    from ciserver.store import db, models

    from .conftest import ORGANIZER, make_config, open_pipeline

    cfg = make_config(tmp_path, sqlite_url, sink, organizers={
        "sender_auth": "authentication-results", "authserv_id": '["mx.invites.example.com"]'})
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    trusted = (b"Authentication-Results: mx.invites.example.com; dkim=pass "
               b"header.d=team.example; dmarc=pass header.from=team.example\r\n"
               b"Received: from out.team.example by mx.invites.example.com\r\n")
    forged = (b"Received: by mx.invites.example.com\r\nReceived: by out.evil.example\r\n"
              b"Authentication-Results: mx.invites.example.com; dkim=pass "
              b"header.d=team.example\r\n")
    async with open_pipeline(svc, sink) as p:
        row = await p.deliver("create@invites.example.com",
                              trusted + _invite("ar-ok@team.example"), ORGANIZER)
        assert row.status == "done", row.result
        row = await p.deliver("create@invites.example.com",
                              forged + _invite("ar-forged@team.example"), ORGANIZER)
        assert row.status == "rejected" and "could not be authenticated" in row.result
        uids = [e.organizer_uid for e in await p.rows(models.Event)]
        assert uids == ["ar-ok@team.example"]
    await svc.close()
