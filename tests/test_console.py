"""The organizer console as an organizer meets it (httpx against the ASGI app): sign-in by a
magic link read from the mail the smarthost receives, sessions and CSRF, live answer counts,
each event's report (figures, charts, per occurrence, origin, the CSV), the page configurator
with its preview, escaping and security headers."""

from __future__ import annotations

import asyncio
import base64
import csv
import html
import io
import json
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from ciserver import relay
from ciserver.itip import content as content_mod
from ciserver.services import events, pages, subscriptions
from ciserver.services.auth import PURGE_GRACE, ConsoleAuth, LinkClaims
from ciserver.services.context import Services
from ciserver.store import models
from ciserver.web import console
from ciserver.web.app import create_app

from .conftest import DOMAIN, ORGANIZER, Sink, open_pipeline
from .fixtures import load_fixture

BASE = "https://invites.example.com"
START = datetime(2027, 5, 1, 18, 0, tzinfo=UTC)
XSS = '<script>alert(1)</script><img src=x onerror="alert(2)">'
XSS_TITLE = '"><svg onload=alert(3)>'
SVG_NS = "{http://www.w3.org/2000/svg}"


def client_for(app: FastAPI) -> httpx.AsyncClient:
    """One browser (its own cookies) talking to ``app`` (one server process)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)


@pytest.fixture
def app(svc: Services) -> FastAPI:
    return create_app(svc)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as c:
        yield c


@pytest.fixture
async def instances(svc: Services) -> AsyncIterator[Callable[[], FastAPI]]:
    """More `ciserver serve` instances on svc's database: each call makes a new app over new
    Services (their own engine and memory), as another process, or a restart, would have."""
    opened: list[Services] = []

    def instance() -> FastAPI:
        other = Services.open(svc.config)
        other.clock = lambda: svc.now()
        opened.append(other)
        return create_app(other)

    try:
        yield instance
    finally:
        for other in opened:
            await other.close()


@pytest.fixture(params=["public", "fallback"])
def renderer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Previews drawn by the public pages' renderer, or by the console's own (used when
    ciserver.web.public is not installed)."""
    if request.param == "fallback":
        monkeypatch.setattr(console, "_public", lambda: None)
    return str(request.param)


def csrf_of(page: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', page)
    assert m, page
    return m.group(1)


async def make_event(svc: Services, organizer: str = ORGANIZER, summary: str = "Game 1",
                     start: datetime = START) -> str:
    async with svc.sessions.begin() as session:
        event = await events.create_via_api(svc, session, organizer=organizer,
                                            organizer_name="Org", summary=summary,
                                            start=start, end=start + timedelta(hours=2))
        return event.public_id


async def make_series(svc: Services, summary: str = "Weekly practice", weeks: int = 4,
                      organizer: str = ORGANIZER) -> str:
    """A weekly recurring event (UTC), created as from the API."""
    content = content_mod.new_content(summary=summary, start=START,
                                      end=START + timedelta(hours=2))
    nl = "\r\n" if "\r\n" in content else "\n"
    content = content.replace("END:VEVENT", f"RRULE:FREQ=WEEKLY;COUNT={weeks}{nl}END:VEVENT")
    async with svc.sessions.begin() as session:
        event = await events.create(svc, session, organizer=organizer, organizer_name="Org",
                                    organizer_uid=f"series-{summary}@team.example",
                                    content=content, origin="api")
        assert event.recurring
        return event.public_id


async def seed(svc: Services, public_id: str, email: str, *, partstat: str = "",
               source: str = "page", origin: str = "", status: str = "active",
               at: datetime | None = None, occurrence: str = "") -> None:
    """A customer of the event and their answer, recorded as services.attendee does (an
    applied answer, with its history), then their status."""
    at = at or svc.now()
    async with svc.sessions.begin() as session:
        event = await events.find(session, public_id)
        sub = (await session.execute(select(models.Subscription).where(
            models.Subscription.event_id == event.id,
            models.Subscription.email == email))).scalar_one_or_none()
        if sub is None:
            sub = (await subscriptions.invite(svc, session, event, email, "", source,
                                              origin=origin, send=False)).subscription
        if partstat:
            session.add(models.RsvpHistory(subscription_id=sub.id, occurrence=occurrence,
                                           partstat=partstat, sequence=0, stamp=at,
                                           comment="", outcome="applied", received_at=at))
            session.add(models.Answer(subscription_id=sub.id, occurrence=occurrence,
                                      partstat=partstat, sequence=0, stamp=at, comment="",
                                      received_at=at))
            if not occurrence:
                sub.partstat, sub.responded_at = partstat, at
        if status != "active":
            await subscriptions.stop(svc, session, sub, status)


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"))))


def svgs_of(page: str) -> list[ET.Element]:
    """The inline SVG charts of a page, parsed as XML: no script, handler or foreign object."""
    found = []
    for text in re.findall(r"<svg\b.*?</svg>", page, re.S):
        root = ET.fromstring(text)
        assert root.tag == f"{SVG_NS}svg" and root.get("role") == "img"
        assert root.get("aria-label") and root.find(f"{SVG_NS}title") is not None
        for el in root.iter():
            assert not el.tag.endswith(("script", "foreignObject")), el.tag
            assert not any(a.lower().startswith("on") for a in el.attrib), el.attrib
            assert not any("href" in a for a in el.attrib), el.attrib
        found.append(root)
    return found


def figures_of(page: str) -> dict[str, int]:
    """The figures table of an event's report."""
    return {k: int(v) for k, v in re.findall(
        r'<td class="num[^"]*" data-count="(\w+)">(\d+)</td>', page)}


async def ask_link(svc: Services, client: httpx.AsyncClient, sink: Sink,
                   email: str = ORGANIZER) -> str:
    """Ask for a sign-in link on the form; return the link from the mail."""
    r = await client.get("/console/login")
    assert r.status_code == 200
    r = await client.post("/console/login", data={"email": email, "csrf": csrf_of(r.text)})
    assert r.status_code == 200, r.text
    sink.clear()
    await relay.Relay(svc).drain()
    mails = sink.to(email)
    assert len(mails) == 1, [m.rcpt_tos for m in sink.messages]
    m = re.search(re.escape(BASE) + r"/console/auth\?token=(\S+)", mails[0].text())
    assert m, mails[0].text()
    return m.group(0)


async def link_form(client: httpx.AsyncClient, link: str) -> dict[str, str]:
    """Open a sign-in link: the form its button posts (this browser's CSRF token)."""
    r = await client.get(link)
    assert r.status_code == 200 and 'action="/console/auth"' in r.text, r.text
    token = re.search(r'name="token" value="([^"]+)"', r.text)
    assert token
    return {"csrf": csrf_of(r.text), "token": html.unescape(token.group(1))}


def set_session(client: httpx.AsyncClient, value: str) -> None:
    client.cookies.set("ci_session", value, domain="invites.example.com", path="/console")


async def sign_in(svc: Services, client: httpx.AsyncClient, sink: Sink,
                  email: str = ORGANIZER) -> None:
    link = await ask_link(svc, client, sink, email)
    r = await client.get(link)
    assert r.status_code == 200 and "Sign in" in r.text
    token = re.search(r'name="token" value="([^"]+)"', r.text)
    assert token
    r = await client.post("/console/auth", data={"csrf": csrf_of(r.text),
                                                 "token": html.unescape(token.group(1))})
    assert r.status_code == 303 and r.headers["location"] == "/console", r.text


# --------------------------------------------------------------------------------------------
# Sign-in


async def test_sign_in_by_magic_link(app: FastAPI, svc: Services, client: httpx.AsyncClient,
                                     sink: Sink) -> None:
    r = await client.get("/console")
    assert r.status_code == 303 and r.headers["location"] == "/console/login"
    link = await ask_link(svc, client, sink)
    mail = sink.to(ORGANIZER)[0]
    assert mail.message["Subject"].startswith("Your sign-in link")
    assert "15 minutes" in mail.text() and "works once" in mail.text()

    # Opening the link (what a mail scanner does) signs nobody in and uses nothing up.
    async with client_for(app) as scanner:
        for _ in range(2):
            r = await scanner.get(link)
            assert r.status_code == 200 and ORGANIZER in r.text
            assert 'action="/console/auth"' in r.text
        assert (await scanner.get("/console")).status_code == 303
        assert "ci_session" not in scanner.cookies

    r = await client.get(link)
    token = html.unescape(re.search(r'name="token" value="([^"]+)"', r.text).group(1))  # type: ignore[union-attr]
    # Where to go afterwards is fixed: no parameter can turn it into an open redirect.
    r = await client.post("/console/auth?next=https://evil.example/",
                          data={"csrf": csrf_of(r.text), "token": token,
                                "next": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/console"
    cookie = next(v for k, v in r.headers.multi_items()
                  if k == "set-cookie" and v.startswith("ci_session="))
    flags = [p.strip().lower() for p in cookie.split(";")]
    assert "httponly" in flags and "secure" in flags and "samesite=lax" in flags
    assert "path=/console" in flags and "max-age=43200" in flags

    r = await client.get("/console")
    assert r.status_code == 200 and ORGANIZER in r.text and "Your events" in r.text
    session_value = client.cookies["ci_session"]

    # Signing out is a POST with the session's CSRF token.
    r = await client.post("/console/logout")
    assert r.status_code == 403
    r = await client.post("/console/logout", data={"csrf": csrf_of((await client.get(
        "/console")).text)})
    assert r.status_code == 303 and r.headers["location"] == "/console/login?signed_out=1"
    assert (await client.get("/console")).status_code == 303
    # The old cookie, replayed, is refused too.
    async with client_for(app) as thief:
        thief.cookies.set("ci_session", session_value, domain="invites.example.com",
                          path="/console")
        assert (await thief.get("/console")).status_code == 303


async def test_link_expiry_reuse_and_tampering(app: FastAPI, svc: Services,
                                               client: httpx.AsyncClient, sink: Sink) -> None:
    link = await ask_link(svc, client, sink)
    token = link.split("token=", 1)[1]

    async def confirm(c: httpx.AsyncClient, tok: str) -> httpx.Response:
        page = await c.get("/console/login")
        return await c.post("/console/auth", data={"csrf": csrf_of(page.text), "token": tok})

    # expired: 16 minutes later
    real_clock = svc.clock
    svc.clock = lambda: real_clock() + timedelta(minutes=16)
    r = await client.get(link)
    assert r.status_code == 400 and "expired" in r.text
    r = await confirm(client, token)
    assert r.status_code == 400 and "ci_session" not in client.cookies
    svc.clock = real_clock

    # tampered: another address in the payload, a flipped tag, another server's secret
    version, payload, tag = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["e"] = "mallory@nba.example"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    other = ConsoleAuth(b"another-secret", 3600).link_token(ORGANIZER, svc.now())
    session_value, _ = ConsoleAuth(svc.book.secret, 3600).new_session(ORGANIZER, svc.now())
    for bad in (f"{version}.{forged}.{tag}", f"{version}.{payload}.{tag[:-2]}AA", other,
                session_value, "", "x" * 5000):
        r = await client.get("/console/auth", params={"token": bad})
        assert r.status_code == 400, bad
        r = await confirm(client, bad)
        assert r.status_code == 400 and "ci_session" not in client.cookies

    # used once: the second use fails, in this browser or any other
    assert (await confirm(client, token)).status_code == 303
    async with client_for(app) as other_browser:
        r = await other_browser.get(link)
        assert r.status_code == 400 and "already used" in r.text
        r = await confirm(other_browser, token)
        assert r.status_code == 400 and "ci_session" not in other_browser.cookies

    # A session cookie is not a link token and vice versa; a forged cookie is ignored.
    async with client_for(app) as forger:
        forger.cookies.set("ci_session", token, domain="invites.example.com", path="/console")
        assert (await forger.get("/console")).status_code == 303
        forger.cookies.set("ci_session", session_value[:-3] + "abc",
                           domain="invites.example.com", path="/console")
        assert (await forger.get("/console")).status_code == 303


async def test_a_link_works_once_on_every_instance(
        svc: Services, client: httpx.AsyncClient, sink: Sink,
        instances: Callable[[], FastAPI]) -> None:
    """Used links are kept in the database: another instance on it, or one started later,
    refuses a link used here."""
    link = await ask_link(svc, client, sink)
    async with client_for(instances()) as on_b:
        form_b = await link_form(on_b, link)  # instance B shows the button: not used yet
        r = await client.post("/console/auth", data=await link_form(client, link))
        assert r.status_code == 303 and "ci_session" in client.cookies  # used on A
        r = await on_b.post("/console/auth", data=form_b)
        assert r.status_code == 400 and "already used" in r.text
        assert "ci_session" not in on_b.cookies
        r = await on_b.get(link)
        assert r.status_code == 400 and "already used" in r.text
    async with client_for(instances()) as on_c:  # after a restart
        r = await on_c.get(link)
        assert r.status_code == 400 and "already used" in r.text
        page = await on_c.get("/console/login")
        r = await on_c.post("/console/auth", data={"csrf": csrf_of(page.text),
                                                   "token": form_b["token"]})
        assert r.status_code == 400 and "ci_session" not in on_c.cookies
    async with svc.sessions() as session:
        rows = (await session.execute(select(models.ConsoleToken))).scalars().all()
    assert [row.kind for row in rows] == ["link"]


async def test_signing_out_is_global_and_survives_a_restart(
        svc: Services, client: httpx.AsyncClient, sink: Sink,
        instances: Callable[[], FastAPI]) -> None:
    await sign_in(svc, client, sink)
    value = client.cookies["ci_session"]
    async with client_for(instances()) as on_b:
        set_session(on_b, value)
        # B accepts the cookie before the sign-out (and must not keep that answer)
        assert (await on_b.get("/console")).status_code == 200
        r = await client.post("/console/logout", data={"csrf": csrf_of((await client.get(
            "/console")).text)})
        assert r.status_code == 303
        assert (await on_b.get("/console")).status_code == 303
        assert (await on_b.get("/console")).status_code == 303  # (now from its cache)
    async with client_for(instances()) as on_c:  # a restarted instance
        set_session(on_c, value)
        assert (await on_c.get("/console")).status_code == 303
        assert (await on_c.get("/console/counts.json")).status_code == 401
    # Signing in again gives a new session, which works everywhere.
    await sign_in(svc, client, sink)
    async with client_for(instances()) as on_d:
        set_session(on_d, client.cookies["ci_session"])
        assert (await on_d.get("/console")).status_code == 200


async def test_one_link_posted_at_once_on_several_instances_signs_in_once(
        app: FastAPI, svc: Services, client: httpx.AsyncClient, sink: Sink,
        instances: Callable[[], FastAPI]) -> None:
    link = await ask_link(svc, client, sink)
    async with client_for(app) as same, client_for(instances()) as other:
        browsers = [client, same, other]
        forms = [await link_form(c, link) for c in browsers]
        results = await asyncio.gather(*(c.post("/console/auth", data=f)
                                         for c, f in zip(browsers, forms, strict=True)))
        assert sorted(r.status_code for r in results) == [303, 400, 400]
        assert all("already used" in r.text for r in results if r.status_code == 400)
        assert sum("ci_session" in c.cookies for c in browsers) == 1

    # The same race one level down: two instances' auth state, one nonce, one winner.
    auth_a, auth_b = ConsoleAuth(svc.book.secret, 3600), ConsoleAuth(svc.book.secret, 3600)
    claims = auth_a.read_link(auth_a.link_token(ORGANIZER, svc.now()), svc.now())
    assert claims is not None
    second = Services.open(svc.config)
    try:
        got = await asyncio.gather(auth_a.consume_link(svc.sessions, claims, svc.now()),
                                   auth_b.consume_link(second.sessions, claims, svc.now()))
        assert sorted(got) == [False, True]
        got = await asyncio.gather(auth_a.consume_link(svc.sessions, claims, svc.now()),
                                   auth_b.consume_link(second.sessions, claims, svc.now()))
        assert got == [False, False]
    finally:
        await second.close()


async def test_expired_tokens_are_purged(svc: Services) -> None:
    auth_state = ConsoleAuth(svc.book.secret, 3600)
    now = svc.now()

    async def store(*rows: tuple[str, timedelta]) -> None:
        async with svc.sessions.begin() as session:
            session.add_all(models.ConsoleToken(kind="link", ident=ident, expires_at=now + delta)
                            for ident, delta in rows)

    async def left() -> list[str]:
        async with svc.sessions() as session:
            q = select(models.ConsoleToken.ident).order_by(models.ConsoleToken.ident)
            return list((await session.execute(q)).scalars().all())

    long_ago = ("long-ago", -PURGE_GRACE - timedelta(minutes=1))
    await store(long_ago,
                ("just-now", -timedelta(minutes=1)),  # kept a while: instances' clocks differ
                ("live", timedelta(minutes=10)))
    # a sign-in purges
    assert await auth_state.consume_link(svc.sessions, LinkClaims(
        ORGANIZER, now + timedelta(minutes=15), "fresh"), now)
    assert await left() == ["fresh", "just-now", "live"]
    # ... now and then
    await store(long_ago)
    assert await auth_state.purge(svc.sessions, now) == 0
    assert await left() == ["fresh", "just-now", "live", "long-ago"]
    assert await auth_state.purge(svc.sessions, now, force=True) == 1
    assert await left() == ["fresh", "just-now", "live"]
    # a row kept past its expiry still refuses its link
    assert not await auth_state.consume_link(svc.sessions, LinkClaims(
        ORGANIZER, now - timedelta(minutes=1), "just-now"), now)


async def test_same_answer_for_everyone_but_mail_only_for_organizers(
        svc: Services, client: httpx.AsyncClient, sink: Sink) -> None:
    await make_event(svc, organizer="owner@elsewhere.example")  # owns events, not allowed

    async def ask(email: str) -> str:
        page = await client.get("/console/login")
        r = await client.post("/console/login", data={"email": email,
                                                      "csrf": csrf_of(page.text)})
        assert r.status_code == 200
        return r.text.replace(email, "EMAIL")

    sink.clear()
    answers = {e: await ask(e) for e in (ORGANIZER, "stranger@elsewhere.example",
                                         "coach@nba.example", "owner@elsewhere.example")}
    assert len(set(answers.values())) == 1
    assert "If EMAIL may sign in, a sign-in link is on its way" in answers[ORGANIZER]
    await relay.Relay(svc).drain()
    got = sorted(r.lower() for m in sink.messages for r in m.rcpt_tos)
    assert got == ["coach@nba.example", "owner@elsewhere.example", ORGANIZER]

    r = await client.post("/console/login", data={
        "email": "not an address", "csrf": csrf_of((await client.get("/console/login")).text)})
    assert r.status_code == 422 and "valid email address" in r.text

    # The link of an address that loses the right to organize stops working.
    link = await ask_link(svc, client, sink, "coach@nba.example")
    svc.config.organizers.allow = [ORGANIZER]
    try:
        page = await client.get(link)
        r = await client.post("/console/auth", data={
            "csrf": csrf_of(page.text), "token": link.split("token=", 1)[1]})
        assert r.status_code == 400 and "ci_session" not in client.cookies
    finally:
        svc.config.organizers.allow = [ORGANIZER, "*@nba.example"]


async def test_sign_in_requests_are_rate_limited(svc: Services,
                                                 client: httpx.AsyncClient) -> None:
    limit = svc.config.web.rate_limit_per_address
    csrf = csrf_of((await client.get("/console/login")).text)
    codes = []
    for _ in range(limit + 1):
        r = await client.post("/console/login", data={"email": "stranger@elsewhere.example",
                                                      "csrf": csrf})
        codes.append(r.status_code)
    assert codes == [200] * limit + [429]
    assert "Retry-After" in r.headers
    # another address is still served
    r = await client.post("/console/login", data={"email": ORGANIZER, "csrf": csrf})
    assert r.status_code == 200


async def test_csrf(app: FastAPI, svc: Services, client: httpx.AsyncClient, sink: Sink) -> None:
    # sign-in forms: their token is bound to a cookie this browser got with the form
    r = await client.get("/console/login")
    good = csrf_of(r.text)
    async with client_for(app) as attacker:
        r = await attacker.post("/console/login", data={"email": ORGANIZER, "csrf": good})
        assert r.status_code == 403
        r = await attacker.post("/console/login", data={"email": ORGANIZER})
        assert r.status_code == 403

    await sign_in(svc, client, sink)
    mine = await make_event(svc)
    token = csrf_of((await client.get("/console/pages/new")).text)
    form = {"title": "Season", "layout": "list", "events": mine}
    for data, headers in (
            (form, {}),  # no token: what a cross-site form sends
            ({**form, "csrf": "forged"}, {}),
            ({**form, "csrf": good}, {}),  # the pre-session token does not fit a session
            ({**form, "csrf": token}, {"Sec-Fetch-Site": "cross-site"})):
        r = await client.post("/console/pages/new", data=data, headers=headers)
        assert r.status_code == 403, (data, headers)
        assert "Form refused" in r.text
    for path in ("/console/pages/new", "/console/preview", "/console/logout"):
        assert (await client.post(path, data=form)).status_code == 403
    async with svc.sessions() as session:
        assert not await pages.of_organizer(session, ORGANIZER)
    # a second session of the same organizer has its own token
    async with client_for(app) as second:
        await sign_in(svc, second, sink)
        r = await second.post("/console/pages/new", data={**form, "csrf": token})
        assert r.status_code == 403
    r = await client.post("/console/pages/new", data={**form, "csrf": token})
    assert r.status_code == 303


# --------------------------------------------------------------------------------------------
# Events and live counts


async def test_counts_appear_and_change(app: FastAPI, svc: Services, sink: Sink) -> None:
    fan = "fan.one@example.com"  # the ATTENDEE of tests/data/outlook_reply_accept.eml
    async with open_pipeline(svc, sink) as p, client_for(app) as client:
        event_id = await make_event(svc, summary="Opener")
        other = await make_event(svc, organizer="coach@nba.example", summary="Not mine")
        await sign_in(svc, client, sink)
        tokens = await p.subscribe(event_id, fan, "fan.two@example.com", "gone@example.com")

        r = await client.get("/console/counts.json")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert r.headers["cache-control"] == "no-store"
        rows = r.json()["events"]
        assert [e["id"] for e in rows] == [event_id]  # never another organizer's events
        assert rows[0] == {"id": event_id, "status": "confirmed", "Y": 0, "N": 0, "M": 0,
                                "no_answer": 3, "bounced": 0, "unsubscribed": 0,
                                "invited": 3}
        page = (await client.get("/console")).text
        assert "Opener" in page and "Not mine" not in page and other not in page
        assert f"{BASE}/e/{event_id}" in page
        assert 'data-counts-url="/console/counts.json"' in page
        assert '<td class="num" data-count="no_answer">3</td>' in page

        event = await p.event(event_id)
        raw = load_fixture("outlook_reply_accept.eml", token=tokens[fan], uid=event.uid)
        row = await p.deliver(f"rsvp+{tokens[fan]}@{DOMAIN}", raw, fan)
        assert row.status == "done", row.result
        sub = await p.subscription(event_id, "gone@example.com")
        async with svc.sessions.begin() as session:
            sub = await session.get(models.Subscription, sub.id)
            assert sub is not None
            await subscriptions.stop(svc, session, sub, "bounced")

        counts = (await client.get("/console/counts.json")).json()["events"][0]
        assert (counts["Y"], counts["no_answer"], counts["bounced"]) == (1, 2, 1)
        page = (await client.get("/console")).text
        assert '<td class="num" data-count="Y">1</td>' in page
        assert '<td class="num" data-count="bounced">1</td>' in page

    async with client_for(app) as anonymous:
        r = await anonymous.get("/console/counts.json")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


# --------------------------------------------------------------------------------------------
# An event's report: figures, charts, per occurrence, origin, CSV


async def test_event_report(app: FastAPI, svc: Services, client: httpx.AsyncClient,
                            sink: Sink) -> None:
    real_clock = svc.clock
    t0 = datetime(2027, 4, 20, 12, 0, tzinfo=UTC)
    svc.clock = lambda: t0
    final = await make_event(svc, summary="Final")
    semi = await make_event(svc, summary="Semi", start=START - timedelta(days=3))
    theirs = await make_event(svc, organizer="coach@nba.example", summary="Their game")
    for email, kw in (
            ("yes1@example.com", {"partstat": "ACCEPTED", "origin": "spring-page"}),
            ("yes2@example.com", {"partstat": "ACCEPTED", "origin": "button https://club.example"}),
            ("no@example.com", {"partstat": "DECLINED", "source": "api",
                                "origin": "api key cis_abcd"}),
            ("maybe@example.com", {"partstat": "TENTATIVE", "source": "forwarded",
                                   "origin": "forwarded by yes1@example.com"}),
            ("quiet@example.com", {"origin": "spring-page"}),
            ("gone@example.com", {"origin": "event-page", "status": "bounced"}),
            ("stop@example.com", {"partstat": "DECLINED", "source": "api",
                                  "origin": "api key cis_abcd", "status": "unsubscribed"})):
        svc.clock = lambda: t0
        await seed(svc, final, email, at=t0 + timedelta(hours=5), **kw)  # type: ignore[arg-type]
        t0 += timedelta(hours=7)
    await seed(svc, semi, "yes1@example.com", partstat="ACCEPTED", at=t0)
    await seed(svc, theirs, "fan@example.com", partstat="ACCEPTED", at=t0)
    svc.clock = lambda: t0 + timedelta(days=1)

    # Signed out: to the sign-in form, and no CSV.
    for path in (f"/console/events/{final}", f"/console/events/{final}/report.csv",
                 "/console/report.csv"):
        r = await client.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/console/login", path
    await sign_in(svc, client, sink)

    # The home page: a link to each event's report and the Y / N / M per game chart.
    r = await client.get("/console")
    assert r.status_code == 200
    assert f'href="/console/events/{final}">Final</a>' in r.text
    assert f'href="/console/events/{semi}">Semi</a>' in r.text
    (games,) = svgs_of(r.text)
    assert games.get("aria-label") == "Yes / no / maybe per game"
    labels = [t.text for t in games.iter(f"{SVG_NS}text")]
    assert "2027-05-01 Final" in labels and "2027-04-28 Semi" in labels
    assert "Their game" not in r.text
    assert "Y 2 · N 2 · M 1 / 7" in labels and "Y 1 · N 0 · M 0 / 1" in labels

    # The event's report: the figures, as a table, and the charts.
    r = await client.get(f"/console/events/{final}")
    assert r.status_code == 200, r.text
    assert "<h1>Final" in r.text
    assert figures_of(r.text) == {"invited": 7, "Y": 2, "N": 2, "M": 1, "no_answer": 2,
                                  "bounced": 1, "unsubscribed": 1}
    assert "5 of 7 invited answered (71%)" in r.text
    assert f'<tr data-event-id="{final}">' in r.text  # refreshed by counts.json
    timeline, bars = svgs_of(r.text)
    assert timeline.get("aria-label") == "Answers over time: Final"
    desc = timeline.find(f"{SVG_NS}desc")
    assert desc is not None and "invited 7, yes 2, no 2, maybe 1" in (desc.text or "")
    assert bars.get("aria-label") == "Yes / no / maybe: Final"
    # ... the numbers behind the timeline: the last change has every answer
    steps = re.findall(r"<tr><th scope=\"row\"><time[^>]*>([^<]+)</time></th>\s*"
                       r'<td class="num">(\d+)</td><td class="num">(\d+)</td>'
                       r'<td class="num">(\d+)</td><td class="num">(\d+)</td>', r.text)
    assert steps and [int(x) for x in steps[-1][1:]] == [7, 2, 2, 1]
    assert [int(x[1]) for x in steps] == sorted(int(x[1]) for x in steps)
    # ... where customers came from
    sources = re.findall(r'<tr><th scope="row">([^<]+)</th><td>([^<]+)</td>'
                         r'<td class="num">(\d+)</td>', r.text)
    assert {(html.unescape(a), html.unescape(b)): int(n) for a, b, n in sources} == {
        ("Sign-up page", "page /p/spring-page"): 2,
        ("Sign-up page", "button on https://club.example"): 1,
        ("Sign-up page", "the event's own page"): 1,
        ("API", "api key cis_abcd"): 2,
        ("Forwarded invite", "forwarded by yes1@example.com"): 1}
    assert f'href="/console/events/{final}/report.csv"' in r.text
    assert "style=" not in r.text and "<script>" not in r.text
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "unsafe-inline" not in r.headers["content-security-policy"]

    # The CSV: the same as the API's, and it parses back.
    r = await client.get(f"/console/events/{final}/report.csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert r.headers["content-disposition"] == f'attachment; filename="{final}.csv"'
    assert r.headers["cache-control"] == "no-store"
    rows = parse_csv(r.text)
    assert {x["email"]: (x["rsvp"], x["status"]) for x in rows} == {
        "yes1@example.com": ("Y", "active"), "yes2@example.com": ("Y", "active"),
        "no@example.com": ("N", "active"), "maybe@example.com": ("M", "active"),
        "quiet@example.com": ("", "active"), "gone@example.com": ("", "bounced"),
        "stop@example.com": ("N", "unsubscribed")}
    assert {x["event_summary"] for x in rows} == {"Final"}
    for column in ("event_uid", "event_start", "name", "partstat", "responded_at",
                   "occurrence"):
        assert column in rows[0]
    r = await client.get(f"/console/events/{final}/report.csv", params={"bom": "1"})
    assert r.text.startswith("\ufeff") and len(parse_csv(r.text)) == 7
    r = await client.get("/console/report.csv")
    assert r.status_code == 200
    assert sorted({x["event_summary"] for x in parse_csv(r.text)}) == ["Final", "Semi"]

    # Another organizer's event, or none: not found, nothing of it shown.
    for ref in (theirs, theirs.upper(), "nosuchevent", "x" * 200, "%00"):
        for path in (f"/console/events/{ref}", f"/console/events/{ref}/report.csv"):
            r = await client.get(path)
            assert r.status_code == 404, path
            assert "Their game" not in r.text and "fan@example.com" not in r.text
    svc.clock = real_clock


async def test_event_report_per_occurrence(svc: Services, client: httpx.AsyncClient,
                                           sink: Sink) -> None:
    series = await make_series(svc, weeks=4)
    await seed(svc, series, "all@example.com", partstat="ACCEPTED")
    await seed(svc, series, "once@example.com", partstat="ACCEPTED")
    await seed(svc, series, "once@example.com", partstat="DECLINED",
               occurrence="2027-05-08T18:00:00Z")
    await seed(svc, series, "later@example.com")
    await sign_in(svc, client, sink)
    r = await client.get(f"/console/events/{series}")
    assert r.status_code == 200
    assert figures_of(r.text) == {"invited": 3, "Y": 2, "N": 0, "M": 0, "no_answer": 1,
                                  "bounced": 0, "unsubscribed": 0}
    per = re.findall(r'<tr><th scope="row">(\w{3} \d\d \w{3} 2027, 18:00)</th>'
                     r'<td class="num">(\d+)</td><td class="num">(\d+)</td>'
                     r'<td class="num">(\d+)</td><td class="num">(\d+)</td>'
                     r'<td class="num">(\d+)</td>', r.text)
    assert [(d, *map(int, n)) for d, *n in per] == [
        ("Sat 01 May 2027, 18:00", 3, 2, 0, 0, 1), ("Sat 08 May 2027, 18:00", 3, 1, 1, 0, 1),
        ("Sat 15 May 2027, 18:00", 3, 2, 0, 0, 1), ("Sat 22 May 2027, 18:00", 3, 2, 0, 0, 1)]
    _timeline, bars = svgs_of(r.text)
    assert bars.get("aria-label") == "Yes / no / maybe per occurrence: Weekly practice"
    labels = [t.text for t in bars.iter(f"{SVG_NS}text")]
    assert "Sat 08 May 2027, 18:00" in labels and "Y 1 · N 1 · M 0 / 3" in labels
    rows = parse_csv((await client.get(f"/console/events/{series}/report.csv")).text)
    assert [(x["email"], x["rsvp"], x["occurrence"]) for x in rows
            if x["email"] == "once@example.com"] == [
        ("once@example.com", "Y", ""), ("once@example.com", "N", "2027-05-08T18:00:00Z")]


async def test_script_in_a_summary_is_escaped_in_reports(svc: Services,
                                                         client: httpx.AsyncClient,
                                                         sink: Sink) -> None:
    eid = await make_event(svc, summary=XSS)
    other = await make_event(svc, summary=XSS_TITLE, start=START + timedelta(days=1))
    for n, ref in enumerate((eid, other)):
        await seed(svc, ref, f"fan{n}@example.com", partstat="ACCEPTED",
                   origin='<script>alert(4)</script>')
    await sign_in(svc, client, sink)
    bodies: dict[str, Any] = {
        "home": await client.get("/console"),
        "event": await client.get(f"/console/events/{eid}"),
        "other": await client.get(f"/console/events/{other}")}
    for name, r in bodies.items():
        assert r.status_code == 200, name
        body = r.text
        assert "<script>alert" not in body and "<script" not in body.replace(
            '<script src="/console/static/console.js" defer>', ""), name
        assert "<img src=x" not in body and "<svg onload" not in body, name
        assert 'onerror="alert' not in body, name
        charts = svgs_of(body)
        assert charts, name
        # the text reads back as the organizer wrote it, as text
        texts = " ".join(t for svg in charts for el in svg.iter()
                         for t in (el.text or "", el.get("aria-label") or ""))
        for text in {"home": (XSS, XSS_TITLE), "event": (XSS,), "other": (XSS_TITLE,)}[name]:
            assert text in texts, name
    event_html = bodies["event"].text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in event_html  # HTML and SVG text
    assert 'aria-label="Answers over time: &lt;script&gt;alert(1)&lt;/script&gt;' in event_html
    assert "&lt;script&gt;alert(4)&lt;/script&gt;" in event_html  # the origin
    other_html = bodies["other"].text
    assert 'aria-label="Answers over time: &quot;&gt;&lt;svg onload=alert(3)&gt;"' in other_html
    r = await client.get(f"/console/events/{eid}/report.csv")
    assert parse_csv(r.text)[0]["event_summary"] == XSS


# --------------------------------------------------------------------------------------------
# Pages


async def test_page_configurator(app: FastAPI, svc: Services, client: httpx.AsyncClient,
                                 sink: Sink) -> None:
    one = await make_event(svc, summary="Game 1")
    two = await make_event(svc, summary="Game 2", start=START + timedelta(days=7))
    theirs = await make_event(svc, organizer="coach@nba.example", summary="Theirs")
    await sign_in(svc, client, sink)
    r = await client.get("/console/pages/new")
    assert r.status_code == 200
    csrf = csrf_of(r.text)
    for name in ("title", "intro", "layout", "color_primary", "color_background", "color_text",
                 "logo_url", "background_url", "date_from", "date_to", "events"):
        assert f'name="{name}"' in r.text, name
    assert 'type="color"' in r.text and "Game 1" in r.text and "Theirs" not in r.text
    assert '<iframe id="preview"' in r.text

    good = {"csrf": csrf, "title": "Season 2027", "intro": "All home games",
            "layout": "grid", "color_primary": "#aa0000", "color_background": "#ffffff",
            "color_text": "#111111", "logo_url": "https://cdn.example.com/logo.png",
            "background_url": "", "date_from": "2027-04-01", "date_to": "2027-05-31",
            "slug": "season-2027", "events": [one, two]}
    for change, message in (
            ({"color_primary": "red"}, "color_primary: expected a color like #0b57d0"),
            ({"logo_url": "javascript:alert(1)"}, "logo_url: expected an https:// URL"),
            ({"background_url": 'https://x.example/a"b'}, "background_url: expected"),
            ({"layout": "carousel"}, "layout: expected one of single, list, grid"),
            ({"date_from": "2027-06-01"}, "date_to: must not be before date_from"),
            ({"date_to": "tomorrow"}, "date_to: expected a date like 2027-05-01"),
            ({"events": [one, theirs]}, "is not one of your events"),
            ({"slug": "Not A Slug!"}, "slug: lower-case letters"),
            ({"slug": "new"}, "slug: &#39;new&#39; is reserved")):
        r = await client.post("/console/pages/new", data={**good, **change})
        assert r.status_code == 422, change
        assert message in r.text, (change, r.text)
        assert 'value="Season 2027"' in r.text  # what was typed is kept
    async with svc.sessions() as session:
        assert not await pages.of_organizer(session, ORGANIZER)

    r = await client.post("/console/pages/new", data=good)
    assert r.status_code == 303 and r.headers["location"] == "/console/pages/season-2027?saved=1"
    r = await client.get(r.headers["location"])
    assert r.status_code == 200 and "Saved." in r.text
    assert f"{BASE}/p/season-2027" in r.text
    assert "(2 events on it now)" in r.text
    # the embed snippets of the public pages, to copy
    assert "Button for your web site" in r.text
    assert "&lt;script src=&#34;https://invites.example.com/embed.js&#34;" in r.text
    assert "email={{email}}" in r.text
    async with svc.sessions() as session:
        page = await pages.by_slug(session, "season-2027")
        assert page is not None and page.organizer_email == ORGANIZER
        s = pages.settings_of(page)
    assert (s.title, s.layout, s.color_primary, s.event_ids) == (
        "Season 2027", "grid", "#aa0000", (one, two))
    assert s.date_from == datetime(2027, 4, 1, tzinfo=UTC)
    assert s.date_to == datetime(2027, 5, 31, 23, 59, 59, tzinfo=UTC)
    # the editor shows the saved values back
    assert 'value="#aa0000"' in r.text and 'value="2027-04-01"' in r.text
    assert re.search(r'value="grid"\s+checked', r.text)
    assert re.search(rf'value="{one}"\s+checked', r.text)

    # taken slugs
    r = await client.post("/console/pages/new", data=good)
    assert r.status_code == 422 and "is taken" in r.text

    # edit
    edit = {**good, "csrf": csrf_of(r.text), "layout": "list", "color_primary": "#00aa00",
            "events": [two]}
    edit.pop("slug")
    r = await client.post("/console/pages/season-2027", data={**edit, "color_text": "black"})
    assert r.status_code == 422 and "color_text: expected a color" in r.text
    async with svc.sessions() as session:
        page = await pages.by_slug(session, "season-2027")
        assert page is not None and page.layout == "grid"  # unchanged
    r = await client.post("/console/pages/season-2027", data=edit)
    assert r.status_code == 303 and r.headers["location"] == "/console/pages/season-2027?saved=1"
    async with svc.sessions() as session:
        page = await pages.by_slug(session, "season-2027")
        assert page is not None
        assert (page.layout, page.color_primary) == ("list", "#00aa00")
        assert [e.public_id for e in await pages.events_of(session, page)] == [two]

    r = await client.get("/console/pages")
    assert r.status_code == 200 and "Season 2027" in r.text and f"{BASE}/p/season-2027" in r.text

    # Another organizer sees nothing of it and cannot change it.
    async with client_for(app) as coach:
        await sign_in(svc, coach, sink, "coach@nba.example")
        assert (await coach.get("/console/pages/season-2027")).status_code == 404
        csrf_coach = csrf_of((await coach.get("/console/pages")).text)
        r = await coach.post("/console/pages/season-2027",
                             data={**edit, "csrf": csrf_coach, "events": []})
        assert r.status_code == 404
        assert "Season 2027" not in (await coach.get("/console/pages")).text


async def test_preview_applies_unsaved_settings(svc: Services, client: httpx.AsyncClient,
                                                sink: Sink, renderer: str) -> None:
    one = await make_event(svc, summary="Game 1")
    await make_event(svc, summary="Game 2", start=START + timedelta(days=7))
    theirs = await make_event(svc, organizer="coach@nba.example", summary="Theirs")
    r = await client.get("/console/preview", params={"title": "x"})
    assert r.status_code == 303  # signed-in organizers only
    await sign_in(svc, client, sink)

    r = await client.get("/console/preview", params={
        "title": "Unsaved title", "layout": "grid", "color_primary": "#ff0000",
        "background_url": "https://cdn.example.com/bg.jpg?a=1&b=2", "events": [one]})
    assert r.status_code == 200
    assert "Unsaved title" in r.text and "#ff0000" in r.text and "Game 1" in r.text
    assert "Game 2" not in r.text
    assert 'url("https://cdn.example.com/bg.jpg?a=1&b=2")' in r.text
    csp = r.headers["content-security-policy"]
    assert "frame-ancestors 'self'" in csp and "frame-ancestors 'none'" not in csp
    assert "form-action 'none'" in csp and "form-action 'self'" not in csp
    assert "'unsafe-inline'" not in csp
    assert r.headers["x-frame-options"] == "SAMEORIGIN"
    # all events in the range when none is chosen; another organizer's never
    r = await client.get("/console/preview", params={"title": "All"})
    assert "Game 1" in r.text and "Game 2" in r.text and "Theirs" not in r.text
    r = await client.get("/console/preview", params={"events": [theirs]})
    assert r.status_code == 422 and "Theirs" not in r.text
    r = await client.get("/console/preview", params={"color_text": "red;}</style><script>"})
    assert r.status_code == 422 and "<script>" not in r.text
    assert "color_text: expected a color" in r.text
    # the no-JavaScript path: the form posted into the frame
    csrf = csrf_of((await client.get("/console/pages/new")).text)
    r = await client.post("/console/preview", data={"csrf": csrf, "title": "Posted",
                                                    "layout": "single"})
    assert r.status_code == 200 and "Posted" in r.text
    async with svc.sessions() as session:
        assert not await pages.of_organizer(session, ORGANIZER)  # nothing saved


# --------------------------------------------------------------------------------------------
# Escaping and headers


async def test_organizer_text_is_escaped_everywhere(svc: Services, client: httpx.AsyncClient,
                                                    sink: Sink, renderer: str) -> None:
    eid = await make_event(svc, summary=XSS)
    await sign_in(svc, client, sink)
    csrf = csrf_of((await client.get("/console/pages/new")).text)
    r = await client.post("/console/pages/new", data={
        "csrf": csrf, "title": XSS_TITLE, "intro": XSS, "layout": "list", "slug": "xss",
        "events": [eid]})
    assert r.status_code == 303
    bodies = {
        "home": (await client.get("/console")).text,
        "event": (await client.get(f"/console/events/{eid}")).text,
        "pages": (await client.get("/console/pages")).text,
        "editor": (await client.get("/console/pages/xss")).text,
        "new": (await client.get("/console/pages/new")).text,
        "preview": (await client.get("/console/preview", params={
            "title": XSS_TITLE, "intro": XSS, "events": [eid]})).text,
        "invalid": (await client.post("/console/pages/new", data={
            "csrf": csrf, "title": XSS_TITLE, "intro": XSS, "layout": XSS})).text,
    }
    for name, body in bodies.items():
        assert "<script>alert" not in body, name
        assert "<img src=x" not in body and "<svg onload" not in body, name
        assert 'onerror="alert' not in body, name
        for tag in re.findall(r"<script\b[^>]*>", body):  # our own files, or data
            assert re.fullmatch(r'<script (src="/(console/)?static/[a-z]+\.js(\?v=\w+)?"( defer)?'
                                r'|type="application/ld\+json")>', tag), (name, tag)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in bodies["home"]
    assert "&#34;&gt;&lt;svg onload=alert(3)&gt;" in bodies["pages"]
    assert "&lt;svg onload=alert(3)&gt;" in bodies["preview"]


async def test_security_headers_and_static_files(svc: Services, client: httpx.AsyncClient,
                                                 sink: Sink) -> None:
    for path in ("/console/login", "/console/auth?token=x"):
        r = await client.get(path)
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cache-control"] == "no-store"
        assert '<link rel="stylesheet" href="/console/static/console.css">' in r.text
        assert "style=" not in r.text  # inline styles would be blocked by the CSP
    await sign_in(svc, client, sink)
    eid = await make_event(svc)
    for path in ("/console", "/console/pages", "/console/pages/new", f"/console/events/{eid}"):
        r = await client.get(path)
        assert r.status_code == 200
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert "frame-src 'self'" in r.headers["content-security-policy"]
        assert "style=" not in r.text
    r = await client.get("/console/static/console.js")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "counts" in r.text
    r = await client.get("/console/static/console.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    for bad in ("../console.py", "..%2Fconsole.py", "nope.js"):
        assert (await client.get(f"/console/static/{bad}")).status_code == 404


# --------------------------------------------------------------------------------------------
# In a real browser (Debian's headless Chromium through Playwright, never a downloaded one),
# against `ciserver serve`: console.js and the CSP must work together.


def until(predicate: Callable[[], bool], seconds: float) -> None:
    """Poll (page scripts run under our CSP, which forbids the eval wait_for_function uses)."""
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_console_in_a_browser(tmp_path: Path, sink: Sink) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed")
    from .test_e2e import Daemon

    artifacts = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
    artifacts.mkdir(parents=True, exist_ok=True)
    daemon = Daemon(tmp_path, sink)
    daemon.start()
    try:
        key = daemon.cli("apikey", "create", "--organizer", ORGANIZER).stdout.split()[-1]
        auth = {"Authorization": f"Bearer {key}"}
        ids = []
        for n in range(2):
            r = httpx.post(f"{daemon.url}/api/v1/events", headers=auth, json={
                "summary": f"Knicks vs Team {n}", "start": f"2030-01-1{n}T19:30:00",
                "end": f"2030-01-1{n}T22:00:00", "timezone": "America/New_York"})
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        sink.clear()
        problems: list[str] = []
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page()
                page.on("console", lambda m: problems.append(m.text)
                        if m.type in ("error", "warning") else None)
                page.on("pageerror", lambda e: problems.append(str(e)))

                page.goto(f"{daemon.url}/console")
                assert page.url.endswith("/console/login")
                page.fill("#email", ORGANIZER)
                page.click("button[type=submit]")
                page.wait_for_selector("text=Check your mailbox")
                mail = next(m for m in sink.wait(1, timeout=20) if ORGANIZER in m.rcpt_tos)
                link = re.search(r"http://\S+/console/auth\?token=\S+", mail.text())
                assert link
                page.goto(link.group(0))
                page.click("button:has-text('Sign in')")
                page.wait_for_selector("#events")
                assert page.url == f"{daemon.url}/console"
                cell = f"tr[data-event-id='{ids[0]}'] [data-count=no_answer]"
                assert page.inner_text(cell) == "0"

                # A fan asks for the invite: the count changes without a reload.
                r = httpx.post(f"{daemon.url}/api/v1/events/{ids[0]}/invites",
                               json={"email": "fan@example.net"})
                assert r.status_code == 202
                until(lambda: page.inner_text(cell) == "1", 15)
                page.screenshot(path=str(artifacts / "console-events.png"), full_page=True)

                # The event's report: its figures (live too), its charts, the CSV.
                page.click(f"a[href='/console/events/{ids[0]}']")
                page.wait_for_selector("figure.chart svg[role=img]")
                assert page.url == f"{daemon.url}/console/events/{ids[0]}"
                assert page.locator("figure.chart svg[role=img]").count() == 2
                assert "Answers over time" in (page.get_attribute(
                    "figure.chart svg", "aria-label") or "")
                invited = f"tr[data-event-id='{ids[0]}'] [data-count=invited]"
                assert page.inner_text(invited) == "1"
                r = httpx.post(f"{daemon.url}/api/v1/events/{ids[0]}/invites",
                               json={"email": "fan2@example.net"})
                assert r.status_code == 202
                until(lambda: page.inner_text(invited) == "2", 15)
                with page.expect_download() as download:
                    page.click("a:has-text('Download the report')")
                saved = download.value.path()
                assert saved is not None
                got = Path(saved).read_text(encoding="utf-8")
                assert sorted(row["email"] for row in csv.DictReader(io.StringIO(got))) == [
                    "fan2@example.net", "fan@example.net"]
                page.screenshot(path=str(artifacts / "console-event.png"), full_page=True)

                # A new page: the preview follows the color input before anything is saved.
                page.goto(f"{daemon.url}/console/pages/new")
                page.fill("#title", "Knicks at home")
                page.check("input[name=layout][value=grid]")
                page.fill("#color_primary", "#c8102e")
                until(lambda: "c8102e" in (page.get_attribute("#preview", "src") or ""), 10)

                def preview_html() -> str:
                    frame = page.frame(name="preview")
                    try:
                        return frame.content() if frame is not None else ""
                    except sync_api.Error:  # navigating
                        return ""

                until(lambda: "#c8102e" in preview_html(), 10)
                assert "Knicks at home" in preview_html()
                page.screenshot(path=str(artifacts / "console-page-editor.png"),
                                full_page=True)
                page.click("button:has-text('Create page')")
                page.wait_for_selector("text=Saved.")
                share = page.input_value("#share-copy")
                page.screenshot(path=str(artifacts / "console-page-saved.png"), full_page=True)
                assert re.fullmatch(re.escape(daemon.url) + r"/p/knicks-at-home-[0-9a-f]{6}",
                                    share), share

                # The saved page shows the color.
                page.goto(share)
                assert "#c8102e" in page.content()
                page.screenshot(path=str(artifacts / "console-saved-page.png"),
                                full_page=True)
            finally:
                browser.close()
        assert not [m for m in problems if "Content Security Policy" in m or "Refused" in m], \
            problems
    finally:
        daemon.stop()
