"""Server-rendered public pages: an event's page with its invite form (drawn by public.py in
the single-event layout of /p pages), and unsubscribe.

Organizer text reaches HTML only through Jinja2 autoescaping.
"""

from __future__ import annotations

import zoneinfo

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from ..addresses import verify_token
from ..services import subscriptions
from ..services.context import Services
from ..store.models import Event, Subscription
from . import public

router = APIRouter(include_in_schema=False)
_env = public.env  # one template environment for every page


def render(template: str, status: int = 200, **ctx: object) -> HTMLResponse:
    return HTMLResponse(_env.get_template(template).render(**ctx), status_code=status)


def when_text(event: Event) -> str:
    if event.all_day:
        return f"{event.start_at:%A %d %B %Y} (all day)"
    tz = event.tzid or "UTC"
    try:
        local = event.start_at.astimezone(zoneinfo.ZoneInfo(tz))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        local, tz = event.start_at, "UTC"
    text = f"{local:%A %d %B %Y, %H:%M} ({tz})"
    return text + (", repeating" if event.recurring else "")


@router.get("/e/{event_id}", response_class=HTMLResponse)
async def event_page(event_id: str, request: Request) -> Response:
    """The event's own page: the single-event layout of /p pages (public.py)."""
    return await public.event_page(request, event_id)


@router.post("/e/{event_id}", response_class=HTMLResponse)
async def event_form(event_id: str, request: Request) -> Response:
    """Its invite form: a plain form POST, or page.js's fetch of the same (JSON answer)."""
    return await public.event_submit(request, event_id)


async def _unsubscribe(request: Request, token: str, confirm: bool) -> HTMLResponse:
    svc: Services = request.app.state.svc
    sub_id = verify_token(svc.book.secret, token.lower())
    title = "Unsubscribe"
    if sub_id is None:
        return render("unsubscribe.html", 404, title=title, invalid=True)
    async with svc.sessions.begin() as session:
        sub = await session.get(Subscription, sub_id)
        event = await session.get(Event, sub.event_id) if sub else None
        if sub is None or event is None:
            return render("unsubscribe.html", 404, title=title, invalid=True)
        if confirm:
            await subscriptions.stop(svc, session, sub, "unsubscribed")
        return render("unsubscribe.html", title=title, summary=event.summary, email=sub.email,
                      done=confirm or sub.status == "unsubscribed")


@router.get("/u/{token}", response_class=HTMLResponse)
async def unsubscribe_page(token: str, request: Request) -> HTMLResponse:
    # A GET never unsubscribes: mail scanners follow links.
    return await _unsubscribe(request, token, confirm=False)


@router.post("/u/{token}", response_class=HTMLResponse)
async def unsubscribe_post(token: str, request: Request) -> HTMLResponse:
    """RFC 8058 one-click (body List-Unsubscribe=One-Click) and the page's button alike."""
    return await _unsubscribe(request, token, confirm=True)
