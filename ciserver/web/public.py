"""The public side: shareable pages (/p/{slug}), the event page's look (/e/{id}), the
embeddable button (/embed.js) and the email-safe call to action (/i/...).

How it stays safe:

- Organizer text reaches HTML only through Jinja2 autoescaping. The JSON-LD block is
  ``json.dumps`` with ``<``, ``>``, ``&`` and the JavaScript line separators escaped, so no
  text can close the ``<script>`` element.
- Page colors and image URLs are checked when saved (``services.pages.check``) and again
  here; they reach the browser as CSS custom properties in one ``<style>`` element that carries
  the request's CSP nonce, never in a ``style`` attribute.
- The Content-Security-Policy (:func:`csp`) runs scripts from our own origin only (no inline
  script at all) and styles from our origin plus that one nonce.
- A GET never subscribes anybody (mail scanners follow links). The email call to action's POST
  carries an HMAC of (events, address, hour) made with the server secret, so another site
  cannot forge it blindly.
- Nothing here redirects: every answer is a page of our own.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import re
import secrets
import zoneinfo
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from ..services import events as events_svc
from ..services import pages as pages_svc
from ..services import subscriptions
from ..services.context import Services
from ..store.models import Event, Page
from .api import MAX_EVENTS, rate_limit
from .errors import ApiError

router = APIRouter(include_in_schema=False)

_WEB = resources.files("ciserver.web")

# --------------------------------------------------------------------------------------------
# Templates, static files and the Content-Security-Policy

_STATIC_TYPES = {"css": "text/css; charset=utf-8", "js": "text/javascript; charset=utf-8",
                 "svg": "image/svg+xml", "png": "image/png", "ico": "image/x-icon",
                 "woff2": "font/woff2"}
_STATIC_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.([a-z0-9]+)$")


@functools.cache
def static_file(name: str) -> tuple[bytes, str, str] | None:
    """(content, content type, version) of a file in ciserver/web/static, or None. Names are
    plain file names (no folders), so no path can leave the folder."""
    m = _STATIC_NAME.match(name)
    if m is None or m.group(1) not in _STATIC_TYPES:
        return None
    path = _WEB / "static" / name
    if not path.is_file():
        return None
    data = path.read_bytes()
    return data, _STATIC_TYPES[m.group(1)], hashlib.sha256(data).hexdigest()[:16]


def static_url(name: str) -> str:
    """The file's URL with its version, so browsers may keep it for a year."""
    found = static_file(name)
    return f"/static/{name}?v={found[2]}" if found else f"/static/{name}"


env = Environment(
    loader=FileSystemLoader(str(_WEB / "templates")),
    autoescape=select_autoescape(default=True, default_for_string=True),
)
env.globals["static_url"] = static_url


def csp(nonce: str, form_action: str = "'self'") -> str:
    """The policy of every HTML answer: scripts from our origin only, styles from our origin
    and the one ``<style nonce>`` element of this answer, images from https, forms and fetch
    to our origin, never framed."""
    return ("default-src 'none'; script-src 'self'; "
            f"style-src 'self' 'nonce-{nonce}'; img-src 'self' https: data:; "
            f"connect-src 'self'; form-action {form_action}; frame-ancestors 'none'; "
            "base-uri 'none'")


def nonce_of(request: Request) -> str:
    """The answer's CSP nonce (made by the app's security-headers middleware)."""
    nonce = getattr(request.state, "csp_nonce", "")
    if not nonce:
        nonce = request.state.csp_nonce = secrets.token_urlsafe(18)
    return str(nonce)


def render(request: Request | None, template: str, status: int = 200,
           headers: dict[str, str] | None = None, **ctx: Any) -> HTMLResponse:
    """A template as an HTML answer that carries its own CSP (with the nonce its <style>
    uses), so wrappers such as the console's preview keep a policy that fits."""
    nonce = nonce_of(request) if request is not None else ""
    html = env.get_template(template).render(csp_nonce=nonce, **ctx)
    response = HTMLResponse(html, status_code=status, headers=headers)
    if nonce:
        response.headers["Content-Security-Policy"] = csp(nonce)
    return response


def not_found(request: Request, title: str = "Page not found") -> HTMLResponse:
    return render(request, "base.html", 404, title=title,
                  message="Please check the link you followed.")


_PRIVATE = {"Cache-Control": "no-store", "X-Robots-Tag": "noindex, nofollow"}


@router.get("/static/{name}")
async def static(name: str, request: Request) -> Response:
    found = static_file(name)
    if found is None:
        return Response("not found", status_code=404, media_type="text/plain")
    data, ctype, version = found
    etag = f'"{version}"'
    cache = ("public, max-age=31536000, immutable" if request.query_params.get("v") == version
             else "public, max-age=300")
    headers = {"Cache-Control": cache, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=ctype, headers=headers)


@router.get("/embed.js")
async def embed_js(request: Request) -> Response:
    """The button for third-party sites. A classic <script src> needs no CORS; the API's
    invite endpoints answer the button's fetch (their CORS is set in web/api.py)."""
    found = static_file("embed.js")
    assert found is not None, "ciserver/web/static/embed.js is missing"
    data, ctype, version = found
    headers = {"Cache-Control": "public, max-age=3600", "ETag": f'"{version}"',
               "Cross-Origin-Resource-Policy": "cross-origin"}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=ctype, headers=headers)


# --------------------------------------------------------------------------------------------
# Colors: the page's own, unless they would make text hard to read

_HEX = re.compile(r"^#[0-9a-f]{6}$")
_URL = re.compile(r"^https://[^\s\"'<>()\\]+$")
_DEFAULTS = pages_svc.PageSettings()
_CSS_URL_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                          "-._~:/?#@!$&*+,=%")


def luminance(color: str) -> float:
    """WCAG relative luminance of #rrggbb."""
    def channel(value: int) -> float:
        s = value / 255
        return s / 12.92 if s <= 0.04045 else float(((s + 0.055) / 1.055) ** 2.4)

    r, g, b = (int(color[i:i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio, 1 to 21."""
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def _readable_on(background: str) -> str:
    return ("#000000" if contrast("#000000", background) >= contrast("#ffffff", background)
            else "#ffffff")


def _color(value: str, default: str) -> str:
    value = (value or "").strip().lower()
    return value if _HEX.match(value) else default


def safe_url(value: str) -> str:
    value = (value or "").strip()
    return value if _URL.match(value) else ""


def css_url(url: str) -> str:
    """``url("…")`` with every character that could end the string or the rule escaped."""
    body = "".join(ch if ch in _CSS_URL_SAFE else f"\\{ord(ch):x} " for ch in url)
    return f'url("{body}")'


@dataclass(frozen=True)
class Theme:
    primary: str
    on_primary: str  # text on primary-colored buttons
    background: str
    text: str
    accent: str  # borders and outlines on the background: ≥ 3:1 against it
    background_url: str = ""
    adjusted: bool = False  # the page's text color was replaced for contrast

    def css(self) -> Markup:
        """Custom properties for static/ciserver.css, for a nonce'd <style> element. Every
        value is a checked #rrggbb or an escaped url(), so nothing can break out."""
        props = [("--ci-primary", self.primary), ("--ci-on-primary", self.on_primary),
                 ("--ci-bg", self.background), ("--ci-text", self.text),
                 ("--ci-accent", self.accent)]
        if self.background_url:
            props.append(("--ci-bg-image", css_url(self.background_url)))
        return Markup(":root{" + ";".join(f"{k}:{v}" for k, v in props) + "}")  # noqa: S704


def theme_of(s: pages_svc.PageSettings) -> Theme:
    background = _color(s.color_background, _DEFAULTS.color_background)
    text = _color(s.color_text, _DEFAULTS.color_text)
    adjusted = contrast(text, background) < 4.5  # WCAG AA for body text
    if adjusted:
        text = _readable_on(background)
    primary = _color(s.color_primary, _DEFAULTS.color_primary)
    accent = primary if contrast(primary, background) >= 3 else text
    return Theme(primary=primary, on_primary=_readable_on(primary), background=background,
                 text=text, accent=accent, background_url=safe_url(s.background_url),
                 adjusted=adjusted)


DEFAULT_THEME = theme_of(_DEFAULTS)


# --------------------------------------------------------------------------------------------
# Events as the pages show them


@dataclass(frozen=True)
class Game:
    id: str
    summary: str
    location: str
    description: str
    date_text: str  # in the venue's zone
    time_text: str  # "" for an all-day event
    tz_abbr: str  # CEST
    tzid: str  # Europe/Berlin
    start_iso: str  # with the venue's UTC offset (a date for all-day events)
    end_iso: str
    all_day: bool
    recurring: bool
    cancelled: bool
    url: str

    @property
    def when(self) -> str:
        if self.all_day:
            return f"{self.date_text}, all day"
        return f"{self.date_text}, {self.time_text} {self.tz_abbr}"


def _zone(tzid: str) -> tuple[tzinfo, str]:
    if tzid and tzid.upper() != "UTC":
        try:
            return zoneinfo.ZoneInfo(tzid), tzid
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            pass
    return UTC, "UTC"


def _day(d: datetime) -> str:
    return f"{d:%a} {d.day} {d:%b %Y}"


def game_of(svc: Services, e: Event) -> Game:
    zone, tzid = _zone(e.tzid)
    if e.all_day:
        start_date = e.start_at.date()
        last = (e.end_at - timedelta(days=1)).date() if e.end_at > e.start_at else start_date
        date_text, time_text, abbr = _day(e.start_at), "", ""
        start_iso, end_iso = start_date.isoformat(), max(last, start_date).isoformat()
    else:
        start, end = e.start_at.astimezone(zone), e.end_at.astimezone(zone)
        date_text, time_text, abbr = _day(start), f"{start:%H:%M}", start.tzname() or tzid
        start_iso, end_iso = start.isoformat(), end.isoformat()
    return Game(id=e.public_id, summary=e.summary or "(untitled event)", location=e.location,
                description=e.description, date_text=date_text, time_text=time_text,
                tz_abbr=abbr, tzid=tzid, start_iso=start_iso, end_iso=end_iso,
                all_day=e.all_day, recurring=e.recurring, cancelled=e.status == "cancelled",
                url=svc.page_url(e.public_id))


def upcoming(svc: Services, e: Event) -> bool:
    """Not over yet (for a series: its last occurrence)."""
    return max(e.rsvp_until, e.end_at) >= svc.now()


def event_ld(g: Game, organizer: str, image: str = "") -> dict[str, Any]:
    """schema.org Event for one game."""
    data: dict[str, Any] = {
        "@context": "https://schema.org", "@type": "Event", "name": g.summary,
        "startDate": g.start_iso, "endDate": g.end_iso,
        "eventStatus": ("https://schema.org/EventCancelled" if g.cancelled
                        else "https://schema.org/EventScheduled"),
        "eventAttendanceMode": "https://schema.org/OfflineEventAttendanceMode",
        "url": g.url,
    }
    if g.location:
        data["location"] = {"@type": "Place", "name": g.location, "address": g.location}
    if g.description:
        data["description"] = g.description[:1000]
    if organizer:
        data["organizer"] = {"@type": "Organization", "name": organizer}
    if image:
        data["image"] = [image]
    return data


def json_script(data: Any) -> Markup:
    """JSON for a <script type="application/ld+json"> element: nothing in it can end the
    element or start a comment."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return Markup(text)  # noqa: S704


def _squash(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


@dataclass
class View:
    """What page.html and confirm.html show, for a /p page and an /e page alike."""

    kind: str  # "page" | "event"
    title: str
    intro: str
    layout: str
    theme: Theme
    logo_url: str
    games: list[Game]
    action: str  # where the form posts (a path of ours)
    canonical: str
    description: str
    organizer: str
    open: bool = True  # the form is offered
    closed_text: str = "This event has been cancelled."  # said instead, on an event page
    max_games: int = MAX_EVENTS  # most games one request may pick (see max_games())

    def context(self) -> dict[str, Any]:
        ld = [event_ld(g, self.organizer, self.logo_url) for g in self.games]
        return {
            "view": self, "title": self.title, "theme_css": self.theme.css(),
            "has_bg_image": bool(self.theme.background_url),
            "jsonld": json_script(ld[0] if len(ld) == 1 else ld),
        }


def page_view(svc: Services, page: Page, evs: Sequence[Event]) -> View:
    return settings_view(svc, pages_svc.settings_of(page), evs, page.slug)


def settings_view(svc: Services, s: pages_svc.PageSettings, evs: Sequence[Event],
                  slug: str) -> View:
    games = [game_of(svc, e) for e in evs]
    title = s.title or (games[0].summary if len(games) == 1 else "Upcoming events")
    if s.intro:
        description = _squash(s.intro)
    elif len(games) == 1:
        g = games[0]
        description = g.when + (f" · {g.location}" if g.location else "")
    elif games:
        description = f"{len(games)} games, {games[0].date_text} to {games[-1].date_text}. " \
                      "Get the calendar invites."
    else:
        description = "No upcoming games right now."
    organizer = next((e.organizer_name for e in evs if e.organizer_name), "") or s.title
    return View(kind="page", title=title, intro=s.intro,
                layout=s.layout if s.layout in pages_svc.LAYOUTS else "list",
                theme=theme_of(s), logo_url=safe_url(s.logo_url), games=games,
                action=f"/p/{slug}", canonical=f"{svc.config.base_url}/p/{slug}",
                description=description, organizer=organizer, open=bool(games),
                max_games=max_games(svc))


def event_view(svc: Services, e: Event) -> View:
    g = game_of(svc, e)
    return View(kind="event", title=g.summary, intro="", layout="single", theme=DEFAULT_THEME,
                logo_url="", games=[g], action=f"/e/{e.public_id}", canonical=g.url,
                description=_squash(g.when + (f" · {g.location}" if g.location else "")),
                # the organizer's name, else only their domain: a public page must not hand
                # their mailbox to address harvesters
                organizer=e.organizer_name or e.organizer_email.rpartition("@")[2],
                open=not g.cancelled and upcoming(svc, e),
                closed_text="This event has been cancelled." if g.cancelled
                else "This event is over.")


# --------------------------------------------------------------------------------------------
# The invite form: one POST handler for /p/{slug} and /e/{id}, HTML or JSON (page.js)


@dataclass
class InviteForm:
    email: str
    name: str
    chosen: list[str]
    honeypot: bool


def max_games(svc: Services) -> int:
    """Most games one public request (page form, email call to action, API) may ask for:
    the API's MAX_EVENTS, and never more than one mailbox's daily invite allowance
    ([web] rate_limit_invites_per_address, which counts one invite per game): a request
    above that could never pass rate_limit(), and "try again later" would be untrue."""
    cap = svc.config.web.rate_limit_invites_per_address
    return min(MAX_EVENTS, cap) if cap > 0 else MAX_EVENTS


def too_many_games(svc: Services, count: int) -> str:
    """The refusal for a request over max_games(), or "" when it fits. Requests are refused
    whole, never cut short: cutting would answer "Done!" for games that were never sent."""
    limit = max_games(svc)
    if count <= limit:
        return ""
    return (f"Pick at most {limit} games at a time (you picked {count}); "
            "send the others in a second request.")


def _split_ids(values: Sequence[object]) -> list[str]:
    """Event ids from form or query values ("A,B" or repeated), without duplicates. All of
    them: callers refuse too many (too_many_games) rather than drop some silently."""
    out: list[str] = []
    for value in values:
        if isinstance(value, str):
            out.extend(p.strip() for p in value.split(",") if p.strip())
    return list(dict.fromkeys(out))


async def read_invite_form(request: Request) -> InviteForm:
    form = await request.form()
    return InviteForm(email=str(form.get("email", "") or "").strip()[:320],
                      name=str(form.get("name", "") or "").strip()[:200],
                      chosen=_split_ids(form.getlist("events")),
                      honeypot=bool(str(form.get("website", "") or "")))


def wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "").lower()


def _message(email: str, sent: Sequence[bool]) -> str:
    new = sum(sent)
    if len(sent) == 1:
        return (f"Done! The invite is on its way to {email}." if new
                else f"{email} already has this invite.")
    if new == len(sent):
        return f"Done! {new} invites are on their way to {email}."
    if new:
        return (f"Done! {new} new invites are on their way to {email}; "
                "the others you already had.")
    return f"{email} already has these invites."


def confirmation(request: Request, view: View, email: str, results: Sequence[tuple[Game, bool]],
                 back_url: str) -> Response:
    message = _message(email, [sent for _, sent in results])
    if wants_json(request):
        return JSONResponse({"ok": True, "email": email, "message": message, "games": [
            asdict(g) | {"when": g.when, "sent": sent} for g, sent in results]})
    ctx = view.context() | {"title": f"Invites sent · {view.title}"}
    return render(request, "confirm.html", message=message, email=email, results=results,
                  back_url=back_url, **ctx, headers=_PRIVATE)


class _Closed(Exception):
    pass


async def submit(request: Request, svc: Services, view: View, offered: Sequence[Event],
                 origin: str) -> Response:
    """Subscribe the address to the chosen games among ``offered``: one invite each."""
    form = await read_invite_form(request)
    chosen = form.chosen
    if not chosen and len(offered) == 1:
        chosen = [offered[0].public_id]
    wanted = set(chosen)
    picked = [e for e in offered if e.public_id in wanted]

    def fail(status: int, code: str, message: str, field: str = "",
             headers: dict[str, str] | None = None) -> Response:
        if wants_json(request):
            return JSONResponse({"ok": False, "error": {"code": code, "message": message,
                                                        "field": field}},
                                status_code=status, headers=headers)
        return render(request, "page.html", status, headers=headers, email=form.email,
                      name=form.name, selected=chosen, message=message, error=True,
                      error_field=field, **view.context())

    if form.honeypot:  # only bots fill it: answer like success, send nothing
        return confirmation(request, view, form.email, [(game_of(svc, e), True) for e in picked],
                            view.action)
    too_many = too_many_games(svc, len(wanted))
    if too_many:
        return fail(422, "too_many_events", too_many, "events")
    try:
        email = subscriptions.check_recipient(svc, form.email)
    except subscriptions.InvalidAddress:
        return fail(422, "invalid_email", "Please enter a valid email address.", "email")
    if len(picked) != len(wanted):
        return fail(409, "not_offered", "A game you picked is no longer offered; "
                    "please check your choice.", "events")
    if not picked:
        return fail(422, "no_events", "Please pick at least one game.", "events")
    try:
        rate_limit(request, svc, email, [e.public_id for e in picked])
    except ApiError as exc:
        return fail(exc.status, exc.code, "Too many requests; please try again later.",
                    headers=exc.headers)
    results: list[tuple[Game, bool]] = []
    try:
        async with svc.sessions.begin() as session:
            for e in picked:
                event = await session.get(Event, e.id)
                if event is None or event.status == "cancelled":
                    raise _Closed(e.summary)
                result = await subscriptions.invite(svc, session, event, email, form.name,
                                                    "page", origin=origin)
                results.append((game_of(svc, event), result.queued))
    except (_Closed, subscriptions.EventClosed):
        return fail(409, "cancelled", "A game you picked has just been cancelled; "
                    "please check your choice.", "events")
    return confirmation(request, view, email, results, view.action)


# --------------------------------------------------------------------------------------------
# /p/{slug}


async def _load_page(svc: Services, slug: str) -> tuple[Page, list[Event]] | None:
    if len(slug) > 80:
        return None
    async with svc.sessions() as session:
        page = await pages_svc.by_slug(session, slug)
        if page is None:
            return None
        evs = [e for e in await pages_svc.events_of(session, page) if upcoming(svc, e)]
        return page, evs


@router.get("/p/{slug}", response_class=HTMLResponse)
async def page_get(slug: str, request: Request) -> Response:
    svc: Services = request.app.state.svc
    loaded = await _load_page(svc, slug)
    if loaded is None:
        return not_found(request)
    view = page_view(svc, *loaded)
    selected = [g.id for g in view.games] if len(view.games) == 1 else []
    return render(request, "page.html", selected=selected, email="", name="",
                  **view.context())


@router.post("/p/{slug}", response_class=HTMLResponse)
async def page_post(slug: str, request: Request) -> Response:
    svc: Services = request.app.state.svc
    loaded = await _load_page(svc, slug)
    if loaded is None:
        if wants_json(request):
            return JSONResponse({"ok": False, "error": {"code": "not_found",
                                 "message": "This page does not exist.", "field": ""}}, 404)
        return not_found(request)
    page, evs = loaded
    return await submit(request, svc, page_view(svc, page, evs), evs, origin=page.slug)


def render_page(request: Request, settings: pages_svc.PageSettings,
                evs: Sequence[Event]) -> Response:
    """A page as it would look with these (unsaved) settings, for the console's preview: the
    form is shown but inactive, so a preview never subscribes anybody."""
    svc: Services = request.app.state.svc
    view = settings_view(svc, pages_svc.check(settings), [e for e in evs if upcoming(svc, e)],
                         "preview")
    view.action, view.canonical = "", ""
    selected = [g.id for g in view.games] if len(view.games) == 1 else []
    response = render(request, "page.html", selected=selected, email="", name="", preview=True,
                      headers={"X-Robots-Tag": "noindex, nofollow", "Cache-Control": "no-store"},
                      **view.context())
    response.headers["Content-Security-Policy"] = csp(nonce_of(request), "'none'")
    return response


# --------------------------------------------------------------------------------------------
# /e/{id}: one event, the single layout (routes in pages.py)


async def _find_event(svc: Services, ref: str) -> Event | None:
    async with svc.sessions() as session:
        try:
            return await events_svc.find(session, ref)
        except events_svc.NotFound:
            return None


async def event_page(request: Request, ref: str) -> Response:
    svc: Services = request.app.state.svc
    event = await _find_event(svc, ref)
    if event is None:
        return not_found(request, "Event not found")
    view = event_view(svc, event)
    return render(request, "event.html", selected=[event.public_id], email="", name="",
                  **view.context())


async def event_submit(request: Request, ref: str) -> Response:
    svc: Services = request.app.state.svc
    event = await _find_event(svc, ref)
    if event is None:
        return not_found(request, "Event not found")
    view = event_view(svc, event)
    if not view.open:  # cancelled, or over: nothing to sign up for
        code = "cancelled" if event.status == "cancelled" else "over"
        if wants_json(request):
            return JSONResponse({"ok": False, "error": {"code": code, "message":
                                 view.closed_text, "field": ""}}, 409)
        return render(request, "event.html", 409, selected=[], message=view.closed_text,
                      error=True, email="", name="", **view.context())
    return await submit(request, svc, view, [event], origin="event-page")


# --------------------------------------------------------------------------------------------
# Email call to action: /i/{id}?email=ADDRESS and /i?events=A,B&email=ADDRESS

CTA_HOURS = 3  # a confirmation page's button works for 2 to 3 hours


def cta_token(secret: bytes, event_ids: Sequence[str], email: str, hour: int) -> str:
    msg = "\0".join(("email-cta", ",".join(sorted(event_ids)), email, str(hour)))
    return hmac.new(secret, msg.encode(), hashlib.sha256).hexdigest()[:32]


def cta_token_ok(secret: bytes, event_ids: Sequence[str], email: str, token: str,
                 now: datetime) -> bool:
    hour = int(now.timestamp()) // 3600
    ok = False
    for h in range(hour, hour - CTA_HOURS, -1):
        ok |= hmac.compare_digest(cta_token(secret, event_ids, email, h), token)
    return ok


def _merged_address(raw: str) -> str:
    """A mailing tool may merge a+b@x.org into the query unencoded: '+' then reads as a
    space, which no address contains."""
    return raw.strip().replace(" ", "+")[:320]


async def _cta_events(svc: Services, refs: Sequence[str]) -> list[Event] | None:
    if not refs:
        return None
    found: dict[int, Event] = {}
    async with svc.sessions() as session:
        for ref in refs:  # callers have refused more than max_games() (_cta_too_many)
            try:
                event = await events_svc.find(session, ref)
            except events_svc.NotFound:
                return None
            found.setdefault(event.id, event)
    return sorted(found.values(), key=lambda e: (e.start_at, e.id))


def _cta_render(request: Request, svc: Services, evs: Sequence[Event], action: str,
                email: str, status: int = 200, message: str = "", error: bool = False) -> Response:
    open_ids = [e.public_id for e in evs if e.status != "cancelled"]
    valid = True
    try:
        email = subscriptions.check_email(email)
    except subscriptions.InvalidAddress:
        valid = False
    token = (cta_token(svc.book.secret, open_ids, email, int(svc.now().timestamp()) // 3600)
             if valid and open_ids else "")
    games = [game_of(svc, e) for e in evs]
    title = (games[0].summary if len(games) == 1 else f"{len(games)} games") + \
        " · add to your calendar"
    return render(request, "cta.html", status, headers=_PRIVATE, title=title, games=games,
                  open_count=len(open_ids), events_value=",".join(open_ids), action=action,
                  email=email if valid else "", typed=email, email_ok=valid, token=token,
                  message=message, error=error, theme_css=DEFAULT_THEME.css())


def _cta_too_many(request: Request, svc: Services, count: int) -> Response | None:
    """The refusal of a link (or its form) naming more games than one request may add, or
    None. The whole link is refused: showing and sending only the first games would tell
    the reader "Done!" about games never sent. The reader cannot fix a link, so the page
    says who can; the console never makes such links (console.snippets)."""
    if count <= max_games(svc):
        return None
    message = (f"This link lists {count} games, but at most {max_games(svc)} can be added "
               "at a time. Please ask the organizer for a link with fewer games.")
    return render(request, "cta.html", 422, headers=_PRIVATE,
                  title="Too many games · add to your calendar", games=[], open_count=0,
                  events_value="", action="/i", email="", typed="", email_ok=False, token="",
                  message=message, error=True, theme_css=DEFAULT_THEME.css())


async def _cta_get(request: Request, refs: Sequence[str], action: str) -> Response:
    svc: Services = request.app.state.svc
    refused = _cta_too_many(request, svc, len(refs))
    if refused is not None:
        return refused
    evs = await _cta_events(svc, refs)
    if evs is None:
        return not_found(request, "Event not found")
    raw = _merged_address(request.query_params.get("email", ""))
    message = ""
    if raw and "@" in raw:
        try:
            subscriptions.check_email(raw)
        except subscriptions.InvalidAddress:
            message = "That address does not look right; please type it again."
    return _cta_render(request, svc, evs, action, raw, message=message, error=bool(message))


async def _cta_post(request: Request, refs: Sequence[str] | None, action: str) -> Response:
    svc: Services = request.app.state.svc
    form = await request.form()
    refs = list(refs) if refs else _split_ids(form.getlist("events"))
    refused = _cta_too_many(request, svc, len(refs))
    if refused is not None:
        return refused
    evs = await _cta_events(svc, refs)
    if evs is None:
        return not_found(request, "Event not found")
    raw = _merged_address(str(form.get("email", "") or ""))
    open_evs = [e for e in evs if e.status != "cancelled"]
    if not open_evs:
        return _cta_render(request, svc, evs, action, raw, 409,
                           "This event is cancelled." if len(evs) == 1
                           else "These events are cancelled.", error=True)
    try:
        email = subscriptions.check_recipient(svc, raw)
    except subscriptions.InvalidAddress:
        return _cta_render(request, svc, evs, action, raw, 422,
                           "Please enter a valid email address.", error=True)
    token = str(form.get("token", "") or "")
    if not cta_token_ok(svc.book.secret, [e.public_id for e in open_evs], email, token,
                        svc.now()):
        # Refused: nothing is sent. A person whose page got old just clicks once more.
        return _cta_render(request, svc, evs, action, email, 403,
                           "This confirmation has expired. Please confirm once more.",
                           error=True)
    try:
        rate_limit(request, svc, email, [e.public_id for e in open_evs])
    except ApiError as exc:
        resp = _cta_render(request, svc, evs, action, email, exc.status,
                           "Too many requests; please try again later.", error=True)
        resp.headers.update(exc.headers or {})
        return resp
    results: list[tuple[Game, bool]] = []
    try:
        async with svc.sessions.begin() as session:
            for e in open_evs:
                event = await session.get(Event, e.id)
                if event is None or event.status == "cancelled":
                    raise _Closed(e.summary)
                result = await subscriptions.invite(svc, session, event, email, "", "page",
                                                    origin="email-cta")
                results.append((game_of(svc, event), result.queued))
    except (_Closed, subscriptions.EventClosed):
        return _cta_render(request, svc, evs, action, email, 409,
                           "An event has just been cancelled; please check again.", error=True)
    games = [g for g, _ in results]
    view = View(kind="cta", title=games[0].summary if len(games) == 1 else f"{len(games)} games",
                intro="", layout="list", theme=DEFAULT_THEME, logo_url="", games=games,
                action=action, canonical="", description="", organizer="")
    back = f"/e/{quote(games[0].id, safe='')}" if len(games) == 1 else ""
    return confirmation(request, view, email, results, back)


def _cta_action(refs: Sequence[str]) -> str:
    if len(refs) == 1:
        return f"/i/{quote(refs[0], safe='')}"
    return "/i?events=" + quote(",".join(refs), safe=",")


@router.get("/i/{event_id}", response_class=HTMLResponse)
async def cta_one(event_id: str, request: Request) -> Response:
    return await _cta_get(request, [event_id], _cta_action([event_id]))


@router.post("/i/{event_id}", response_class=HTMLResponse)
async def cta_one_post(event_id: str, request: Request) -> Response:
    return await _cta_post(request, [event_id], _cta_action([event_id]))


@router.get("/i", response_class=HTMLResponse)
async def cta_many(request: Request) -> Response:
    refs = _split_ids(request.query_params.getlist("events"))
    return await _cta_get(request, refs, "/i")


@router.post("/i", response_class=HTMLResponse)
async def cta_many_post(request: Request) -> Response:
    return await _cta_post(request, None, "/i")


# --------------------------------------------------------------------------------------------
# Snippets for the console


def embed_snippets(base_url: str, event_ids: Sequence[str],
                   label: str = "Add to my calendar") -> dict[str, str]:
    """What an organizer copies for one event or several (a season):

    - ``button_html``: ``<script src=…/embed.js data-event(s)=… async>`` for a web site, plus
      a ``<noscript>`` link for visitors without JavaScript;
    - ``email_link``: the call-to-action URL with a ``{{email}}`` merge tag (most mailing
      tools), ``email_link_mailchimp`` the same with ``*|EMAIL|*``;
    - ``email_button_html``: that link as an email-safe button (inline styles, no script);
    - ``page_url``: the page without an address (the event page, or the call to action
      asking for the address for several events).
    """
    base = base_url.rstrip("/")
    ids = list(dict.fromkeys(i.strip() for i in event_ids if i.strip()))
    if not ids:
        raise ValueError("embed_snippets: give at least one event id")
    if len(ids) > MAX_EVENTS:  # the server would refuse the button's and the link's requests
        raise ValueError(f"embed_snippets: at most {MAX_EVENTS} event ids, not {len(ids)}")
    if len(ids) == 1:
        attr = f'data-event="{escape(ids[0])}"'
        page = f"{base}/e/{quote(ids[0], safe='')}"
        cta, sep = f"{base}/i/{quote(ids[0], safe='')}", "?"
    else:
        attr = f'data-events="{escape(",".join(ids))}"'
        cta = page = f"{base}/i?events={quote(','.join(ids), safe=',')}"
        sep = "&"
    email_link = f"{cta}{sep}email={{{{email}}}}"
    button = (f'<script src="{escape(base)}/embed.js" {attr} data-label="{escape(label)}" '
              f'async></script>\n<noscript><a href="{escape(page)}">{escape(label)}</a>'
              "</noscript>")
    email_button = (
        f'<a href="{escape(email_link)}" style="display:inline-block;padding:12px 22px;'
        "background:#0b57d0;color:#ffffff;font-family:Arial,Helvetica,sans-serif;"
        f'font-size:16px;font-weight:bold;text-decoration:none;border-radius:6px">'
        f"{escape(label)}</a>")
    return {"button_html": button, "email_link": email_link,
            "email_link_mailchimp": f"{cta}{sep}email=*|EMAIL|*",
            "email_button_html": email_button, "page_url": page}

