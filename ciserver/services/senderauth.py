"""Who sent a create@ message, as far as authentication proves it.

* ``dkim``: a DKIM signature that verifies (dkimpy) and whose d= domain aligns with the From
  domain (DMARC relaxed alignment: equal, or one a subdomain of the other — the organizational
  domain approximated without the Public Suffix List). The From address is then the identity.
* ``authentication-results``: an upstream MTA whose authserv-id is configured already checked
  the message (RFC 8601). Only results near the top of the header (added by the last hop,
  before the second Received header) are read, so a copy forged by the sender further down is
  ignored; ``dmarc=pass`` or an aligned ``dkim=pass`` makes the From address the identity.
* ``none``: the From header is believed (the operator's explicit choice).

DNS lookups use an injectable resolver (tests have no network); dkimpy verifies in a thread
because it is synchronous.
"""

from __future__ import annotations

import asyncio
import email
import logging
import re
from collections.abc import Callable
from typing import Any

import dkim

from ..addresses import domain_of, normalize_email
from ..itip.mime import header_text
from .context import Services

log = logging.getLogger("ciserver.senderauth")

DnsFunc = Callable[..., bytes | None]


def aligned(signing_domain: str, from_domain: str) -> bool:
    d, f = signing_domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    return bool(d and f) and (d == f or f.endswith("." + d) or d.endswith("." + f))


def _txt_via(resolver: Any, loop: asyncio.AbstractEventLoop | None = None) -> DnsFunc:
    """A dkimpy dnsfunc (called in a worker thread) backed by a dnspython-style resolver:
    an async one (``await resolve``, run on ``loop``) or a plain one."""

    def lookup(name: bytes | str, timeout: int = 5) -> bytes | None:
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = resolver.resolve(qname.rstrip("."), "TXT")
            if asyncio.iscoroutine(answer):
                if loop is None:
                    answer.close()
                    return None
                answer = asyncio.run_coroutine_threadsafe(answer, loop).result(timeout)
        except Exception:
            return None
        for rr in answer:
            strings = getattr(rr, "strings", None)
            if strings is not None:
                return b"".join(strings)
            return str(rr).strip('"').encode()
        return None

    return lookup


def dkim_identity(raw: bytes, from_addr: str, dnsfunc: DnsFunc) -> str:
    """The From address if a valid DKIM signature aligns with its domain, else ""."""
    from_domain = domain_of(from_addr)
    count = len(email.message_from_bytes(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
                .get_all("DKIM-Signature") or [])
    for idx in range(count):
        verifier = dkim.DKIM(raw)
        try:
            ok = verifier.verify(idx=idx, dnsfunc=dnsfunc)
        except Exception as exc:  # dkimpy raises on malformed signatures
            log.info("DKIM signature %d unusable: %s", idx, exc)
            continue
        domain = (verifier.domain or b"").decode("ascii", "replace")
        if ok and aligned(domain, from_domain):
            return normalize_email(from_addr)
        log.info("DKIM signature %d: %s, d=%s, From domain %s", idx,
                 "valid" if ok else "invalid", domain, from_domain)
    return ""


_RESULT_RE = re.compile(r"\b(dkim|dmarc)\s*=\s*(\w+)([^;]*)", re.IGNORECASE)
_PROP_RE = re.compile(r"header\.(d|i|from)\s*=\s*\"?([^\s;\"]+)", re.IGNORECASE)


def _trusted_results(raw: bytes, authserv_ids: list[str]) -> list[str]:
    head = raw.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0] + b"\r\n\r\n"
    msg = email.message_from_bytes(head)
    out, received = [], 0
    trusted = {a.lower() for a in authserv_ids}
    for name, value in msg.items():
        lname = name.lower()
        if lname == "received":
            received += 1
            if received >= 2:
                break  # older hops: anything below was written before our MTA saw it
        elif lname == "authentication-results":
            text = " ".join(str(value).split())
            authserv = text.split(";", 1)[0].strip().split()[0].lower() if text else ""
            if authserv in trusted:
                out.append(text)
    return out


def results_identity(raw: bytes, from_addr: str, authserv_ids: list[str]) -> str:
    from_domain = domain_of(from_addr)
    for text in _trusted_results(raw, authserv_ids):
        for method, result, props in _RESULT_RE.findall(text):
            if result.lower() != "pass":
                continue
            values = {k.lower(): v.lower() for k, v in _PROP_RE.findall(props)}
            if method.lower() == "dmarc":
                if values.get("from", from_domain) == from_domain:
                    return normalize_email(from_addr)
            elif aligned(values.get("d", "") or domain_of(values.get("i", "")), from_domain):
                return normalize_email(from_addr)
    return ""


async def identity(svc: Services, raw: bytes, from_addr: str) -> str:
    """The sender address authentication vouches for ("" if none), per [organizers]."""
    mode = svc.config.organizers.sender_auth
    if not from_addr:
        return ""
    if mode == "none":
        return normalize_email(from_addr)
    if mode == "authentication-results":
        return results_identity(raw, from_addr, svc.config.organizers.authserv_id)
    resolver = svc.resolver
    if resolver is None:
        import dns.asyncresolver

        resolver = dns.asyncresolver.Resolver()
    dnsfunc = _txt_via(resolver, asyncio.get_running_loop())
    return await asyncio.to_thread(dkim_identity, raw, from_addr, dnsfunc)


def from_address(raw: bytes) -> str:
    msg = email.message_from_bytes(raw.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
    return normalize_email(email.utils.parseaddr(header_text(msg, "From"))[1])
