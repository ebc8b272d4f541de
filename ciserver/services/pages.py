"""Shareable pages (/p/{slug}): which events an organizer shows together, and how.

A page belongs to one organizer. Its events are either chosen (a list of API ids) or every
event of the organizer whose start falls in the page's date range. Colors and image URLs are
checked here, because they end up in CSS and HTML attributes.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ..addresses import normalize_email
from ..store.models import Event, Page
from .context import Services

LAYOUTS = ("single", "list", "grid")
_COLOR = re.compile(r"^#[0-9a-fA-F]{6}$")
_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


class PageError(ValueError):
    """A page setting that cannot be used; the message names the field."""


@dataclass(frozen=True)
class PageSettings:
    title: str = ""
    intro: str = ""
    layout: str = "list"
    color_primary: str = "#0b57d0"
    color_background: str = "#ffffff"
    color_text: str = "#1a1a1a"
    logo_url: str = ""
    background_url: str = ""
    date_from: datetime | None = None
    date_to: datetime | None = None
    event_ids: tuple[str, ...] = ()


def _check_url(field: str, value: str) -> str:
    value = value.strip()
    if value and not re.match(r"^https://[^\s\"'<>()\\]+$", value):
        raise PageError(f"{field}: expected an https:// URL without spaces or quotes")
    return value


def check(settings: PageSettings) -> PageSettings:
    if settings.layout not in LAYOUTS:
        raise PageError(f"layout: expected one of {', '.join(LAYOUTS)}")
    for name in ("color_primary", "color_background", "color_text"):
        if not _COLOR.match(getattr(settings, name)):
            raise PageError(f"{name}: expected a color like #0b57d0")
    _check_url("logo_url", settings.logo_url)
    _check_url("background_url", settings.background_url)
    if settings.date_from and settings.date_to and settings.date_to < settings.date_from:
        raise PageError("date_to: must not be before date_from")
    if len(settings.title) > 300:
        raise PageError("title: at most 300 characters")
    if len(settings.intro) > 5000:
        raise PageError("intro: at most 5000 characters")
    return settings


def new_slug(title: str) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")[:40].strip("-")
    return f"{base}-{secrets.token_hex(3)}" if base else secrets.token_hex(5)


def _apply(page: Page, s: PageSettings) -> None:
    page.title, page.intro, page.layout = s.title, s.intro, s.layout
    page.color_primary, page.color_background = s.color_primary, s.color_background
    page.color_text, page.logo_url = s.color_text, s.logo_url
    page.background_url, page.date_from, page.date_to = s.background_url, s.date_from, s.date_to
    page.event_ids = json.dumps(list(s.event_ids))


async def create(svc: Services, session: AsyncSession, organizer: str,
                 settings: PageSettings, slug: str = "") -> Page:
    settings = check(settings)
    slug = slug.strip().lower() or new_slug(settings.title or "events")
    if not _SLUG.match(slug):
        raise PageError("slug: lower-case letters, digits and dashes, at most 64")
    if (await session.execute(select(Page.id).where(Page.slug == slug))).first():
        raise PageError(f"slug: {slug!r} is taken")
    now = svc.now()
    page = Page(slug=slug, organizer_email=normalize_email(organizer), created_at=now,
                updated_at=now)
    _apply(page, settings)
    session.add(page)
    await session.flush()
    return page


async def update(svc: Services, session: AsyncSession, page: Page,
                 settings: PageSettings) -> Page:
    _apply(page, check(settings))
    page.updated_at = svc.now()
    return page


async def by_slug(session: AsyncSession, slug: str) -> Page | None:
    return (await session.execute(
        select(Page).where(Page.slug == slug.lower()))).scalar_one_or_none()


async def of_organizer(session: AsyncSession, organizer: str) -> Sequence[Page]:
    return (await session.execute(
        select(Page).where(Page.organizer_email == normalize_email(organizer))
        .order_by(Page.id))).scalars().all()


def settings_of(page: Page) -> PageSettings:
    return PageSettings(
        title=page.title, intro=page.intro, layout=page.layout,
        color_primary=page.color_primary, color_background=page.color_background,
        color_text=page.color_text, logo_url=page.logo_url,
        background_url=page.background_url, date_from=page.date_from,
        date_to=page.date_to, event_ids=tuple(json.loads(page.event_ids or "[]")))


async def events_of(session: AsyncSession, page: Page,
                    include_cancelled: bool = False) -> Sequence[Event]:
    """The page's events in start order: the chosen ones (still the organizer's), or all of
    the organizer's events in the date range."""
    chosen = json.loads(page.event_ids or "[]")
    q = select(Event).where(Event.organizer_email == page.organizer_email)
    if chosen:
        q = q.where(Event.public_id.in_(chosen))
    if page.date_from is not None:
        q = q.where(Event.start_at >= page.date_from)
    if page.date_to is not None:
        q = q.where(Event.start_at <= page.date_to)
    if not include_cancelled:
        q = q.where(Event.status == "confirmed")
    return (await session.execute(q.order_by(Event.start_at, Event.id))).scalars().all()
