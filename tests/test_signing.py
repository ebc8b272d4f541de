"""DKIM signing of outgoing mail (ciserver.signing), proven with dkimpy's own verifier.

Every message is signed by our `cryptography`-based signer and checked by ``dkim.verify``
with a dnsfunc that answers with the TXT record `ciserver dkim keygen` tells people to
publish: real invites (multipart, base64, folded RFC 2047 headers), notices, odd bodies
(trailing empty lines, whitespace runs, LF-only, empty), tampering, rsa-sha256 and
ed25519-sha256, the [dkim] configuration and its errors, the keygen command, and the
outbox handing signed bytes to the relay.
"""

from __future__ import annotations

import base64
import email
import hashlib
import importlib.util
import os
import random
import re
import stat
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dkim
import pytest
from click.testing import CliRunner
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from dkim.canonicalization import Relaxed

from ciserver import cli, signing
from ciserver import config as config_mod
from ciserver.itip import build
from ciserver.itip import content as content_mod
from ciserver.services import events, notify, outbox, subscriptions
from ciserver.services.context import Services
from ciserver.store import db
from ciserver.store.models import OutboxItem

from .conftest import DOMAIN, ORGANIZER, Sink, make_config

NOW = datetime.now(UTC).replace(microsecond=0)
RSA_KEY = signing.generate_rsa(2048)
ED_KEY = signing.generate_ed25519()
SELECTOR, ED_SELECTOR = "sel2026", "sel2026-ed"

# cryptography refuses to make keys this short; people still have them (openssl genpkey)
RSA_512_PEM = b"""-----BEGIN PRIVATE KEY-----
MIIBVQIBADANBgkqhkiG9w0BAQEFAASCAT8wggE7AgEAAkEAsS7tqKeiyjA4j0GU
H1RQAt+LRV4IgBHv/1QNpCZCwGIXfR5FpkE4+9guGnH5EWTIwreLtyDMAcWjlGIE
FlCsTwIDAQABAkA6v5apjzvY0nhOd64HXUtSSJDDJVSoMkpjXJlRTiZf5xkmlbCw
SBbdAr/rLiSBlHoCP4V5ld6eQrVche4KWfyhAiEA2C92BU1x7QJmbpaWJ2fkrjru
Hrx9RaVsEFEfje0w4McCIQDR0KC+YTxZ7wLOyLSvtnKnlkJlTvNxxB/aYa+2ILxg
OQIgVvg49YcjZuLJTIH+JBoysDj65JiVmPgkkifgltsuB68CIQDLw6CIo+g3sy53
4mXQDBFXfk8nEkDNKNqCfMJnz20CyQIhAIDIyHWMcLKtXetTqm3cxj9UeSq2n0af
3aZgjBrRpoyS
-----END PRIVATE KEY-----
"""

HAVE_NACL = importlib.util.find_spec("nacl") is not None

DnsFunc = Callable[..., bytes | None]


def dns_for(records: dict[str, str]) -> DnsFunc:
    """A dkimpy dnsfunc answering ``name`` (with the root dot, as dkimpy asks) from
    ``records``; anything else is "no such record"."""
    table = {f"{name.rstrip('.')}.".encode(): value.encode() for name, value in records.items()}

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name)

    return dnsfunc


DNS = dns_for({f"{SELECTOR}._domainkey.{DOMAIN}": signing.dns_value(RSA_KEY),
               f"{ED_SELECTOR}._domainkey.{DOMAIN}": signing.dns_value(ED_KEY)})


def signer(ed: bool = False, **kw: object) -> signing.DkimSigner:
    return signing.DkimSigner(DOMAIN, SELECTOR, RSA_KEY,
                              ed25519_selector=ED_SELECTOR if ed else "",
                              ed25519_key=ED_KEY if ed else None, **kw)  # type: ignore[arg-type]


def verify_all(msg: bytes, dnsfunc: DnsFunc = DNS) -> list[bool]:
    """dkimpy's verdict on every DKIM-Signature of ``msg``, top first.

    dkimpy verifies ed25519 with PyNaCl (a test extra); without it, ed25519 signatures are
    checked by :func:`verify_ed25519` instead (and test_ed25519_..._dkimpy is skipped)."""
    parsed = email.message_from_bytes(msg)
    count = len(parsed.get_all("DKIM-Signature") or [])
    assert count, "no DKIM-Signature"
    verifier = dkim.DKIM(msg)
    out = []
    for i in range(count):
        if not HAVE_NACL and sig_tags(msg, i)["a"] == "ed25519-sha256":
            out.append(verify_ed25519(msg, i, dnsfunc))
            continue
        try:
            out.append(bool(verifier.verify(idx=i, dnsfunc=dnsfunc)))
        except dkim.DKIMException:  # what dkim.verify() turns into False
            out.append(False)
    return out


def verify_ed25519(msg: bytes, idx: int, dnsfunc: DnsFunc = DNS) -> bool:
    """RFC 8463 §3 with `cryptography`, apart from the signer's code path: the body hash,
    the h= headers bottom-up, the signature header without its b= value; Ed25519 over the
    SHA-256 of that."""
    msg = msg.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    fields, body = signing.split_message(msg)
    sig_field = [f for f in fields if f[0].lower() == b"dkim-signature"][idx]
    tags = sig_tags(msg, idx)
    if tags["a"] != "ed25519-sha256" or tags["c"] != "relaxed/relaxed":
        return False
    if base64.b64decode(tags["bh"]) != hashlib.sha256(signing.relaxed_body(body)).digest():
        return False
    record = dnsfunc(f"{tags['s']}._domainkey.{tags['d']}.".encode())
    if record is None:
        return False
    pub = dict(t.strip().split("=", 1) for t in record.decode().split(";") if t.strip())
    data = bytearray()
    by_name: dict[bytes, list[tuple[bytes, bytes]]] = {}
    for f in fields:
        by_name.setdefault(f[0].lower(), []).append(f)
    for name in tags["h"].split(":"):
        if by_name.get(name.encode()):
            data += signing.relaxed_header(*by_name[name.encode()].pop())
    unsigned = re.sub(rb"b=[A-Za-z0-9+/=\s]*$", b"b=", sig_field[1])
    data += signing.relaxed_header(b"DKIM-Signature", unsigned)[:-2]
    key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(pub["p"]))
    try:
        key.verify(base64.b64decode(tags["b"]), hashlib.sha256(data).digest())
    except InvalidSignature:
        return False
    return True


def sig_tags(msg: bytes, idx: int = 0) -> dict[str, str]:
    values = email.message_from_bytes(msg).get_all("DKIM-Signature") or []
    value = re.sub(r"\s+", "", str(values[idx]))
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


# --------------------------------------------------------------------------------------------
# Messages


def invite(organizer_name: str = "Zoë Ångström-Müller, Boston Celtics Fan Relations",
           to_name: str = "Jürgen Groß") -> bytes:
    tz = ZoneInfo("America/New_York")
    start = datetime(2030, 11, 3, 19, 30, tzinfo=tz)
    content = content_mod.new_content(
        summary="Knicks vs Celtics — séance spéciale, with a very long title that has to be "
                "folded over several header lines when it becomes the Subject",
        start=start, end=start + timedelta(hours=3), location="Madison Square Garden, NYC",
        description="Doors open at 18:00.\n\n   Merch:   20 % off   \twith this invite.\n")
    event = build.OutboundEvent(
        uid="evt-1@invites.example.com", sequence=2, cancelled=False, content=content,
        organizer_name=organizer_name, organizer_email=ORGANIZER,
        page_url="https://invites.example.com/e/abc")
    to = build.OutboundRecipient(
        email="fan.one@example.com", name=to_name, partstat="NEEDS-ACTION",
        rsvp_address=f"rsvp+tok@{DOMAIN}", unsubscribe_address=f"unsub+tok@{DOMAIN}",
        unsubscribe_url="https://invites.example.com/u/tok")
    return build.render_invite(event, to, now=NOW, message_id=f"<m1@{DOMAIN}>", domain=DOMAIN)


@pytest.fixture
def offline_svc(tmp_path: Path) -> Services:
    """Services for the pure builders (no database is touched)."""
    cfg = make_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", None)
    return Services.open(cfg)


def notice(svc: Services) -> bytes:
    return notify.compose(
        svc, to=ORGANIZER, subject="Report: Knicks vs Celtics — who is coming",
        text="The answers are attached as CSV.\n", reply_to=f"create@{DOMAIN}",
        in_reply_to="<orig@team.example>",
        attachment=("report.csv", b"email,rsvp\nfan@example.com,Y\n", "text/csv"))


SIMPLE_HEAD = (b"From: Calendar invite server <create@invites.example.com>\r\n"
               b"To: zach@team.example\r\nSubject: Hello\r\nDate: Mon, 1 Jan 2030 00:00:00 "
               b"+0000\r\nMessage-ID: <x@invites.example.com>\r\n")

ODD_MESSAGES = {
    "trailing empty lines": SIMPLE_HEAD + b"\r\nline\r\n\r\n\r\n\r\n",
    "trailing whitespace-only lines": SIMPLE_HEAD + b"\r\nline\r\n  \r\n\t\r\n \t \r\n",
    "whitespace runs": SIMPLE_HEAD + b"\r\n  lead  and   inner \t\t runs\t \r\n\tx  y \r\n",
    "LF only": SIMPLE_HEAD.replace(b"\r\n", b"\n") + b"\nbody one\nbody  two  \n\n\n",
    "mixed and bare CR": SIMPLE_HEAD + b"\r\nmixed\nline\rends\r\n",
    "empty body": SIMPLE_HEAD + b"\r\n",
    "no blank line, no body": SIMPLE_HEAD,
    "no final newline": SIMPLE_HEAD + b"\r\nlast line without newline   ",
    "folded header whitespace": (SIMPLE_HEAD.replace(b"Subject: Hello",
                                                     b"Subject:  Hello \t\r\n\t  folded  ,\r\n"
                                                     b"     twice\t") + b"\r\nbody\r\n"),
    "duplicate header": SIMPLE_HEAD + b"To: second@example.org\r\n\r\nbody\r\n",
    "utf-8 body, 8bit": SIMPLE_HEAD + (b"Content-Type: text/plain; charset=utf-8\r\n"
                                       b"Content-Transfer-Encoding: 8bit\r\n\r\n"
                                       + "Grüße, Zoë   \r\n".encode()),
}


# --------------------------------------------------------------------------------------------
# Canonicalization against RFC 6376 and dkimpy


def test_relaxed_canonicalization_example_of_rfc6376_3_4_5() -> None:
    fields, body = signing.split_message(b"A: X\r\nB : Y\t\r\n\tZ  \r\n\r\n C \r\n"
                                         b"D \t E\r\n\r\n\r\n")
    assert b"".join(signing.relaxed_header(*f) for f in fields) == b"a:X\r\nb:Y Z\r\n"
    assert signing.relaxed_body(body) == b" C\r\nD E\r\n"
    assert signing.relaxed_body(b"") == b""
    assert signing.relaxed_body(b"\r\n\r\n") == b""
    assert signing.relaxed_body(b" \t\r\n") == b""


def test_canonicalization_matches_dkimpy_on_random_input() -> None:
    rnd = random.Random(6376)
    alphabet = [b" ", b"\t", b"\r\n", b"a", b"b", b"\xc3\xa9", b":", b"="]
    for _ in range(2000):
        body = b"".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 40)))
        body = signing.normalize(body)
        assert signing.relaxed_body(body) == Relaxed.canonicalize_body(body), body
        value = b"".join(rnd.choice([b" ", b"\t", b"\r\n ", b"\r\n\t", b"x", b"y"])
                         for _ in range(rnd.randint(0, 20)))
        name = rnd.choice([b"Subject", b"subject ", b"X-A\t"])
        ((dn, dv),) = Relaxed.canonicalize_headers([(name, value)])
        assert signing.relaxed_header(name, value) == dn + b":" + dv


def test_normalize_gives_crlf_everywhere_and_a_final_crlf() -> None:
    assert signing.normalize(b"a\nb\rc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert signing.normalize(b"") == b""
    assert signing.normalize(b"a\r\n") == b"a\r\n"


# --------------------------------------------------------------------------------------------
# dkimpy accepts what we sign


def test_real_invite_verifies_with_dkimpy() -> None:
    raw = invite()
    msg = email.message_from_bytes(raw)
    assert msg.is_multipart() and "=?utf-8?" in raw.decode().lower()  # RFC 2047 names
    assert any(p.get("Content-Transfer-Encoding") == "base64" for p in msg.walk())
    assert re.search(rb"\r\nSubject: [^\r]*\r\n[ \t]", raw), "Subject is folded"
    signed = signer().sign(raw, int(NOW.timestamp()))
    assert dkim.verify(signed, dnsfunc=DNS)
    assert signed.endswith(raw)  # CRLF already: the message itself is unchanged below
    tags = sig_tags(signed)
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == ("rsa-sha256", "relaxed/relaxed",
                                                             DOMAIN, SELECTOR)
    assert tags["t"] == str(int(NOW.timestamp()))
    signed_names = tags["h"].split(":")
    for name in ("from", "to", "subject", "date", "message-id", "mime-version",
                 "content-type", "list-unsubscribe", "list-unsubscribe-post"):
        assert name in signed_names, name
    # From, List-Unsubscribe and List-Unsubscribe-Post are oversigned: no copy can be added
    for name in ("from", "list-unsubscribe", "list-unsubscribe-post", "subject"):
        assert signed_names.count(name) == 2, name
    fields, _ = signing.split_message(signed)
    (sig_field,) = [b"%s:%s" % f for f in fields if f[0] == b"DKIM-Signature"]
    assert max(len(line) for line in sig_field.split(b"\r\n")) <= 78  # folded


def test_notice_verifies_with_dkimpy(offline_svc: Services) -> None:
    raw = notice(offline_svc)
    signed = signer().sign(raw)
    assert dkim.verify(signed, dnsfunc=DNS)
    names = sig_tags(signed)["h"].split(":")
    assert {"reply-to", "in-reply-to", "references", "auto-submitted"} <= set(names)


@pytest.mark.parametrize("name", sorted(ODD_MESSAGES))
def test_odd_messages_verify_with_dkimpy(name: str) -> None:
    raw = ODD_MESSAGES[name]
    signed = signer(ed=True).sign(raw)
    assert verify_all(signed) == [True, True]
    # what goes on the wire is CRLF only, ending in CRLF: exactly what was signed
    assert b"\n" not in signed.replace(b"\r\n", b"") and b"\r" not in signed.replace(b"\r\n",
                                                                                    b"")
    assert signed.endswith(b"\r\n")
    assert signing.normalize(signed) == signed


def test_empty_body_hash_is_the_hash_of_nothing() -> None:
    signed = signer().sign(ODD_MESSAGES["empty body"])
    assert sig_tags(signed)["bh"] == base64.b64encode(hashlib.sha256(b"").digest()).decode()


def test_lf_only_message_is_sent_with_crlf() -> None:
    raw = ODD_MESSAGES["LF only"]
    signed = signer().sign(raw)
    assert signed.endswith(signing.normalize(raw))
    assert dkim.verify(signed, dnsfunc=DNS)


def test_ed25519_second_signature_verifies_with_dkimpy() -> None:
    pytest.importorskip("nacl", reason="dkimpy verifies ed25519 with PyNaCl")
    signed = signer(ed=True).sign(invite())
    assert verify_all(signed) == [True, True]
    assert sig_tags(signed, 0)["a"] == "rsa-sha256"  # RSA on top: what everyone verifies
    ed_tags = sig_tags(signed, 1)
    assert (ed_tags["a"], ed_tags["s"]) == ("ed25519-sha256", ED_SELECTOR)
    # RFC 8463: a 64-byte Ed25519 signature; the published key is the raw 32 bytes
    assert len(base64.b64decode(ed_tags["b"])) == 64
    assert len(base64.b64decode(signing.dns_value(ED_KEY).split("p=")[1])) == 32


def test_ed25519_signature_checks_with_cryptography_too() -> None:
    """RFC 8463 §3 apart from dkimpy: Ed25519 over SHA-256(canonical headers)."""
    signed = signer(ed=True).sign(ODD_MESSAGES["whitespace runs"])
    assert verify_ed25519(signed, 1)
    assert not verify_ed25519(signed.replace(b"Subject: Hello", b"Subject: Hullo"), 1)
    assert not verify_ed25519(signed.replace(b"inner", b"outer"), 1)


@pytest.mark.parametrize("change", [
    "body", "body whitespace inside a word", "subject", "added from", "added list-unsubscribe",
    "signature domain"])
def test_tampering_fails_verification(change: str) -> None:
    signed = signer(ed=True).sign(invite())
    head, _, body = signed.partition(b"\r\n\r\n")
    if change == "body":
        tampered = head + b"\r\n\r\n" + body.replace(b"Content-Type: text/plain",
                                                     b"Content-Type: text/html", 1)
    elif change == "body whitespace inside a word":
        tampered = head + b"\r\n\r\n" + body.replace(b"multipart", b"multi part", 1)
    elif change == "subject":
        tampered = signed.replace(b"Subject: ", b"Subject: Free tickets! ", 1)
    elif change == "added from":
        tampered = b"From: attacker@evil.example\r\n" + signed
    elif change == "added list-unsubscribe":
        tampered = b"List-Unsubscribe: <https://evil.example/u>\r\n" + signed
    else:
        tampered = signed.replace(f"d={DOMAIN}".encode(), b"d=evil.example")
    assert tampered != signed
    assert verify_all(tampered) == [False, False]


def test_changes_that_relaxed_canonicalization_allows_still_verify() -> None:
    """What relaxed/relaxed is for: refolding and whitespace changes in transit."""
    signed = signer().sign(ODD_MESSAGES["whitespace runs"])
    changed = signed.replace(b"Subject: Hello", b"subject:\r\n   Hello   ")
    changed = changed.replace(b"inner \t\t runs", b"inner runs") + b"\r\n\r\n"
    added = b"Received: from somewhere by mx.example.org\r\n" + changed
    assert dkim.verify(added, dnsfunc=DNS)


def test_folding_of_the_signature_for_any_selector_and_domain_length() -> None:
    """Every way the tags can fall over lines (b= on its own line too) verifies."""
    for n in range(1, 60):
        selector, domain = "s" * n, f"{'d' * (n % 23 + 1)}.example.com"
        s = signing.DkimSigner(domain, selector, RSA_KEY, headers=["From", "To"][: 1 + n % 2],
                               oversign=[])
        signed = s.sign(ODD_MESSAGES["empty body"])
        dns = dns_for({f"{selector}._domainkey.{domain}": signing.dns_value(RSA_KEY)})
        assert dkim.verify(signed, dnsfunc=dns), n
        (sig_field,) = [b"%s:%s" % f for f in signing.split_message(signed)[0]
                        if f[0] == b"DKIM-Signature"]
        assert max(len(line) for line in sig_field.split(b"\r\n")) <= 78, n


def test_signing_with_a_wrong_published_key_fails() -> None:
    other = dns_for({f"{SELECTOR}._domainkey.{DOMAIN}":
                     signing.dns_value(signing.generate_rsa(1024))})
    assert not dkim.verify(signer().sign(invite()), dnsfunc=other)


def test_signature_is_fast_enough() -> None:
    """The point of not using dkimpy: a signature in well under a millisecond or two."""
    s, raw = signer(), invite()
    s.sign(raw)
    start = time.perf_counter()
    for _ in range(50):
        s.sign(raw)
    per_message = (time.perf_counter() - start) / 50
    assert per_message < 0.004, f"{per_message * 1000:.2f} ms per message"


# --------------------------------------------------------------------------------------------
# Configuration


def write_keys(tmp_path: Path) -> tuple[Path, Path]:
    rsa_path, ed_path = tmp_path / "dkim.pem", tmp_path / "dkim-ed.pem"
    rsa_path.write_bytes(signing.private_pem(RSA_KEY))
    ed_path.write_bytes(signing.private_pem(ED_KEY))
    return rsa_path, ed_path


def test_dkim_is_off_by_default(tmp_path: Path) -> None:
    cfg = config_mod.load(None, {"XDG_STATE_HOME": str(tmp_path)})
    assert cfg.dkim.selector == "" and cfg.dkim_signer is None
    assert Services.open(cfg).signer is None


def test_config_loads_the_keys_once(tmp_path: Path) -> None:
    rsa_path, ed_path = write_keys(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(f'[server]\ndomain = "{DOMAIN}"\n[dkim]\nselector = "{SELECTOR}"\n'
                    f'key_file = "{rsa_path}"\n')
    cfg = config_mod.load(path, {"CISERVER_DKIM__ED25519_SELECTOR": ED_SELECTOR,
                                 "CISERVER_DKIM__ED25519_KEY_FILE": str(ed_path),
                                 "CISERVER_SERVER__STATE_DIR": str(tmp_path)})
    s = cfg.dkim_signer
    assert isinstance(s, signing.DkimSigner)
    assert (s.domain, s.selector, s.ed25519_selector) == (DOMAIN, SELECTOR, ED_SELECTOR)
    assert Services.open(cfg).signer is s
    rsa_path.unlink()  # loaded at start: the file is not read again
    assert verify_all(s.sign(invite())) == [True, True]


def test_config_domain_and_headers(tmp_path: Path) -> None:
    rsa_path, _ = write_keys(tmp_path)
    cfg = config_mod.load(None, {
        "XDG_STATE_HOME": str(tmp_path), "CISERVER_SERVER__DOMAIN": f"mail.{DOMAIN}",
        "CISERVER_DKIM__SELECTOR": SELECTOR, "CISERVER_DKIM__KEY_FILE": str(rsa_path),
        "CISERVER_DKIM__DOMAIN": DOMAIN, "CISERVER_DKIM__HEADERS": "From,Subject,Date",
        "CISERVER_DKIM__OVERSIGN": "From"})
    signed = cfg.dkim_signer.sign(ODD_MESSAGES["empty body"])
    assert sig_tags(signed)["d"] == DOMAIN
    assert sig_tags(signed)["h"] == "from:from:subject:date"
    assert dkim.verify(signed, dnsfunc=DNS)


@pytest.mark.parametrize(("text", "expected"), [
    ('selector = "s1"\n', "[dkim] key_file: expected the PEM file of the RSA private key"),
    ('key_file = "KEY"\n', "[dkim] selector: expected the selector"),
    ('selector = "s 1"\nkey_file = "KEY"\n', "[dkim] selector: expected a DNS label"),
    ('selector = "s1"\nkey_file = "MISSING"\n',
     "[dkim] key_file: cannot read DIR/MISSING: No such file or directory"),
    ('selector = "s1"\nkey_file = "GARBAGE"\n', "[dkim] key_file: DIR/GARBAGE is not a PEM"),
    ('selector = "s1"\nkey_file = "EC"\n',
     "[dkim] key_file: DIR/EC holds an EC key; expected an RSA key"),
    ('selector = "s1"\nkey_file = "SHORT"\n',
     "[dkim] key_file: DIR/SHORT holds an RSA key of 512 bits; expected at least 1024"),
    ('selector = "s1"\nkey_file = "ED"\n',
     "[dkim] key_file: DIR/ED holds an ed25519 key; expected an RSA key"),
    ('selector = "s1"\nkey_file = "KEY"\ned25519_selector = "s2"\n',
     "[dkim] ed25519_selector: expected both ed25519_selector and ed25519_key_file"),
    ('selector = "s1"\nkey_file = "KEY"\ned25519_selector = "s1"\ned25519_key_file = "ED"\n',
     "[dkim] ed25519_selector: expected another selector"),
    ('selector = "s1"\nkey_file = "KEY"\ned25519_selector = "s2"\ned25519_key_file = "KEY"\n',
     "[dkim] ed25519_key_file: DIR/KEY holds an RSA key; expected an ed25519 key"),
    ('selector = "s1"\nkey_file = "KEY"\nheaders = ["Subject"]\noversign = []\n',
     '[dkim] headers: expected a list that includes "From"'),
    ('selector = "s1"\nkey_file = "KEY"\noversign = ["X-Nope"]\n',
     "[dkim] oversign[0]: 'X-Nope' is not in headers"),
    ('selector = "s1"\nkey_file = "KEY"\nheaders = ["From", "Bad Name"]\n',
     "[dkim] headers[1]: expected a header field name"),
    ('domain = "a@b"\n', "[dkim] domain: expected a domain name"),
    ('selektor = "s1"\n', "[dkim] selektor: unknown key"),
])
def test_config_errors_name_file_key_and_problem(tmp_path: Path, text: str,
                                                 expected: str) -> None:
    files = {
        "KEY": signing.private_pem(RSA_KEY),
        "ED": signing.private_pem(ED_KEY),
        "GARBAGE": b"not a key\n",
        "EC": ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()),
        "SHORT": RSA_512_PEM,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    for name in [*files, "MISSING"]:
        text = text.replace(f'"{name}"', f'"{tmp_path / name}"')
    expected = expected.replace("DIR/", f"{tmp_path}/")
    path = tmp_path / "bad.toml"
    path.write_text("[dkim]\n" + text)
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.load(path, {"XDG_STATE_HOME": str(tmp_path)})
    message = str(info.value)
    assert message.startswith(f"{path}: [dkim] ")
    assert expected in message


def test_ed25519_key_as_a_base64_seed(tmp_path: Path) -> None:
    """The format dkimpy's dknewkey writes."""
    seed = ED_KEY.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
    path = tmp_path / "ed.key"
    path.write_bytes(base64.b64encode(seed) + b"\n")
    loaded = signing.load_ed25519_key(path)
    assert signing.dns_value(loaded) == signing.dns_value(ED_KEY)
    path.write_bytes(b"c2hvcnQ=\n")
    with pytest.raises(signing.KeyFileError, match="neither a PEM private key nor"):
        signing.load_ed25519_key(path)


# --------------------------------------------------------------------------------------------
# ciserver dkim keygen


def run_cli(tmp_path: Path, *args: str, config_text: str = "") -> tuple[int, str]:
    cfg = tmp_path / "ciserver.toml"
    cfg.write_text(f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
                   + config_text)
    result = CliRunner().invoke(cli.main, ["-c", str(cfg), *args], env={})
    return result.exit_code, result.output


def record_value(output: str, selector: str) -> str:
    """The TXT value from the printed zone line, its strings joined as DNS does."""
    line = next(x for x in output.splitlines()
                if x.startswith(f"{selector}._domainkey.{DOMAIN}. IN TXT "))
    strings = re.findall(r'"([^"]*)"', line.split(" IN TXT ", 1)[1])
    assert all(len(s) <= 255 for s in strings)
    return "".join(strings)


def test_keygen_writes_a_private_key_and_prints_what_to_publish(tmp_path: Path) -> None:
    out = tmp_path / "keys" / "dkim.pem"
    out.parent.mkdir()
    code, output = run_cli(tmp_path, "dkim", "keygen", "--selector", "s2030", "--out",
                           str(out))
    assert code == 0, output
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    key = signing.load_rsa_key(out)
    assert key.key_size == 2048
    value = record_value(output, "s2030")
    assert value == signing.dns_value(key) and value.startswith("v=DKIM1; k=rsa; p=")
    line = next(x for x in output.splitlines() if " IN TXT " in x)
    assert line.count('"') == 4  # 2048 bits: two strings (the value is > 255 characters)
    assert value in output.splitlines()  # in one piece too, for web forms
    assert 'selector = "s2030"' in output
    assert f'key_file = "{out}"' in output

    # the printed lines are the configuration; the printed record verifies what it signs
    code, output2 = run_cli(tmp_path, "dkim", "keygen", "--selector", "s2030-ed", "--out",
                            str(tmp_path / "keys" / "ed.pem"), "--ed25519")
    assert code == 0, output2
    ed_value = record_value(output2, "s2030-ed")
    assert ed_value.startswith("v=DKIM1; k=ed25519; p=")
    assert 'ed25519_selector = "s2030-ed"' in output2
    lines = [x for x in (output + output2).splitlines() if re.match(r"^\w+ = \"", x)]
    conf = tmp_path / "signing.toml"
    conf.write_text(f'[server]\ndomain = "{DOMAIN}"\n[dkim]\n' + "\n".join(lines) + "\n")
    s = config_mod.load(conf, {"XDG_STATE_HOME": str(tmp_path)}).dkim_signer
    dns = dns_for({f"s2030._domainkey.{DOMAIN}": value,
                   f"s2030-ed._domainkey.{DOMAIN}": ed_value})
    assert verify_all(s.sign(invite()), dns) == [True, True]


def test_keygen_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "dkim.pem"
    out.write_text("precious\n")
    code, output = run_cli(tmp_path, "dkim", "keygen", "--out", str(out))
    assert code != 0 and "exists" in output and "--force" in output
    assert out.read_text() == "precious\n"
    code, output = run_cli(tmp_path, "dkim", "keygen", "--out", str(out), "--force",
                           "--bits", "1024")
    assert code == 0, output
    assert signing.load_rsa_key(out).key_size == 1024
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".dkim-")] == []


def test_keygen_defaults_and_a_config_that_names_the_key_to_be_made(tmp_path: Path) -> None:
    """The config may already name the key keygen is about to write: keygen still runs."""
    want = tmp_path / "state" / "dkim-s1.pem"
    code, output = run_cli(tmp_path, "dkim", "keygen", "--selector", "s1",
                           config_text=f'[dkim]\nselector = "s1"\nkey_file = "{want}"\n')
    assert code == 0, output
    assert want.exists() and stat.S_IMODE(want.stat().st_mode) == 0o600
    assert record_value(output, "s1")
    # and any other command reports the missing key clearly
    want.unlink()
    code, output = run_cli(tmp_path, "queue", "list",
                           config_text=f'[dkim]\nselector = "s1"\nkey_file = "{want}"\n')
    assert code != 0
    assert f"[dkim] key_file: cannot read {want}" in output
    # default selector: ciserver-YYYYMM
    code, output = run_cli(tmp_path, "dkim", "keygen", "--ed25519")
    assert code == 0, output
    assert re.search(r"^ciserver-\d{6}-ed25519\._domainkey\.", output, re.M)


def test_keygen_rejects_a_bad_selector(tmp_path: Path) -> None:
    code, output = run_cli(tmp_path, "dkim", "keygen", "--selector", "bad selector")
    assert code != 0 and "not a DNS label" in output


def test_txt_strings_split_at_255() -> None:
    value = signing.dns_value(signing.generate_rsa(4096))
    parts = signing.txt_strings(value)
    assert "".join(parts) == value and len(parts) == 3
    assert all(len(p) == 255 for p in parts[:-1])


# --------------------------------------------------------------------------------------------
# The outbox hands signed messages to the relay


@pytest.fixture
async def dkim_svc(tmp_path: Path, sink: Sink) -> AsyncIterator[Services]:
    rsa_path, ed_path = write_keys(tmp_path)
    cfg = make_config(tmp_path, f"sqlite+aiosqlite:///{tmp_path / 'ciserver.db'}", sink,
                      dkim={"selector": SELECTOR, "key_file": rsa_path,
                            "ed25519_selector": ED_SELECTOR, "ed25519_key_file": ed_path})
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    yield svc
    await svc.close()


async def claim_and_prepare(svc: Services) -> list[outbox.Delivery]:
    out = []
    for item_id in await outbox.claim(svc, 10):
        delivery = await outbox.prepare(svc, item_id)
        assert delivery is not None
        out.append(delivery)
    return out


async def test_outbox_prepares_signed_invites_and_notices(dkim_svc: Services) -> None:
    svc = dkim_svc
    start = datetime(2030, 6, 1, 23, 0, tzinfo=UTC)
    async with svc.sessions.begin() as session:
        event = await events.create_via_api(
            svc, session, organizer=ORGANIZER, organizer_name="Zoë Lowe", summary="Knicks",
            start=start, end=start + timedelta(hours=3), location="MSG")
        assert (await subscriptions.invite(svc, session, event, "Fan@Example.com",
                                           source="api")).queued
        await notify.send(svc, session, to=ORGANIZER, subject="Event ready",
                          text="Your event is live.\n")
    deliveries = await claim_and_prepare(svc)
    assert {d.sequence is None for d in deliveries} == {True, False}
    for d in deliveries:
        assert verify_all(d.raw) == [True, True]
        assert sig_tags(d.raw)["t"] == str(int(svc.now().timestamp()))
    # the stored notice stays unsigned: each attempt is signed afresh
    async with svc.sessions() as session:
        items = (await session.execute(
            OutboxItem.__table__.select().where(OutboxItem.kind == "message"))).all()
    assert b"DKIM-Signature" not in items[0].raw


async def test_outbox_leaves_mail_unsigned_without_dkim(sqlite_svc: Services) -> None:
    svc = sqlite_svc
    assert svc.signer is None
    async with svc.sessions.begin() as session:
        await notify.send(svc, session, to=ORGANIZER, subject="Hi", text="x\n")
    (d,) = await claim_and_prepare(svc)
    assert b"DKIM-Signature" not in d.raw


def test_outbox_sign_uses_the_service_clock(offline_svc: Services) -> None:
    offline_svc.signer = signer()
    offline_svc.clock = lambda: NOW - timedelta(hours=1)
    signed = outbox.sign(offline_svc, invite())
    assert sig_tags(signed)["t"] == str(int((NOW - timedelta(hours=1)).timestamp()))
    assert dkim.verify(signed, dnsfunc=DNS)


def test_keys_written_by_keygen_are_unreadable_by_others(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        code, output = run_cli(tmp_path, "dkim", "keygen", "--out", str(tmp_path / "k.pem"))
    finally:
        os.umask(old)
    assert code == 0, output
    assert stat.S_IMODE((tmp_path / "k.pem").stat().st_mode) == 0o600


def test_signer_refuses_a_header_list_without_from() -> None:
    assert isinstance(ED_KEY, ed25519.Ed25519PrivateKey)
    with pytest.raises(ValueError, match="From"):
        signing.DkimSigner(DOMAIN, SELECTOR, RSA_KEY, headers=["Subject"])


async def test_relay_puts_exactly_the_signed_bytes_on_the_wire(dkim_svc: Services,
                                                               sink: Sink) -> None:
    """Through the relay into a real SMTP server: what arrives verifies."""
    from ciserver import relay

    svc = dkim_svc
    start = datetime(2030, 6, 1, 23, 0, tzinfo=UTC)
    async with svc.sessions.begin() as session:
        event = await events.create_via_api(
            svc, session, organizer=ORGANIZER, organizer_name="Zoë Lowe", summary="Knicks",
            start=start, end=start + timedelta(hours=3), location="MSG")
        for addr in ("fan.one@example.com", "fan.two@example.org"):
            assert (await subscriptions.invite(svc, session, event, addr,
                                               source="api")).queued
        await notify.send(svc, session, to=ORGANIZER, subject="Event ready",
                          text="Your event is live.\n")
    await relay.Relay(svc).drain()
    got = sink.wait(3)
    assert len(got) == 3
    for captured in got:
        assert verify_all(captured.raw) == [True, True], captured.rcpt_tos
