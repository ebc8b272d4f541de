"""The organizer console under /console: sign-in by magic link, events with live answer
counts and charts, each event's report (figures, answers over time, per occurrence, where
customers came from, the CSV), and the page configurator with a live preview.

Server-rendered (Jinja2, autoescaped). Charts are SVG drawn by :mod:`ciserver.services.charts`
(which escapes every text it draws) and inlined, each with its numbers in a table.
JavaScript (/console/static/console.js) only polls the counts and refreshes the preview, and
every page works without it. How links, sessions and CSRF tokens work is told in
:mod:`ciserver.services.auth`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import secrets
import zoneinfo
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources
from types import ModuleType
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.background import BackgroundTask
from starlette.datastructures import ImmutableMultiDict

from ..addresses import normalize_email
from ..services import auth, charts, events, pages, reports
from ..services.auth import ConsoleAuth, SessionClaims
from ..services.context import Services
from ..services.subscriptions import InvalidAddress, check_email
from ..store.models import Event, Page
from .api import client_ip, counts_for
from .ratelimit import RateLimiter

router = APIRouter(prefix="/console", include_in_schema=False)

SESSION_COOKIE = "ci_session"
FORM_COOKIE = "ci_form"  # binds the CSRF token of the sign-in forms (no session yet)
FORM_COOKIE_AGE = 7200
MAX_EVENTS = 1000
CHART_GAMES = 40  # bars in the home page's chart
CHART_OCCURRENCES = 60  # bars in an event's per-occurrence chart
TIMELINE_ROWS = 60  # rows of the table under the answers-over-time chart
CHART_WIDTH = 1080  # the console's main column; smaller screens scale the charts down
STATIC_FILES = {"console.css": "text/css; charset=utf-8",
                "console.js": "text/javascript; charset=utf-8"}

CONSOLE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; "
               "img-src 'self' https: data:; connect-src 'self'; frame-src 'self'; "
               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
# For a preview answer without a policy of its own when the public pages give none either.
PUBLIC_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' https: data:; "
              "base-uri 'none'")

_TEMPLATES = resources.files("ciserver.web") / "templates"
_STATIC = resources.files("ciserver.web") / "static"
_env = Environment(loader=FileSystemLoader(str(_TEMPLATES)),
                   autoescape=select_autoescape(default=True, default_for_string=True))
_CSS_URL_OK = pages._check_url  # the same rule pages.check applies


def _css_url(value: str) -> Markup:
    """An https URL for CSS url("..."): pages.check admitted it (no quotes, parentheses,
    backslashes, spaces or angle brackets); checked again here, since <style> text is not
    HTML-escaped."""
    try:
        ok = bool(value) and _CSS_URL_OK("url", value) == value
    except pages.PageError:
        ok = False
    return Markup(value) if ok else Markup("")  # noqa: S704 - checked just above


def _css_color(value: str) -> Markup:
    ok = bool(pages._COLOR.match(value or ""))
    return Markup(value if ok else "#000000")  # noqa: S704 - #rrggbb only


_env.filters["css_url"] = _css_url
_env.filters["css_color"] = _css_color


# --------------------------------------------------------------------------------------------
# Plumbing


def _svc(request: Request) -> Services:
    svc: Services = request.app.state.svc
    return svc


def _auth(request: Request) -> ConsoleAuth:
    state = request.app.state
    found: ConsoleAuth | None = getattr(state, "console_auth", None)
    if found is None:
        svc = _svc(request)
        found = state.console_auth = ConsoleAuth(svc.book.secret,
                                                 svc.config.web.console_session_lifetime)
    return found


def _login_limiter(request: Request) -> RateLimiter:
    state = request.app.state
    found: RateLimiter | None = getattr(state, "console_login_limiter", None)
    if found is None:
        found = state.console_login_limiter = RateLimiter(
            _svc(request).config.web.rate_limit_per_address, 3600.0)
    return found


def _https(svc: Services) -> bool:
    return svc.config.base_url.startswith("https://")


def secure(response: Response, csp: str = CONSOLE_CSP, frame: str = "DENY") -> Response:
    """The console's own headers (the app's middleware only fills in missing ones)."""
    response.headers["Content-Security-Policy"] = csp
    response.headers["X-Frame-Options"] = frame
    response.headers["Referrer-Policy"] = "no-referrer"  # sign-in tokens live in URLs
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cross-Origin-Opener-Policy"] = "same-origin"
    return response


def _render(template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    html = _env.get_template(f"console/{template}").render(**ctx)
    return HTMLResponse(html, status_code=status)


@dataclass
class Visit:
    """One request's view of who is signed in."""

    request: Request
    svc: Services
    auth: ConsoleAuth
    now: datetime
    session: SessionClaims | None  # an authentic, unexpired session cookie
    who: SessionClaims | None  # ... of an address that may (still) organize
    form_binding: str | None  # the pre-session cookie's value, if any
    new_binding: str | None = None  # set on the response when we made one

    @property
    def binding(self) -> str | None:
        """What this visitor's CSRF token is bound to: the session, else the pre-session
        cookie."""
        if self.session is not None:
            return self.session.sid
        return self.form_binding or self.new_binding

    def csrf(self) -> str:
        if self.binding is None:
            self.new_binding = auth.new_binding()
        binding = self.binding
        assert binding is not None
        return self.auth.csrf_token(binding)

    def page(self, template: str, status: int = 200, **ctx: Any) -> Response:
        ctx.setdefault("title", "Console")
        response = _render(template, status, who=self.who.email if self.who else "",
                           csrf=self.csrf(), **ctx)
        if self.new_binding and self.session is None:
            response.set_cookie(FORM_COOKIE, self.new_binding, max_age=FORM_COOKIE_AGE,
                                path="/console", secure=_https(self.svc), httponly=True,
                                samesite="lax")
        return secure(response)


async def _visit(request: Request) -> Visit:
    """Who is signed in: a valid session cookie of an address that may still organize."""
    svc = _svc(request)
    now = svc.now()
    console_auth = _auth(request)
    async with svc.sessions() as session:  # connects only for an authentic session cookie
        claims = await console_auth.read_session(session, request.cookies.get(SESSION_COOKIE),
                                                 now)
        who = claims
        if claims is not None and not await auth.may_organize(svc, session, claims.email):
            who = None
    return Visit(request, svc, console_auth, now, claims, who,
                 request.cookies.get(FORM_COOKIE))


def _to_login() -> Response:
    return secure(RedirectResponse("/console/login", status_code=303))


def _refused(v: Visit) -> Response:
    return v.page("message.html", 403, title="Form refused", heading="Form refused",
                  text="This form has expired or was sent from another site. Go back, reload "
                       "the page and try again.", link="/console")


async def _posted(request: Request, v: Visit) -> ImmutableMultiDict[str, Any] | None:
    """The form of a POST if its CSRF token matches this visitor, else None (refuse: 403)."""
    if request.headers.get("sec-fetch-site", "").lower() == "cross-site":
        return None
    form = await request.form()
    token = form.get("csrf")
    if not isinstance(token, str) or not v.auth.csrf_ok(v.binding, token):
        return None
    return form


# --------------------------------------------------------------------------------------------
# Static files


@router.get("/static/{name}")
async def static(name: str) -> Response:
    ctype = STATIC_FILES.get(name)
    if ctype is None:
        return Response("not found", status_code=404, media_type="text/plain")
    body = (_STATIC / name).read_bytes()
    return Response(body, media_type=ctype, headers={
        "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})


# --------------------------------------------------------------------------------------------
# Sign-in


@router.get("/login")
async def login_form(request: Request) -> Response:
    v = await _visit(request)
    if v.who is not None:
        return secure(RedirectResponse("/console", status_code=303))
    signed_out = request.query_params.get("signed_out") == "1"
    return v.page("login.html", title="Sign in", email="", signed_out=signed_out)


@router.post("/login")
async def login_send(request: Request) -> Response:
    v = await _visit(request)
    form = await _posted(request, v)
    if form is None:
        return _refused(v)
    svc = v.svc
    raw = str(form.get("email", "")).strip()[:400]
    wait = request.app.state.ip_limiter.hit(client_ip(request, svc.config.web.trusted_proxies))
    try:
        email = check_email(raw)
    except InvalidAddress:
        email = ""
    if not wait and email:
        wait = _login_limiter(request).hit(email)
    if wait:
        response = v.page("login.html", 429, title="Sign in", email=raw,
                          error="Too many sign-in requests; please try again later.")
        response.headers["Retry-After"] = str(int(wait) + 1)
        return response
    if not email:
        return v.page("login.html", 422, title="Sign in", email=raw,
                      error="Please enter a valid email address.")
    # The same answer whether or not the address may sign in, and in the same time: whether
    # it may, and the mail, are dealt with after the answer has been sent.
    response = v.page("message.html", title="Check your mailbox", heading="Check your mailbox",
                      text=f"If {email} may sign in, a sign-in link is on its way. It is valid "
                           f"for 15 minutes and works once.", link="/console/login",
                      link_text="Ask for another link")
    response.background = BackgroundTask(_send_link, svc, v.auth, email, v.now)
    return response


async def _send_link(svc: Services, console_auth: ConsoleAuth, email: str,
                     now: datetime) -> None:
    async with svc.sessions.begin() as session:
        if await auth.may_organize(svc, session, email):
            token = console_auth.link_token(email, now)
            url = f"{svc.config.base_url}/console/auth?token={quote(token, safe='')}"
            await auth.mail_link(svc, session, email, url)


async def _link_problem(v: Visit, session: AsyncSession, token: str
                        ) -> tuple[auth.LinkClaims | None, str]:
    claims = v.auth.read_link(token, v.now)
    if claims is None:
        return None, ("This sign-in link is not valid or has expired (links work for 15 "
                      "minutes). Ask for a new one.")
    if await v.auth.link_used(session, claims):
        return None, "This sign-in link was already used. Ask for a new one."
    return claims, ""


@router.get("/auth")
async def auth_confirm(request: Request, token: str = "") -> Response:
    # A GET never signs in: mail security scanners open links. The button POSTs.
    v = await _visit(request)
    async with v.svc.sessions() as session:
        claims, problem = await _link_problem(v, session, token)
    if claims is None:
        return v.page("message.html", 400, title="Sign-in link", heading="Sign-in link",
                      text=problem, link="/console/login", link_text="Ask for a new link")
    return v.page("auth.html", title="Sign in", email=claims.email, token=token)


@router.post("/auth")
async def auth_signin(request: Request) -> Response:
    v = await _visit(request)
    form = await _posted(request, v)
    if form is None:
        return _refused(v)
    token = str(form.get("token", ""))
    async with v.svc.sessions() as session:
        claims, problem = await _link_problem(v, session, token)
        if claims is not None and not await auth.may_organize(v.svc, session, claims.email):
            claims, problem = None, "This address may not use the console any more."
    # The insert of the nonce decides, on every instance sharing the database: one use wins.
    if claims is not None and not await v.auth.consume_link(v.svc.sessions, claims, v.now):
        claims, problem = None, "This sign-in link was already used. Ask for a new one."
    if claims is None:
        return v.page("message.html", 400, title="Sign-in link", heading="Sign-in link",
                      text=problem, link="/console/login", link_text="Ask for a new link")
    value, _claims = v.auth.new_session(claims.email, v.now)
    response = RedirectResponse("/console", status_code=303)  # a fixed, relative target
    response.set_cookie(SESSION_COOKIE, value,
                        max_age=int(v.auth.session_lifetime.total_seconds()), path="/console",
                        secure=_https(v.svc), httponly=True, samesite="lax")
    response.delete_cookie(FORM_COOKIE, path="/console", secure=_https(v.svc), httponly=True,
                           samesite="lax")
    return secure(response)


@router.post("/logout")
async def logout(request: Request) -> Response:
    v = await _visit(request)
    form = await _posted(request, v)
    if form is None:
        return _refused(v)
    if v.session is not None:
        await v.auth.end_session(v.svc.sessions, v.session, v.now)
    response = RedirectResponse("/console/login?signed_out=1", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/console", secure=_https(v.svc),
                           httponly=True, samesite="lax")
    return secure(response)


# --------------------------------------------------------------------------------------------
# Events and counts


def _local(moment: datetime, tzid: str | None) -> tuple[datetime, str]:
    """``moment`` in the event's time zone (UTC when it has none or an unknown one)."""
    tz = tzid or "UTC"
    try:
        return moment.astimezone(zoneinfo.ZoneInfo(tz)), tz
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return moment.astimezone(UTC), "UTC"


def when_text(event: Event) -> str:
    if event.all_day:
        return f"{event.start_at:%a %d %b %Y} (all day)"
    local, tz = _local(event.start_at, event.tzid)
    return f"{local:%a %d %b %Y, %H:%M} ({tz})" + (", repeating" if event.recurring else "")


def game_label(event: Event) -> str:
    """A bar's label: the local start day, then the summary."""
    day = event.start_at if event.all_day else _local(event.start_at, event.tzid)[0]
    return f"{day:%Y-%m-%d} {event.summary or '(untitled event)'}"


def occurrence_text(key: str, event: Event) -> str:
    """An occurrence key (its start: UTC ISO 8601, or a day) as the organizer reads it."""
    try:
        if "T" not in key:
            return f"{date.fromisoformat(key):%a %d %b %Y}"
        moment = datetime.strptime(key, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return key
    local, _tz = _local(moment, event.tzid)
    return f"{local:%a %d %b %Y, %H:%M}"


SOURCES = {"page": "Sign-up page", "api": "API", "forwarded": "Forwarded invite"}
ORIGINS = {"event-page": "the event's own page", "email-cta": "button in a mailing",
           "public api": "public API (no key)"}


def origin_text(source: str, origin: str) -> str:
    if origin in ORIGINS:
        return ORIGINS[origin]
    if origin.startswith("button "):
        return f"button on {origin[7:]}"
    if source == "page" and origin:
        return f"page /p/{origin}"
    return origin or "—"


async def _my_events(session: Any, who: SessionClaims) -> Sequence[Event]:
    return await events.listing(session, organizer=who.email, limit=MAX_EVENTS)


async def _my_event(session: Any, who: SessionClaims, public_id: str) -> Event | None:
    """The signed-in organizer's event with this API id; another organizer's event is as good
    as missing."""
    ref = public_id.strip().lower()
    if not ref or len(ref) > 64 or not ref.isascii() or not ref.isalnum():
        return None
    event: Event | None = (await session.execute(
        select(Event).where(Event.public_id == ref))).scalar_one_or_none()
    if event is None or event.organizer_email != normalize_email(who.email):
        return None
    return event


def _count_row(event: Event, c: Any) -> dict[str, Any]:
    return {"id": event.public_id, "status": event.status, "Y": c.yes, "N": c.no,
            "M": c.maybe, "no_answer": c.no_answer, "bounced": c.bounced,
            "unsubscribed": c.unsubscribed, "invited": c.invited}


def _counts(c: Any) -> reports.Counts:
    return reports.Counts(invited=c.invited, yes=c.yes, no=c.no, maybe=c.maybe,
                          no_answer=c.no_answer, bounced=c.bounced,
                          unsubscribed=c.unsubscribed)


async def _mine_with_counts(v: Visit) -> list[tuple[Event, Any]]:
    assert v.who is not None
    async with v.svc.sessions() as session:
        mine = await _my_events(session, v.who)
        counts = await counts_for(session, [e.id for e in mine])
    return [(e, counts[e.id]) for e in mine]


def _rows_of(v: Visit, found: list[tuple[Event, Any]]) -> list[dict[str, Any]]:
    rows = []
    for e, c in found:
        row = _count_row(e, c)
        row.update(summary=e.summary, when=when_text(e), start_iso=e.start_at.isoformat(),
                   page_url=v.svc.page_url(e.public_id))
        rows.append(row)
    return rows


def chart_window(found: Sequence[tuple[Event, Any]], now: datetime,
                 size: int = CHART_GAMES) -> list[tuple[Event, Any]]:
    """The games the home chart shows when there are more than ``size`` (in start order):
    from the first one of the last two weeks on, filled up with earlier ones at the end of a
    season."""
    if len(found) <= size:
        return list(found)
    recent = now - timedelta(days=14)
    first = next((i for i, (e, _c) in enumerate(found) if e.start_at >= recent), len(found))
    begin = max(0, min(first, len(found) - size))
    return list(found[begin:begin + size])


def _svg(text: str) -> Markup:
    # charts.py escapes every text it draws (organizer and customer text included) and emits
    # no script, event handler, style or external reference.
    return Markup(text)  # noqa: S704


@router.get("")
async def home(request: Request) -> Response:
    v = await _visit(request)
    if v.who is None:
        return _to_login()
    found = await _mine_with_counts(v)
    rows = _rows_of(v, found)
    shown = chart_window(found, v.now)
    chart = _svg(charts.games_svg(
        [(game_label(e), _counts(c)) for e, c in shown], title="Yes / no / maybe per game",
        width=CHART_WIDTH, more=len(found) - len(shown))) if found else None
    return v.page("home.html", title="Your events", rows=rows, chart=chart,
                  chart_all=len(shown) == len(found), truncated=len(rows) >= MAX_EVENTS)


@router.get("/counts.json")
async def counts_json(request: Request) -> Response:
    v = await _visit(request)
    if v.who is None:
        return secure(JSONResponse(
            {"error": {"code": "unauthorized", "message": "sign in at /console/login"}},
            status_code=401))
    rows = _rows_of(v, await _mine_with_counts(v))
    keys = ("id", "status", "Y", "N", "M", "no_answer", "bounced", "unsubscribed", "invited")
    return secure(JSONResponse({"at": v.now.isoformat(),
                                "events": [{k: r[k] for k in keys} for r in rows]}))


# --------------------------------------------------------------------------------------------
# One event's report


def _no_event(v: Visit) -> Response:
    return v.page("message.html", 404, title="No such event", heading="No such event",
                  text="You have no event with this address.", link="/console")


def timeline_rows(points: Sequence[reports.TimelinePoint],
                  limit: int = TIMELINE_ROWS) -> tuple[list[reports.TimelinePoint], bool]:
    """The chart's points where a figure changed (the last ``limit``), and whether earlier
    ones were left out."""
    changed: list[reports.TimelinePoint] = []
    last: tuple[int, ...] = (0, 0, 0, 0)
    for p in points:
        figures = (p.invited, p.yes, p.no, p.maybe)
        if figures != last:
            changed.append(p)
            last = figures
    return changed[-limit:], len(changed) > limit


@router.get("/events/{public_id}")
async def event_detail(public_id: str, request: Request) -> Response:
    v = await _visit(request)
    if v.who is None:
        return _to_login()
    svc = v.svc
    async with svc.sessions() as session:
        event = await _my_event(session, v.who, public_id)
        if event is None:
            return _no_event(v)
        (one,) = await reports.event_summaries(session, event_id=event.id)
        per = await reports.occurrence_counts(session, event) if event.recurring else []
        sources = await reports.source_summaries(session, event_id=event.id)
        points = await reports.timeline(session, svc.dialect, event_id=event.id,
                                        until=min(v.now, event.rsvp_until))
    name = event.summary or "(untitled event)"
    timeline = _svg(charts.timeline_svg(points, title=f"Answers over time: {name}",
                                        width=CHART_WIDTH, height=360))
    if event.recurring:
        games = [(occurrence_text(occ, event), c) for occ, c in per]
        title = f"Yes / no / maybe per occurrence: {name}"
    else:
        games, title = [(game_label(event), one.counts)], f"Yes / no / maybe: {name}"
    bars = _svg(charts.games_svg(games[:CHART_OCCURRENCES], title=title, width=CHART_WIDTH,
                                 more=max(len(games) - CHART_OCCURRENCES, 0)))
    c = one.counts
    answered = c.yes + c.no + c.maybe
    steps, steps_cut = timeline_rows(points)
    base = f"/console/events/{event.public_id}"
    return v.page(
        "event.html", title=name, event=event, name=name, when=when_text(event),
        counts=c, row=_count_row(event, c), answered=answered,
        rate=round(100 * answered / c.invited) if c.invited else 0,
        page_url=svc.page_url(event.public_id), timeline=timeline, bars=bars,
        steps=steps, steps_cut=steps_cut,
        occurrences=[(occurrence_text(occ, event), oc) for occ, oc in per],
        sources=[{"source": SOURCES.get(s.source, s.source),
                  "origin": origin_text(s.source, s.origin), "c": s.counts} for s in sources],
        csv_url=f"{base}/report.csv", csv_bom_url=f"{base}/report.csv?bom=1")


def _csv(chunks: AsyncIterator[str], filename: str) -> Response:
    """The same CSV as the CLI and the API (services.reports), streamed."""
    return secure(StreamingResponse(
        (chunk.encode("utf-8") async for chunk in chunks), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'}))


@router.get("/events/{public_id}/report.csv")
async def event_csv(public_id: str, request: Request, bom: bool = False) -> Response:
    v = await _visit(request)
    if v.who is None:
        return _to_login()
    async with v.svc.sessions() as session:
        event = await _my_event(session, v.who, public_id)
    if event is None:
        return _no_event(v)
    return _csv(reports.csv_chunks(v.svc, event_id=event.id, bom=bom),
                f"{event.public_id}.csv")


@router.get("/report.csv")
async def organizer_csv(request: Request, bom: bool = False) -> Response:
    """Every answer to every event of the signed-in organizer."""
    v = await _visit(request)
    if v.who is None:
        return _to_login()
    return _csv(reports.csv_chunks(v.svc, organizer=normalize_email(v.who.email), bom=bom),
                "organizer.csv")


# --------------------------------------------------------------------------------------------
# Pages


FIELDS = ("title", "intro", "layout", "color_primary", "color_background", "color_text",
          "logo_url", "background_url", "date_from", "date_to")


def _day(value: str, name: str, end: bool) -> datetime | None:
    value = value.strip()
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise pages.PageError(f"{name}: expected a date like 2027-05-01") from None
    return datetime.combine(day, time(23, 59, 59) if end else time.min, UTC)


def values_of(data: ImmutableMultiDict[str, Any] | None = None,
              settings: pages.PageSettings | None = None, slug: str = "") -> dict[str, Any]:
    """The form's values as strings (what the inputs show), from a submitted form or from
    saved settings."""
    if data is not None:
        out: dict[str, Any] = {f: str(data.get(f, "") or "")[:6000] for f in FIELDS}
        out["events"] = [str(x) for x in data.getlist("events")][:MAX_EVENTS]
        out["slug"] = str(data.get("slug", "") or slug)[:100]
        return out
    s = settings or pages.PageSettings()
    out = {f: getattr(s, f) for f in FIELDS if f not in ("date_from", "date_to")}
    out["date_from"] = s.date_from.date().isoformat() if s.date_from else ""
    out["date_to"] = s.date_to.date().isoformat() if s.date_to else ""
    out["events"] = list(s.event_ids)
    out["slug"] = slug
    return out


def settings_from(values: dict[str, Any], mine: set[str]) -> pages.PageSettings:
    """PageSettings from the form's values, checked (raises PageError naming the field)."""
    defaults = pages.PageSettings()
    chosen = tuple(dict.fromkeys(values["events"]))
    for ident in chosen:
        if ident not in mine:
            raise pages.PageError(f"events: {ident[:40]!r} is not one of your events")
    settings = pages.PageSettings(
        title=values["title"].strip(), intro=values["intro"].strip(),
        layout=values["layout"] or defaults.layout,
        color_primary=values["color_primary"].strip() or defaults.color_primary,
        color_background=values["color_background"].strip() or defaults.color_background,
        color_text=values["color_text"].strip() or defaults.color_text,
        logo_url=values["logo_url"].strip(), background_url=values["background_url"].strip(),
        date_from=_day(values["date_from"], "date_from", end=False),
        date_to=_day(values["date_to"], "date_to", end=True),
        event_ids=chosen)
    return pages.check(settings)


def preview_query(values: dict[str, Any]) -> str:
    pairs = [(f, values[f]) for f in FIELDS if values.get(f)]
    pairs += [("events", e) for e in values.get("events", [])]
    return urlencode(pairs)


def _public() -> ModuleType | None:
    """ciserver.web.public (the public pages), once it exists."""
    try:
        return importlib.import_module("ciserver.web.public")
    except ModuleNotFoundError as exc:
        if exc.name in ("ciserver.web.public",):
            return None
        raise


def share_url(svc: Services, slug: str) -> str:
    return f"{svc.config.base_url}/p/{slug}"


SNIPPET_LABELS = {
    "button_html": "Button for your web site (paste into its HTML)",
    "email_button_html": "Button for a mailing (HTML; the mailing tool fills in the address)",
    "email_link": "Link for a mailing, with the {{email}} merge tag",
    "email_link_mailchimp": "Link for Mailchimp, with the *|EMAIL|* merge tag",
    "page_url": "Link without an address",
}


def snippet_limit(svc: Services) -> int:
    """Most events a button or mailing link may carry: what one public request may ask for
    (public.max_games), so a snippet never makes a link the server refuses."""
    public = _public()
    limit = getattr(public, "max_games", None) if public is not None else None
    return int(limit(svc)) if callable(limit) else 100


def snippets(svc: Services, event_ids: list[str]) -> dict[str, str]:
    """Label -> code to copy, from the public pages' embed_snippets (none before they exist,
    and none for a page that shows no events). At most snippet_limit() events, the page's
    first: page_form.html says so when the page has more (its own address covers them all)."""
    public = _public()
    make = getattr(public, "embed_snippets", None) if public is not None else None
    if make is None or not event_ids:
        return {}
    got = make(svc.config.base_url, event_ids[:snippet_limit(svc)])
    if not isinstance(got, dict):
        return {}
    return {SNIPPET_LABELS.get(str(k), str(k)): str(val) for k, val in got.items()}


async def _owned_page(v: Visit, session: Any, slug: str) -> Page | None:
    assert v.who is not None
    page = await pages.by_slug(session, slug)
    if page is None or page.organizer_email != v.who.email:
        return None  # another organizer's page is as good as missing
    return page


def _event_choices(mine: Sequence[Event]) -> list[dict[str, str]]:
    return [{"id": e.public_id, "summary": e.summary, "when": when_text(e),
             "status": e.status} for e in mine]


async def _editor(v: Visit, *, page: Page | None, values: dict[str, Any], status: int = 200,
                  error: str = "", saved: bool = False) -> Response:
    assert v.who is not None
    async with v.svc.sessions() as session:
        mine = await _my_events(session, v.who)
        shown = [e.public_id for e in await pages.events_of(session, page)] if page else []
    return v.page(
        "page_form.html", status, title=(page.title or page.slug) if page else "New page",
        page=page, values=values, error=error, saved=saved, layouts=pages.LAYOUTS,
        choices=_event_choices(mine), chosen=set(values["events"]),
        preview_src="/console/preview?" + preview_query(values),
        share=share_url(v.svc, page.slug) if page else "",
        snippets=snippets(v.svc, shown) if page else {}, shown=len(shown),
        snippet_limit=snippet_limit(v.svc),
        public_ready=_public() is not None)


@router.get("/pages")
async def page_list(request: Request) -> Response:
    v = await _visit(request)
    if v.who is None:
        return _to_login()
    async with v.svc.sessions() as session:
        found = await pages.of_organizer(session, v.who.email)
        rows = [{"slug": p.slug, "title": p.title, "layout": p.layout,
                 "share": share_url(v.svc, p.slug), "updated": f"{p.updated_at:%Y-%m-%d %H:%M}",
                 "count": len(await pages.events_of(session, p))} for p in found]
    return v.page("pages.html", title="Your pages", rows=rows)


@router.get("/pages/new")
async def page_new(request: Request) -> Response:
    v = await _visit(request)
    if v.who is None:
        return _to_login()
    return await _editor(v, page=None, values=values_of())


@router.post("/pages/new")
async def page_create(request: Request) -> Response:
    v = await _visit(request)
    form = await _posted(request, v)
    if form is None:
        return _refused(v)
    if v.who is None:
        return _to_login()
    values = values_of(form)
    try:
        async with v.svc.sessions.begin() as session:
            mine = {e.public_id for e in await _my_events(session, v.who)}
            settings = settings_from(values, mine)
            slug = values["slug"].strip().lower()
            if slug in ("new",):
                raise pages.PageError(f"slug: {slug!r} is reserved")
            page = await pages.create(v.svc, session, v.who.email, settings, slug=slug)
            slug = page.slug
    except pages.PageError as exc:
        return await _editor(v, page=None, values=values, status=422, error=str(exc))
    return secure(RedirectResponse(f"/console/pages/{quote(slug)}?saved=1", status_code=303))


@router.get("/pages/{slug}")
async def page_edit(slug: str, request: Request) -> Response:
    v = await _visit(request)
    if v.who is None:
        return _to_login()
    async with v.svc.sessions() as session:
        page = await _owned_page(v, session, slug)
    if page is None:
        return v.page("message.html", 404, title="No such page", heading="No such page",
                      text="You have no page with this address.", link="/console/pages")
    return await _editor(v, page=page, values=values_of(settings=pages.settings_of(page),
                                                        slug=page.slug),
                         saved=request.query_params.get("saved") == "1")


@router.post("/pages/{slug}")
async def page_update(slug: str, request: Request) -> Response:
    v = await _visit(request)
    form = await _posted(request, v)
    if form is None:
        return _refused(v)
    if v.who is None:
        return _to_login()
    values = values_of(form, slug=slug)
    async with v.svc.sessions.begin() as session:
        page = await _owned_page(v, session, slug)
        if page is None:
            return v.page("message.html", 404, title="No such page", heading="No such page",
                          text="You have no page with this address.", link="/console/pages")
        mine = {e.public_id for e in await _my_events(session, v.who)}
        try:
            settings = settings_from(values, mine)
        except pages.PageError as exc:
            error = str(exc)  # nothing changed: the transaction commits nothing
        else:
            error = ""
            await pages.update(v.svc, session, page, settings)
    if error:
        return await _editor(v, page=page, values=values, status=422, error=error)
    return secure(RedirectResponse(f"/console/pages/{quote(page.slug)}?saved=1",
                                   status_code=303))


# --------------------------------------------------------------------------------------------
# Preview: the page as it would look with the form's (unsaved) values; nothing is saved.


def frameable(request: Request, response: Response) -> Response:
    """Let the console (and only the console's origin) frame this preview; forms in it go
    nowhere (a preview never subscribes anybody)."""
    csp = response.headers.get("content-security-policy", "")
    if not csp:  # the app's default for public pages, as its middleware would add it
        public = _public()
        make = getattr(public, "csp", None) if public is not None else None
        nonce = str(getattr(request.state, "csp_nonce", ""))
        csp = str(make(nonce)) if make is not None and nonce else PUBLIC_CSP
    parts = [p.strip() for p in csp.split(";") if p.strip() and p.split()[0].lower()
             not in ("frame-ancestors", "form-action")]
    parts += ["form-action 'none'", "frame-ancestors 'self'"]
    response.headers["Content-Security-Policy"] = "; ".join(parts)
    response.headers["X-Frame-Options"] = "SAMEORIGIN"
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


async def _preview(request: Request, v: Visit, data: ImmutableMultiDict[str, Any]) -> Response:
    assert v.who is not None
    values = values_of(data)
    settings: pages.PageSettings | None = None
    shown: list[Event] = []
    error = ""
    async with v.svc.sessions() as session:
        mine = await _my_events(session, v.who)
        try:
            settings = settings_from(values, {e.public_id for e in mine})
        except pages.PageError as exc:
            error = str(exc)
        if settings is not None:
            draft = Page(slug="preview", organizer_email=v.who.email, title=settings.title,
                         intro=settings.intro, layout=settings.layout,
                         color_primary=settings.color_primary,
                         color_background=settings.color_background,
                         color_text=settings.color_text, logo_url=settings.logo_url,
                         background_url=settings.background_url, date_from=settings.date_from,
                         date_to=settings.date_to, event_ids=json.dumps(settings.event_ids))
            shown = list(await pages.events_of(session, draft))
    public = _public()
    render = getattr(public, "render_page", None) if public is not None else None
    if settings is not None and render is not None:
        result = render(request, settings, shown)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Response):
            return frameable(request, result)
    nonce = secrets.token_urlsafe(12)
    html = _render("preview.html", 422 if error else 200, error=error, s=settings,
                   nonce=nonce, events=[{"summary": e.summary, "when": when_text(e),
                                         "location": e.location} for e in shown])
    csp = (f"default-src 'none'; style-src 'nonce-{nonce}'; img-src https: data:; "
           "form-action 'none'; base-uri 'none'")
    return frameable(request, secure(html, csp=csp))


@router.get("/preview")
async def preview_get(request: Request) -> Response:
    v = await _visit(request)
    if v.who is None:
        return _to_login()
    return await _preview(request, v, request.query_params)


@router.post("/preview")
async def preview_post(request: Request) -> Response:
    """The no-JavaScript preview: the editor's "Preview" button posts the form into the
    preview frame."""
    v = await _visit(request)
    form = await _posted(request, v)
    if form is None:
        return _refused(v)
    if v.who is None:
        return _to_login()
    return await _preview(request, v, form)
