"""The public side as fans and crawlers meet it (httpx against the ASGI app, the capturing
smarthost behind the relay): shareable pages in their three layouts, the event page, the form
with and without JavaScript, JSON-LD and link previews, abuse resistance, the CSP, the embed
button and the email call to action."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi import FastAPI
from icalendar import Calendar
from sqlalchemy import select
from starlette.requests import Request

from ciserver import relay
from ciserver.services import events, pages
from ciserver.services.context import Services
from ciserver.store import models
from ciserver.web import public
from ciserver.web.app import create_app

from .conftest import ORGANIZER, Sink

BASE = "https://invites.example.com"
NOW = datetime(2027, 1, 15, 12, 0, tzinfo=UTC)
BERLIN = ZoneInfo("Europe/Berlin")
# Three home games, 20:00 in Berlin (18:00 UTC in May: CEST, +02:00).
GAME_1 = datetime(2027, 5, 1, 20, 0, tzinfo=BERLIN)
XSS = '<script>alert(1)</script><img src=x onerror=alert(2)>" onmouseover="alert(3)'


@pytest.fixture
def app(sqlite_svc: Services) -> FastAPI:
    sqlite_svc.clock = lambda: NOW
    return create_app(sqlite_svc)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE) as c:
        yield c


async def make_event(svc: Services, summary: str, start: datetime = GAME_1, *,
                     organizer: str = ORGANIZER, location: str = "Main Arena, Berlin",
                     description: str = "") -> str:
    async with svc.sessions.begin() as session:
        event = await events.create_via_api(
            svc, session, organizer=organizer, organizer_name="Berlin Bears",
            summary=summary, start=start, end=start + timedelta(hours=2), location=location,
            description=description)
        return event.public_id


async def season(svc: Services, n: int = 3) -> list[str]:
    return [await make_event(svc, f"Bears vs Team {i + 1}", GAME_1 + timedelta(days=7 * i))
            for i in range(n)]


async def make_page(svc: Services, slug: str, **settings: Any) -> str:
    async with svc.sessions.begin() as session:
        page = await pages.create(svc, session, ORGANIZER, pages.PageSettings(**settings), slug)
        return page.slug


async def cancel(svc: Services, event_id: str) -> None:
    async with svc.sessions.begin() as session:
        await events.cancel(svc, session, await events.find(session, event_id), origin="api")


async def subs(svc: Services) -> list[models.Subscription]:
    async with svc.sessions() as session:
        return list((await session.execute(
            select(models.Subscription).order_by(models.Subscription.id))).scalars().all())


def offered(html: str) -> list[str]:
    """The event ids the page's form offers (checkbox values), in page order."""
    return re.findall(r'<input type="checkbox" name="events" value="([a-z2-7]+)"', html)


def checked(html: str) -> list[str]:
    return re.findall(r'name="events" value="([a-z2-7]+)" id="ev-[a-z2-7]+" checked', html)


def jsonld(html: str) -> Any:
    m = re.search(r'<script type="application/ld\+json">(.*?)</script>', html, re.S)
    assert m, "no JSON-LD"
    return json.loads(m.group(1))


def meta(html: str, prop: str) -> str | None:
    m = re.search(r'<meta (?:property|name)="' + re.escape(prop) + r'" content="([^"]*)">',
                  html)
    return m.group(1) if m else None


class Tags(HTMLParser):
    """Every start tag with its attributes, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def tags(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Tags()
    parser.feed(html)
    return parser.tags


def invites_to(sink: Sink, rcpt: str) -> list[str]:
    """SUMMARY of every invite the smarthost got for ``rcpt``."""
    out = []
    for msg in sink.invites():
        if rcpt in msg.rcpt_tos:
            cal = Calendar.from_ical(msg.calendar())
            out.append(str(cal.walk("VEVENT")[0]["SUMMARY"]))
    return sorted(out)


def cta_fields(html: str) -> dict[str, str]:
    form = re.search(r'<form id="cta-form".*?</form>', html, re.S)
    assert form, html
    return dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)">', form.group(0)))


# --------------------------------------------------------------------------------------------
# Pages and layouts


@pytest.mark.parametrize("layout", ["single", "list", "grid"])
async def test_layouts(sqlite_svc: Services, client: httpx.AsyncClient, layout: str) -> None:
    ids = await season(sqlite_svc)
    slug = await make_page(sqlite_svc, f"bears-{layout}", title="Bears 2027", layout=layout,
                           intro="Home games")
    r = await client.get(f"/p/{slug}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert f"games-list--{layout}" in html and f"layout-{layout}" in html
    assert offered(html) == ids and checked(html) == []  # several games: none pre-checked
    assert '<form id="invite-form" method="post" action="/p/' + slug + '"' in html
    assert "<legend>Pick the games you want</legend>" in html
    assert '<label for="email">Your email address</label>' in html
    assert '<input id="email" name="email" type="email" required' in html
    assert '<button type="submit" id="send">' in html and 'id="select-all"' in html
    for eid in ids:  # each checkbox has a label and its date and place as description
        assert f'<label class="game-title" for="ev-{eid}">' in html
        assert f'aria-describedby="ev-{eid}-when ev-{eid}-where"' in html
    # venue time: 20:00 in Berlin, with its offset for page.js to show the viewer's own
    assert '<time datetime="2027-05-01T20:00:00+02:00">Sat 1 May 2027, 20:00</time>' in html
    assert 'data-start="2027-05-01T20:00:00+02:00" data-tz="Europe/Berlin"' in html
    assert "CEST" in html and "Main Arena, Berlin" in html
    assert re.search(r'<script src="/static/page\.js\?v=\w+" defer></script>', html)
    assert re.search(r'<link rel="stylesheet" href="/static/ciserver\.css\?v=\w+">', html)


async def test_one_game_is_pre_checked(sqlite_svc: Services, client: httpx.AsyncClient) -> None:
    (eid,) = await season(sqlite_svc, 1)
    slug = await make_page(sqlite_svc, "final", layout="single", event_ids=(eid,))
    html = (await client.get(f"/p/{slug}")).text
    assert offered(html) == [eid] and checked(html) == [eid]
    assert "<legend>Your game</legend>" in html and 'id="select-all"' not in html
    assert "<title>Bears vs Team 1</title>" in html  # no title: the event's


async def test_date_range_selection_cancelled_and_past(sqlite_svc: Services,
                                                       client: httpx.AsyncClient) -> None:
    a, b, c = await season(sqlite_svc)
    past = await make_event(sqlite_svc, "Last season", datetime(2026, 5, 1, 20, tzinfo=BERLIN))
    theirs = await make_event(sqlite_svc, "Not ours", organizer="coach@nba.example")
    everything = await make_page(sqlite_svc, "all")
    assert offered((await client.get(f"/p/{everything}")).text) == [a, b, c]  # not the past
    ranged = await make_page(sqlite_svc, "may", date_from=datetime(2027, 5, 5, tzinfo=UTC),
                             date_to=datetime(2027, 5, 31, tzinfo=UTC))
    assert offered((await client.get(f"/p/{ranged}")).text) == [b, c]
    chosen = await make_page(sqlite_svc, "chosen", event_ids=(c, a, past, theirs))
    html = (await client.get(f"/p/{chosen}")).text
    assert offered(html) == [a, c] and "Not ours" not in html and "Last season" not in html
    await cancel(sqlite_svc, a)
    html = (await client.get(f"/p/{chosen}")).text
    assert offered(html) == [c] and checked(html) == [c]
    # a game cancelled after the page was loaded is refused, nothing is sent
    r = await client.post(f"/p/{chosen}", data={"email": "fan@example.com", "events": [a, c]})
    assert r.status_code == 409 and "no longer offered" in r.text
    assert await subs(sqlite_svc) == []
    await cancel(sqlite_svc, c)
    r = await client.get(f"/p/{chosen}")
    assert r.status_code == 200 and offered(r.text) == [] and "No upcoming games" in r.text


async def test_jsonld_and_link_previews(sqlite_svc: Services, client: httpx.AsyncClient) -> None:
    ids = await season(sqlite_svc, 2)
    slug = await make_page(sqlite_svc, "bears", title="Bears 2027",
                           intro="All home games of the season.",
                           logo_url="https://cdn.example.com/bears.png")
    html = (await client.get(f"/p/{slug}")).text
    data = jsonld(html)
    assert [e["@type"] for e in data] == ["Event", "Event"]
    first = data[0]
    assert first["@context"] == "https://schema.org"
    assert first["name"] == "Bears vs Team 1"
    assert first["startDate"] == "2027-05-01T20:00:00+02:00"
    assert first["endDate"] == "2027-05-01T22:00:00+02:00"
    assert datetime.fromisoformat(first["startDate"]) == GAME_1
    assert first["eventStatus"] == "https://schema.org/EventScheduled"
    assert first["location"] == {"@type": "Place", "name": "Main Arena, Berlin",
                                 "address": "Main Arena, Berlin"}
    assert first["organizer"] == {"@type": "Organization", "name": "Berlin Bears"}
    assert first["url"] == f"{BASE}/e/{ids[0]}"
    assert first["image"] == ["https://cdn.example.com/bears.png"]
    assert data[1]["startDate"] == "2027-05-08T20:00:00+02:00"
    assert meta(html, "og:title") == "Bears 2027"
    assert meta(html, "og:description") == "All home games of the season."
    assert meta(html, "og:url") == f"{BASE}/p/bears"
    assert meta(html, "og:image") == "https://cdn.example.com/bears.png"
    assert meta(html, "twitter:card") == "summary"
    assert meta(html, "twitter:title") == "Bears 2027"
    assert f'<link rel="canonical" href="{BASE}/p/bears">' in html
    assert '<img class="logo" src="https://cdn.example.com/bears.png"' in html
    # no logo: no og:image; no intro: a description made from the games
    bare = await make_page(sqlite_svc, "bare")
    html = (await client.get(f"/p/{bare}")).text
    assert meta(html, "og:image") is None
    assert meta(html, "og:description") == ("2 games, Sat 1 May 2027 to Sat 8 May 2027. "
                                            "Get the calendar invites.")


async def test_event_page_shares_the_look(sqlite_svc: Services,
                                          client: httpx.AsyncClient) -> None:
    eid = await make_event(sqlite_svc, "Cup final", description="Doors open at 19:00.")
    r = await client.get(f"/e/{eid}")
    html = r.text
    assert r.status_code == 200 and "games-list--single" in html
    assert offered(html) == [eid] and checked(html) == [eid]
    assert "Doors open at 19:00." in html and "Organizer: Berlin Bears" in html
    assert jsonld(html)["startDate"] == "2027-05-01T20:00:00+02:00"
    assert meta(html, "og:url") == f"{BASE}/e/{eid}"
    # posted without the checkbox (old forms), it still means this event
    r = await client.post(f"/e/{eid}", data={"email": "old@example.com"})
    assert r.status_code == 200 and "on its way" in r.text
    (sub,) = await subs(sqlite_svc)
    assert (sub.source, sub.origin) == ("page", "event-page")
    await cancel(sqlite_svc, eid)
    r = await client.get(f"/e/{eid}")
    assert r.status_code == 200 and "This event has been cancelled." in r.text
    assert 'id="invite-form"' not in r.text
    assert jsonld(r.text)["eventStatus"] == "https://schema.org/EventCancelled"
    r = await client.post(f"/e/{eid}", data={"email": "late@example.com"})
    assert r.status_code == 409 and "cancelled" in r.text


async def test_unknown_pages(client: httpx.AsyncClient) -> None:
    for path in ("/p/nope", "/p/" + "x" * 200, "/e/zzzz", "/i/zzzz?email=a@example.com",
                 "/i?events=zzzz", "/i"):
        r = await client.get(path)
        assert r.status_code == 404, path
        assert r.headers["content-type"].startswith("text/html")
    r = await client.post("/p/nope", data={"email": "a@example.com"})
    assert r.status_code == 404
    r = await client.post("/p/nope", data={"email": "a@example.com"},
                          headers={"Accept": "application/json"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# --------------------------------------------------------------------------------------------
# The form: plain POST (no JavaScript) and page.js's fetch


async def test_form_post_sends_the_chosen_games_only(svc: Services, sink: Sink) -> None:
    """The whole loop without JavaScript, on SQLite and PostgreSQL: pick two of three
    games, one click, the smarthost gets one invite per chosen game."""
    svc.clock = lambda: NOW
    a, _b, c = await season(svc)
    slug = await make_page(svc, "season", title="Bears 2027", layout="grid")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                 base_url=BASE) as client:
        r = await client.post(f"/p/{slug}", data={"email": "Fan@Example.com", "name": "Fan",
                                                  "events": [a, c], "website": ""})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "Check your mailbox" in r.text
    assert "Done! 2 invites are on their way to fan@example.com." in r.text
    confirmed = re.findall(r'<li class="confirmed-game" data-event="([a-z2-7]+)">', r.text)
    assert confirmed == [a, c]
    assert "Bears vs Team 2" not in r.text
    assert "no-store" in r.headers["cache-control"]
    rows = await subs(svc)
    assert {(s.email, s.source, s.origin) for s in rows} == {("fan@example.com", "page",
                                                              "season")}
    assert len(rows) == 2
    await relay.Relay(svc).drain()
    assert invites_to(sink, "fan@example.com") == ["Bears vs Team 1", "Bears vs Team 3"]


async def test_fetch_post_answers_json(sqlite_svc: Services, client: httpx.AsyncClient) -> None:
    a, b = await season(sqlite_svc, 2)
    slug = await make_page(sqlite_svc, "js", layout="list")
    headers = {"Accept": "application/json"}
    r = await client.post(f"/p/{slug}", data={"email": "js@example.com", "events": b},
                          headers=headers)
    assert r.status_code == 200
    data = r.json()
    assert data["ok"] and data["email"] == "js@example.com"
    assert data["message"] == "Done! The invite is on its way to js@example.com."
    assert [(g["id"], g["sent"]) for g in data["games"]] == [(b, True)]
    assert data["games"][0]["when"] == "Sat 8 May 2027, 20:00 CEST"
    # again, with both: one new, one already there
    r = await client.post(f"/p/{slug}", data={"email": "js@example.com", "events": [a, b]},
                          headers=headers)
    assert [(g["id"], g["sent"]) for g in r.json()["games"]] == [(a, True), (b, False)]
    assert "the others you already had" in r.json()["message"]
    r = await client.post(f"/p/{slug}", data={"email": "nope", "events": a}, headers=headers)
    assert r.status_code == 422
    assert r.json()["error"] == {"code": "invalid_email", "field": "email",
                                 "message": "Please enter a valid email address."}
    r = await client.post(f"/p/{slug}", data={"email": "x@example.com"}, headers=headers)
    assert r.status_code == 422 and r.json()["error"]["field"] == "events"


async def test_invalid_input_shows_the_page_again(sqlite_svc: Services,
                                                  client: httpx.AsyncClient) -> None:
    _a, b = await season(sqlite_svc, 2)
    slug = await make_page(sqlite_svc, "errors")
    r = await client.post(f"/p/{slug}", data={"email": "not-an-address", "name": "Me",
                                               "events": b})
    assert r.status_code == 422
    assert '<p id="form-status" class="error" role="alert"' in r.text
    assert "Please enter a valid email address." in r.text
    assert checked(r.text) == [b]  # the choice is kept
    assert 'value="not-an-address" aria-invalid="true"' in r.text and 'value="Me"' in r.text
    r = await client.post(f"/p/{slug}", data={"email": "me@example.com"})
    assert r.status_code == 422 and "Please pick at least one game." in r.text
    r = await client.post(f"/p/{slug}", data={"email": "me@example.com", "events": "zzzz"})
    assert r.status_code == 409 and "no longer offered" in r.text
    assert await subs(sqlite_svc) == []


async def test_honeypot(sqlite_svc: Services, client: httpx.AsyncClient, sink: Sink) -> None:
    (a,) = await season(sqlite_svc, 1)
    slug = await make_page(sqlite_svc, "trap")
    r = await client.post(f"/p/{slug}", data={"email": "bot@example.com", "events": a,
                                               "website": "http://spam.example"})
    assert r.status_code == 200 and "Check your mailbox" in r.text  # looks like success
    assert await subs(sqlite_svc) == []
    await relay.Relay(sqlite_svc).drain()
    assert sink.invites() == []


async def test_rate_limits(sqlite_svc: Services, app: FastAPI,
                           client: httpx.AsyncClient) -> None:
    await season(sqlite_svc, 1)
    slug = await make_page(sqlite_svc, "busy")
    app.state.ip_limiter.limit = 2
    codes = [(await client.post(f"/p/{slug}", data={"email": f"f{i}@example.com"})).status_code
             for i in range(3)]
    assert codes == [200, 200, 429]
    r = await client.post(f"/p/{slug}", data={"email": "f9@example.com"})
    assert r.status_code == 429 and "Too many requests" in r.text
    assert int(r.headers["Retry-After"]) > 0
    app.state.ip_limiter.limit = 0  # unlimited; now one recipient address
    app.state.address_limiter.limit = 1
    r = await client.post(f"/p/{slug}", data={"email": "same@example.com"})
    assert r.status_code == 200
    r = await client.post(f"/p/{slug}", data={"email": "SAME@example.com"},
                          headers={"Accept": "application/json"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
    app.state.address_limiter.limit = 0
    app.state.event_limiter.limit = 1  # and one event
    app.state.event_limiter.hits.clear()
    assert (await client.post(f"/p/{slug}", data={"email": "e1@example.com"})).status_code == 200
    assert (await client.post(f"/p/{slug}", data={"email": "e2@example.com"})).status_code == 429
    assert sorted(s.email for s in await subs(sqlite_svc)) == [
        "e1@example.com", "f0@example.com", "f1@example.com", "same@example.com"]


# --------------------------------------------------------------------------------------------
# Escaping, colors and the CSP


def assert_inert(html: str, where: str) -> None:
    """No markup from organizer text: only our own scripts, no event handlers, no styles
    outside the one nonce'd <style>."""
    assert "<script>alert" not in html and "<img src=x" not in html, where
    for tag, attrs in tags(html):
        assert not [a for a in attrs if a.startswith("on")], (where, tag, attrs)
        assert "style" not in attrs, (where, tag, attrs)
        if tag == "script":
            assert attrs.get("type") == "application/ld+json" or (
                (attrs.get("src") or "").startswith("/static/")), (where, attrs)
        if tag == "img":
            assert (attrs.get("src") or "").startswith("https://"), (where, attrs)


async def test_organizer_text_is_escaped(sqlite_svc: Services, client: httpx.AsyncClient,
                                         sink: Sink) -> None:
    eid = await make_event(sqlite_svc, XSS, location=XSS, description=XSS)
    slug = await make_page(sqlite_svc, "xss", title=XSS, intro=XSS, layout="single",
                           event_ids=(eid,))
    bodies = {
        "page": (await client.get(f"/p/{slug}")).text,
        "event": (await client.get(f"/e/{eid}")).text,
        "invalid": (await client.post(f"/p/{slug}", data={"email": XSS, "name": XSS})).text,
        "confirm": (await client.post(f"/p/{slug}", data={"email": "x@example.com",
                                                           "name": XSS})).text,
        "cta": (await client.get(f"/i/{eid}", params={"email": "x@example.com"})).text,
        "cta-bad": (await client.get(f"/i/{eid}", params={"email": XSS + "@x"})).text,
    }
    for where, html in bodies.items():
        assert_inert(html, where)
    page = bodies["page"]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert 'content="&lt;script&gt;alert(1)&lt;/script&gt;&lt;img src=x onerror=alert(2)&gt;' \
           '&#34; onmouseover=&#34;alert(3)"' in page  # og:title, quotes escaped
    for html in (page, bodies["event"]):
        raw = re.search(r'<script type="application/ld\+json">(.*?)</script>', html, re.S)
        assert raw and "<" not in raw.group(1) and "\\u003c/script\\u003e" in raw.group(1)
        data = jsonld(html)
        assert data["name"] == XSS and data["location"]["name"] == XSS  # intact as data


async def test_colors_and_contrast(sqlite_svc: Services, client: httpx.AsyncClient) -> None:
    await season(sqlite_svc, 2)
    slug = await make_page(sqlite_svc, "colors", color_primary="#ff0000",
                           color_background="#102030", color_text="#eeeeee",
                           background_url="https://cdn.example.com/bg.jpg?a=1&b=2")
    r = await client.get(f"/p/{slug}")
    m = re.search(r'<style nonce="([\w-]+)">(.*?)</style>', r.text, re.S)
    assert m, r.text
    nonce, css = m.groups()
    assert f"'nonce-{nonce}'" in r.headers["content-security-policy"]
    assert "--ci-primary:#ff0000" in css and "--ci-bg:#102030" in css
    assert "--ci-text:#eeeeee" in css  # readable: kept
    assert '--ci-bg-image:url("https://cdn.example.com/bg.jpg?a=1&b=2")' in css
    assert "--ci-on-primary:#000000" in css  # black reads better on this red than white
    assert "has-bg-image" in r.text
    # unreadable text color: replaced by black or white, whichever reads on the background
    grey = await make_page(sqlite_svc, "grey", color_background="#777777",
                           color_text="#808080", color_primary="#787878")
    m = re.search(r'<style nonce="[\w-]+">(.*?)</style>', (await client.get(f"/p/{grey}")).text)
    assert m
    css = m.group(1)
    assert "--ci-text:#000000" in css
    assert "--ci-accent:#000000" in css  # the primary is too close to the background
    theme = public.theme_of(pages.PageSettings(color_background="#ffffff",
                                               color_text="#fefefe"))
    assert theme.adjusted and public.contrast(theme.text, theme.background) >= 4.5
    assert round(public.contrast("#000000", "#ffffff"), 1) == 21.0
    # values that slipped past the checks never reach the CSS
    bad = pages.PageSettings(color_primary="red;}</style>", background_url='https://x/"a)')
    assert "style" not in public.theme_of(bad).css() and "x/" not in public.theme_of(bad).css()
    assert public.css_url("https://x/a b\"c") == 'url("https://x/a\\20 b\\22 c")'


async def test_csp_is_strict(sqlite_svc: Services, client: httpx.AsyncClient) -> None:
    (eid,) = await season(sqlite_svc, 1)
    slug = await make_page(sqlite_svc, "csp")
    nonces = set()
    for path in (f"/p/{slug}", f"/e/{eid}", f"/i/{eid}?email=a@example.com", "/p/missing"):
        r = await client.get(path)
        csp = r.headers["content-security-policy"]
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
        assert directives["default-src"] == "'none'"
        assert directives["script-src"] == "'self'"  # no inline script, no nonce for scripts
        nonce = re.fullmatch(r"'self' 'nonce-([\w-]+)'", directives["style-src"])
        assert nonce, csp
        nonces.add(nonce.group(1))
        assert directives["form-action"] == "'self'"
        assert directives["frame-ancestors"] == "'none'" and directives["base-uri"] == "'none'"
        assert "unsafe" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        for tag, attrs in tags(r.text):
            if tag == "style":
                assert attrs.get("nonce") == nonce.group(1)
            assert "style" not in attrs
    assert len(nonces) == 4  # a fresh nonce per answer


async def test_static_files_and_embed_js(client: httpx.AsyncClient) -> None:
    r = await client.get("/embed.js")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "attachShadow" in r.text and "/api/v1/invites" in r.text
    assert "innerHTML" not in r.text
    assert "access-control-allow-origin" not in r.headers  # a <script src> needs no CORS
    assert r.headers["cross-origin-resource-policy"] == "cross-origin"
    r2 = await client.get("/embed.js", headers={"If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304
    r = await client.get(public.static_url("page.js"))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/javascript")
    assert "immutable" in r.headers["cache-control"] and "innerHTML" not in r.text
    r = await client.get("/static/ciserver.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css")
    assert "max-age=300" in r.headers["cache-control"]
    for bad in ("/static/nope.css", "/static/..%2fpublic.py", "/static/public.py",
                "/static/%2e%2e%2fapp.py"):
        assert (await client.get(bad)).status_code == 404, bad


def test_embed_snippets() -> None:
    one = public.embed_snippets("https://invites.example.com/", ["abc"])
    assert one["button_html"] == (
        '<script src="https://invites.example.com/embed.js" data-event="abc" '
        'data-label="Add to my calendar" async></script>\n'
        '<noscript><a href="https://invites.example.com/e/abc">Add to my calendar</a>'
        "</noscript>")
    assert one["email_link"] == "https://invites.example.com/i/abc?email={{email}}"
    assert one["email_link_mailchimp"] == "https://invites.example.com/i/abc?email=*|EMAIL|*"
    assert one["page_url"] == "https://invites.example.com/e/abc"
    assert 'href="https://invites.example.com/i/abc?email={{email}}"' in one["email_button_html"]
    many = public.embed_snippets("https://invites.example.com", ["a", "b", "a"])
    assert 'data-events="a,b"' in many["button_html"]
    assert many["email_link"] == "https://invites.example.com/i?events=a,b&email={{email}}"
    assert "&amp;email=" in many["email_button_html"]
    odd = public.embed_snippets("https://h", ['x"><script>'])
    assert "<script>\"" not in odd["button_html"] and "&#x27;" not in odd["button_html"]
    assert 'data-event="x&quot;&gt;&lt;script&gt;"' in odd["button_html"]
    with pytest.raises(ValueError):
        public.embed_snippets("https://h", [])


# --------------------------------------------------------------------------------------------
# Email call to action


async def test_cta_get_sends_nothing_post_sends(sqlite_svc: Services, app: FastAPI,
                                                client: httpx.AsyncClient, sink: Sink) -> None:
    (eid,) = await season(sqlite_svc, 1)
    for _ in range(3):  # mail scanners follow the link, more than once
        r = await client.get(f"/i/{eid}", params={"email": "Reader@Example.com"})
        assert r.status_code == 200
    assert r.headers["cache-control"] == "no-store" and "noindex" in r.headers["x-robots-tag"]
    assert '<strong id="cta-email">reader@example.com</strong>' in r.text
    assert "Bears vs Team 1" in r.text and "Sat 1 May 2027" in r.text
    fields = cta_fields(r.text)
    assert fields["email"] == "reader@example.com" and fields["events"] == eid
    assert re.fullmatch(r"[0-9a-f]{32}", fields["token"])
    assert f'<form id="cta-form" method="post" action="/i/{eid}">' in r.text
    await relay.Relay(sqlite_svc).drain()
    assert await subs(sqlite_svc) == [] and sink.invites() == []

    r = await client.post(f"/i/{eid}", data=fields)
    assert r.status_code == 200 and "Done! The invite is on its way to reader@example.com." \
        in r.text
    (sub,) = await subs(sqlite_svc)
    assert (sub.email, sub.source, sub.origin) == ("reader@example.com", "page", "email-cta")
    await relay.Relay(sqlite_svc).drain()
    assert invites_to(sink, "reader@example.com") == ["Bears vs Team 1"]


async def test_cta_refuses_forged_posts(sqlite_svc: Services, client: httpx.AsyncClient,
                                        sink: Sink) -> None:
    a, b = await season(sqlite_svc, 2)
    fields = cta_fields((await client.get(f"/i/{a}", params={"email": "v@example.com"})).text)
    forged = [
        {"email": "v@example.com"},  # no token
        {"email": "v@example.com", "token": "0" * 32},
        {"email": "other@example.com", "token": fields["token"]},  # another address
    ]
    for data in forged:
        r = await client.post(f"/i/{a}", data=data)
        assert r.status_code == 403, data
        assert "Please confirm once more" in r.text
    r = await client.post(f"/i/{b}", data=fields)  # another event
    assert r.status_code == 403
    r = await client.post("/i", data={**fields, "events": f"{a},{b}"})  # more events
    assert r.status_code == 403
    # an old page: refused, and offered again with a fresh token
    sqlite_svc.clock = lambda: NOW + timedelta(hours=4)
    r = await client.post(f"/i/{a}", data=fields)
    assert r.status_code == 403 and cta_fields(r.text)["token"] != fields["token"]
    assert await subs(sqlite_svc) == []
    await relay.Relay(sqlite_svc).drain()
    assert sink.invites() == []
    r = await client.post(f"/i/{a}", data=cta_fields(r.text))
    assert r.status_code == 200
    # a token stays good within the hour window
    sqlite_svc.clock = lambda: NOW
    fresh = cta_fields((await client.get(f"/i/{b}", params={"email": "v@example.com"})).text)
    sqlite_svc.clock = lambda: NOW + timedelta(hours=1, minutes=30)
    assert (await client.post(f"/i/{b}", data=fresh)).status_code == 200


async def test_cta_several_events_and_merge_quirks(sqlite_svc: Services,
                                                   client: httpx.AsyncClient,
                                                   sink: Sink) -> None:
    a, b, c = await season(sqlite_svc)
    await cancel(sqlite_svc, c)
    # a+b@… merged unencoded: '+' arrives as a space
    r = await client.get(f"/i?events={a},{b},{c}&email=fan+tag@example.com")
    assert r.status_code == 200
    fields = cta_fields(r.text)
    assert fields["email"] == "fan+tag@example.com"
    assert fields["events"] == f"{a},{b}"  # the cancelled one is shown, not offered
    assert "Cancelled" in r.text and 'action="/i"' in r.text
    r = await client.post("/i", data=fields)
    assert r.status_code == 200 and "Done! 2 invites" in r.text
    await relay.Relay(sqlite_svc).drain()
    assert invites_to(sink, "fan+tag@example.com") == ["Bears vs Team 1", "Bears vs Team 2"]
    # the mailing tool did not merge: ask for the address (a GET form), offer no button yet
    for raw in ("*|EMAIL|*", "{{email}}", ""):
        r = await client.get(f"/i/{a}", params={"email": raw} if raw else {})
        assert r.status_code == 200 and 'id="cta-form"' not in r.text
        assert f'<form id="cta-address" method="get" action="/i/{a}">' in r.text
        assert '<input id="email" name="email" type="email" required' in r.text
    r = await client.get(f"/i/{a}", params={"email": "broken@"})
    assert "does not look right" in r.text and 'value="broken@"' in r.text
    r = await client.post(f"/i/{a}", data={"email": "nope", "token": "x"})
    assert r.status_code == 422 and "valid email" in r.text
    r = await client.get(f"/i/{c}", params={"email": "x@example.com"})
    assert r.status_code == 200 and 'id="cta-form"' not in r.text
    r = await client.post(f"/i/{c}", data={"email": "x@example.com", "token": "x"})
    assert r.status_code == 409 and "cancelled" in r.text


async def test_no_redirects(sqlite_svc: Services, client: httpx.AsyncClient) -> None:
    (eid,) = await season(sqlite_svc, 1)
    slug = await make_page(sqlite_svc, "nr")
    evil = "https://evil.example/"
    responses = [
        await client.get(f"/p/{slug}", params={"next": evil}),
        await client.post(f"/p/{slug}?next={evil}", data={"email": "n@example.com",
                                                           "next": evil}),
        await client.get(f"/i/{eid}", params={"email": "n@example.com", "next": evil}),
        await client.get(f"/e/{eid}", params={"next": evil, "redirect": evil}),
    ]
    for r in responses:
        assert r.status_code < 300 and "location" not in r.headers
        assert "evil.example" not in r.text
    # a trailing slash: no redirect built from the Host header (Starlette's default)
    for path in ("/console/", f"/p/{slug}/", "/healthz/"):
        r = await client.get(path, headers={"Host": "evil.example"})
        assert r.status_code == 404 and "location" not in r.headers, path


async def test_head_is_get_without_the_body(sqlite_svc: Services,
                                            client: httpx.AsyncClient) -> None:
    (eid,) = await season(sqlite_svc, 1)
    slug = await make_page(sqlite_svc, "hd")
    for path in ("/healthz", f"/p/{slug}", f"/e/{eid}", "/embed.js", "/openapi.json"):
        got, head = await client.get(path), await client.head(path)
        assert head.status_code == got.status_code == 200, path
        assert head.content == b"" and got.content, path
        assert head.headers["content-type"] == got.headers["content-type"], path
        assert "content-security-policy" in head.headers or "text/html" not in got.headers[
            "content-type"], path
    assert (await client.head("/nowhere")).status_code == 404


async def test_console_preview_renders_inactive(sqlite_svc: Services, app: FastAPI) -> None:
    ids = await season(sqlite_svc, 2)
    async with sqlite_svc.sessions() as session:
        evs: Sequence[models.Event] = [await events.find(session, i) for i in ids]
    request = Request({"type": "http", "app": app, "method": "GET", "path": "/", "headers": [],
                       "query_string": b""})
    r = public.render_page(request, pages.PageSettings(title="Draft", layout="grid"), evs)
    html = bytes(r.body).decode()
    assert r.status_code == 200 and "Draft" in html and offered(html) == ids
    assert '<button type="submit" id="send" disabled>' in html and 'data-preview="1"' in html
    assert "form-action 'none'" in r.headers["content-security-policy"]
    with pytest.raises(pages.PageError):
        public.render_page(request, pages.PageSettings(color_text="red"), evs)



# --------------------------------------------------------------------------------------------
# More games than one request may take: refused whole, with the limit named, never cut short


async def test_too_many_games_are_refused_never_cut(sqlite_svc: Services,
                                                    client: httpx.AsyncClient) -> None:
    limit = public.MAX_EVENTS
    ids = await season(sqlite_svc, limit + 1)
    slug = await make_page(sqlite_svc, "long-season")
    r = await client.get(f"/p/{slug}")
    assert len(offered(r.text)) == limit + 1
    assert f"You can pick up to {limit} games at a time." in r.text
    refusal = f"Pick at most {limit} games at a time (you picked {limit + 1})"
    # "Select all", without JavaScript: the page again, the choice kept, nothing sent
    r = await client.post(f"/p/{slug}", data={"email": "all@example.com", "events": ids})
    assert r.status_code == 422 and refusal in r.text and "Done!" not in r.text
    assert len(checked(r.text)) == limit + 1
    # the same by fetch (page.js shows error.message)
    r = await client.post(f"/p/{slug}", data={"email": "all@example.com", "events": ids},
                          headers={"Accept": "application/json"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "too_many_events"
    assert r.json()["error"]["field"] == "events" and refusal in r.json()["error"]["message"]
    # the email call to action: the GET page and the POST refuse the whole link
    link = "/i?events=" + ",".join(ids) + "&email=all@example.com"
    r = await client.get(link)
    assert r.status_code == 422 and 'id="cta-form"' not in r.text
    assert f"This link lists {limit + 1} games, but at most {limit} can be added" in r.text
    r = await client.post("/i", data={"email": "all@example.com", "events": ",".join(ids),
                                      "token": "x"})
    assert r.status_code == 422 and f"at most {limit} can be added" in r.text
    # the API (what embed.js calls) names the same limit
    r = await client.post("/api/v1/invites", json={"email": "all@example.com", "events": ids})
    assert r.status_code == 422 and str(limit) in r.json()["error"]["message"]
    assert await subs(sqlite_svc) == []
    # the limit itself is accepted, all of it
    r = await client.post(f"/p/{slug}", data={"email": "all@example.com", "events": ids[:limit]})
    assert r.status_code == 200 and f"Done! {limit} invites are on their way" in r.text
    assert len(await subs(sqlite_svc)) == limit
    r = await client.get("/i?events=" + ",".join(ids[1:]) + "&email=cta@example.com")
    fields = cta_fields(r.text)
    assert len(fields["events"].split(",")) == limit  # was cut to 50 before
    r = await client.post("/i", data=fields)
    assert r.status_code == 200 and f"Done! {limit} invites" in r.text
    # a snippet never makes a link the server refuses
    with pytest.raises(ValueError, match=f"at most {limit}"):
        public.embed_snippets(BASE, ids)


async def test_game_limit_follows_the_daily_invite_allowance(sqlite_svc: Services,
                                                             client: httpx.AsyncClient) -> None:
    """A request over one mailbox's daily invite allowance could never pass the rate limit:
    it is refused as too many games, not with "try again later"."""
    sqlite_svc.config.web.rate_limit_invites_per_address = 2
    ids = await season(sqlite_svc, 3)
    slug = await make_page(sqlite_svc, "small-allowance")
    assert "You can pick up to 2 games at a time." in (await client.get(f"/p/{slug}")).text
    r = await client.post(f"/p/{slug}", data={"email": "a@example.com", "events": ids},
                          headers={"Accept": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["message"].startswith(
        "Pick at most 2 games at a time (you picked 3)")
    r = await client.get("/i?events=" + ",".join(ids) + "&email=a@example.com")
    assert r.status_code == 422 and "at most 2 can be added" in r.text
    r = await client.post(f"/p/{slug}", data={"email": "a@example.com", "events": ids[:2]})
    assert r.status_code == 200 and "Done! 2 invites" in r.text


async def test_console_snippets_stay_within_the_limit(svc: Services, sink: Sink) -> None:
    """The console's button and mailing link carry no more games than a request may ask
    for, and the console says so when the page has more."""
    from .test_console import sign_in

    svc.clock = lambda: NOW
    svc.config.web.rate_limit_invites_per_address = 2  # the limit: 2 games a request
    ids = await season(svc, 3)
    slug = await make_page(svc, "three")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                 base_url=BASE) as c:
        await sign_in(svc, c, sink)
        r = await c.get(f"/console/pages/{slug}")
    assert r.status_code == 200
    assert "This page has 3 events, but a button or a mailing link can add at most 2" in r.text
    assert f"/i?events={ids[0]},{ids[1]}&amp;email={{{{email}}}}" in r.text
    assert ids[2] not in r.text.split('id="snippet-limit"')[1].split('class="editor"')[0]


def test_embed_js_shows_the_servers_message(tmp_path: Any) -> None:
    """embed.js blames the address only when the server does; any other refusal (a button
    listing too many games) is shown in the server's words."""
    pw = pytest.importorskip("playwright.sync_api")
    chromium = "/usr/bin/chromium"
    import os

    if not os.path.exists(chromium):
        pytest.skip("Debian's chromium is not installed")
    script = public.static_file("embed.js")
    assert script is not None
    answers = {
        "bad@example.com": {"error": {"code": "invalid_email", "message": "'bad' is no"}},
        "many@example.com": {"error": {"code": "invalid", "message":
                                       "events: List should have at most 100 items"}},
    }

    def api(route: Any) -> None:
        email = json.loads(route.request.post_data)["email"]
        route.fulfill(status=422, content_type="application/json",
                      body=json.dumps(answers[email]))

    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.route("https://ci.example/embed.js", lambda r: r.fulfill(
                status=200, content_type="text/javascript", body=script[0]))
            page.route("https://ci.example/api/v1/invites", api)
            page.route("https://site.example/", lambda r: r.fulfill(
                status=200, content_type="text/html", body='<p id="box"><script '
                'src="https://ci.example/embed.js" data-events="a,b"></script></p>'))
            page.goto("https://site.example/")
            status = page.locator(".ciserver-invite .status")
            for email, shown in (("many@example.com", "at most 100 items"),
                                 ("bad@example.com", "Please enter a valid email address.")):
                page.locator(".ciserver-invite input").fill(email)
                page.locator(".ciserver-invite button").click()
                page.wait_for_function(
                    "t => document.querySelector('.ciserver-invite').shadowRoot"
                    ".querySelector('.status').textContent.includes(t)", arg=shown,
                    timeout=10_000)
                assert shown in status.inner_text()
        finally:
            browser.close()


async def test_an_organizer_without_a_name_is_shown_by_domain(
        sqlite_svc: Services, client: httpx.AsyncClient) -> None:
    """No organizer name: the page names the organizer's domain, never their mailbox
    (public pages are read by address harvesters too)."""
    async with sqlite_svc.sessions.begin() as session:
        event = await events.create_via_api(
            sqlite_svc, session, organizer=ORGANIZER, organizer_name="", summary="Open day",
            start=GAME_1, end=GAME_1 + timedelta(hours=2))
    html = (await client.get(f"/e/{event.public_id}")).text
    assert f"Organizer: {ORGANIZER.rpartition('@')[2]}" in html
    assert ORGANIZER not in html
