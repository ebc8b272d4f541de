"""REST API under /api/v1 (JSON; API keys as ``Authorization: Bearer``).

Every error is JSON of one shape, ``{"error": {"code": ..., "message": ...}}`` (see
:mod:`.app` for the handlers), and every route documents the errors it can answer with, so
``/openapi.json`` describes what clients really get (tests/test_openapi.py fuzzes it).
Lists are paginated with ``limit``/``offset``; the total is in ``X-Total-Count`` and the
next page in an RFC 8288 ``Link: <...>; rel="next"`` header.
"""

from __future__ import annotations

import functools
import json
import re
import zoneinfo
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.dependencies.models import Dependant
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
)
from sqlalchemy import Select, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from .. import peoplecsv
from ..addresses import normalize_email
from ..itip.rules import PARTSTAT_RSVP, rsvp_letter
from ..services import apikeys, events, reports, signups, subscriptions
from ..services.apikeys import Principal
from ..services.context import Services
from ..store.models import Event, Subscription
from .errors import ApiError

# --------------------------------------------------------------------------------------------
# Errors, as documented in the OpenAPI description


class FieldProblem(BaseModel):
    field: str = Field(description="where: a body, query or path field (dotted)")
    problem: str


class ErrorInfo(BaseModel):
    code: str = Field(description="stable, machine-readable: not_found, invalid, "
                                  "rate_limited, ...")
    message: str = Field(description="for people")
    details: list[FieldProblem] | None = Field(
        None, description="validation errors (422): every problem found")


class ErrorOut(BaseModel):
    """The one shape of every API error."""

    error: ErrorInfo


_ERROR_TEXT = {
    400: "The body is not valid JSON (or not a valid form or multipart upload)",
    401: "No API key, or an unknown or revoked one",
    403: "The key may not do this (domain keys only read; another organizer's event)",
    404: "No such event (or not one this key sees)",
    405: "Method not allowed",
    409: "The event is cancelled",
    413: "The body is too large (config [web] max_body_size), or too many attendees",
    415: "Unsupported Content-Type for the body",
    422: "The request is well-formed but invalid: the message names the field",
    429: "Rate limited: try again after Retry-After seconds",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {
        c: {"model": ErrorOut, "description": _ERROR_TEXT[c]} for c in codes}
    if 429 in out:
        out[429]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                               "description": "seconds to wait"}}
    if 401 in out:
        out[401]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


READ = (401, 404, 422)
WRITE_BODY = (400, 401, 403, 404, 409, 413, 415, 422)

# Every route can answer 422; the router says so once (instead of FastAPI's own shape).
router = APIRouter(prefix="/api/v1", responses=errors(422))


async def get_svc(request: Request) -> Services:
    # Dependencies are coroutines: FastAPI runs plain functions in a thread pool, a thread
    # hop per request that cost the public endpoint a third of its rate (bench/web).
    svc: Services = request.app.state.svc
    return svc


SvcDep = Annotated[Services, Depends(get_svc)]

_bearer = HTTPBearer(auto_error=False, scheme_name="apiKey",
                     description="An API key from `ciserver apikey create`: "
                                 "`Authorization: Bearer cis_...`")


async def principal(request: Request, svc: SvcDep,
                    _doc: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
                    ) -> Principal:
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "unauthorized", "an API key is required: "
                       "Authorization: Bearer <key> (create one with `ciserver apikey create`)",
                       {"WWW-Authenticate": "Bearer"})
    who = await apikeys.authenticate(svc, key.strip())
    if who is None:
        raise ApiError(401, "unauthorized", "unknown or revoked API key",
                       {"WWW-Authenticate": 'Bearer error="invalid_token"'})
    return who


PrincipalDep = Annotated[Principal, Depends(principal)]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def content_type(*allowed: str) -> Callable[[Request], Awaitable[None]]:
    """A dependency: 415 unless the body's Content-Type is one of ``allowed`` (a request
    without one is read as the first)."""

    async def check(request: Request) -> None:
        ctype = media_type(request)
        if ctype and ctype not in allowed:
            raise ApiError(415, "unsupported_media_type",
                           f"Content-Type {ctype!r} is not accepted here; send "
                           + " or ".join(allowed))

    return check


JsonBody = Depends(content_type("application/json"))


def _query_names(dependant: Dependant) -> set[str]:
    names = {p.alias for p in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


async def known_query(request: Request) -> None:
    """422 for a query parameter the route does not take: a mistyped filter
    (``?stauts=active``) must not quietly answer with everything."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    known = _query_names(route.dependant)
    for name in request.query_params:
        if name not in known:
            accepted = ", ".join(sorted(known)) or "none"
            raise ApiError(422, "invalid", f"{name or '(empty)'}: unknown query parameter "
                                           f"(this route takes: {accepted})")


KnownQuery = Depends(known_query)


# --------------------------------------------------------------------------------------------
# Models

# C0 controls (but tab, CR, LF), DEL, and lone surrogates have no place in calendar text,
# and PostgreSQL refuses NUL outright.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _plain(value: str) -> str:
    if _CONTROL_RE.search(value):
        raise ValueError("control characters are not allowed")
    return value


Text = Annotated[str, AfterValidator(_plain)]
# An optional name: absent, "" and null all mean none (scripts send null for "no name").
Name = Annotated[Text, BeforeValidator(lambda v: "" if v is None else v),
                 Field(max_length=200)]
# Dates the calendar world can take (no year-1 or year-9999 overflows in zone arithmetic).
_EARLIEST, _LATEST = datetime(1900, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC)


def _sane_date(value: datetime) -> datetime:
    probe = value if value.tzinfo else value.replace(tzinfo=UTC)
    if not _EARLIEST <= probe <= _LATEST:
        raise ValueError("must be between the years 1900 and 2200")
    return value


_NUMBER_RE = re.compile(r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*")
_DAY_RE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_only(value: Any) -> Any:
    """Dates are ISO 8601 text, as documented: no Unix timestamps (pydantic's lax mode
    would take ``to=-10371`` as 1969)."""
    if isinstance(value, int | float) or (isinstance(value, str)
                                          and _NUMBER_RE.fullmatch(value)):
        raise ValueError("give an ISO 8601 date-time, e.g. 2027-05-01T19:30:00Z")
    return value


def _iso_day(value: Any) -> Any:
    """A filter's date or date-time; a date alone is its midnight UTC."""
    value = _iso_only(value)
    if isinstance(value, str) and _DAY_RE.fullmatch(value.strip()):
        return value.strip() + "T00:00:00Z"
    return value


When = Annotated[datetime, BeforeValidator(_iso_only), AfterValidator(_sane_date)]
Day = Annotated[datetime, BeforeValidator(_iso_day), AfterValidator(_sane_date),
                WithJsonSchema({"anyOf": [{"type": "string", "format": "date-time"},
                                          {"type": "string", "format": "date"}]})]


@functools.cache
def _zones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def _zone_name(value: str) -> str:
    if value and value not in _zones():
        raise ValueError(f"unknown time zone {value!r} (an IANA name like Europe/Berlin)")
    return value


Zone = Annotated[str, AfterValidator(_zone_name)]


class Counts(BaseModel):
    invited: int = 0
    yes: int = Field(0, alias="Y")
    no: int = Field(0, alias="N")
    maybe: int = Field(0, alias="M")
    no_answer: int = 0
    bounced: int = 0
    unsubscribed: int = 0

    model_config = {"populate_by_name": True, "serialize_by_alias": True}


class EventOut(BaseModel):
    id: str = Field(description="API id")
    uid: str = Field(description="the organizer's own UID")
    invite_uid: str = Field(description="the UID in the invites customers receive")
    summary: str
    start: datetime
    end: datetime
    status: str = Field(description="confirmed | cancelled")
    sequence: int = Field(description="version customers have; rises with every change")
    page_url: str
    location: str
    description: str
    organizer: str
    organizer_name: str
    timezone: str
    all_day: bool
    recurring: bool
    created_at: datetime
    updated_at: datetime
    counts: Counts


class EventCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    summary: Text = Field(min_length=1, max_length=500)
    start: When
    end: When
    location: Text = Field("", max_length=1000)
    description: Text = Field("", max_length=20000)
    timezone: Zone = Field("", max_length=64,
                           description="IANA zone for naive start/end, e.g. Europe/Berlin")
    organizer_name: Text = Field("", max_length=200,
                                 description="the name invites show as their sender")
    organizer: Text | None = Field(
        None, max_length=320,
        description="the organizer's address: required with an admin key; an organizer "
                    "key creates its own organizer's events")


class EventPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    summary: Text | None = Field(None, min_length=1, max_length=500)
    start: When | None = None
    end: When | None = None
    location: Text | None = Field(None, max_length=1000)
    description: Text | None = Field(None, max_length=20000)
    timezone: Zone = Field("", max_length=64,
                           description="IANA zone for naive start/end; default: the "
                                       "event's own")


class AttendeeIn(BaseModel):
    email: Text = Field(max_length=320)
    name: Name = ""


class AttendeeOut(BaseModel):
    email: str
    name: str
    rsvp: Literal["Y", "N", "M"] | None = Field(description="Y, N, M or null (no answer yet)")
    partstat: str
    responded_at: datetime | None
    status: str = Field(description="active | unsubscribed | bounced")
    source: str


class Accepted(BaseModel):
    count: int = Field(description="invites queued")
    already: int = Field(0, description="addresses that already had the invite")


class InviteIn(BaseModel):
    email: Text = Field(max_length=320)
    name: Name = ""
    website: str = Field("", max_length=1000,
                         description="leave empty: a honeypot field for form bots")


# Events one public request may ask for: a whole NBA season (82 games) fits.
MAX_EVENTS = 100


class MultiInviteIn(InviteIn):
    events: list[Annotated[Text, Field(max_length=300)]] = Field(min_length=1,
                                                                 max_length=MAX_EVENTS)


class InviteAccepted(BaseModel):
    status: Literal["queued", "already_subscribed"] = Field(
        description="queued | already_subscribed")
    events: list[str]


# --------------------------------------------------------------------------------------------
# Helpers


async def counts_for(session: AsyncSession, ids: Sequence[int]) -> dict[int, Counts]:
    out = {i: Counts() for i in ids}
    if not ids:
        return out
    rows = await session.execute(
        select(Subscription.event_id, Subscription.status, Subscription.partstat,
               func.count()).where(Subscription.event_id.in_(ids))
        .group_by(Subscription.event_id, Subscription.status, Subscription.partstat))
    for event_id, status, partstat, n in rows:
        c = out[event_id]
        c.invited += n
        if status == "bounced":
            c.bounced += n
        elif status == "unsubscribed":
            c.unsubscribed += n
        letter = rsvp_letter(partstat)
        if letter == "Y":
            c.yes += n
        elif letter == "N":
            c.no += n
        elif letter == "M":
            c.maybe += n
        else:
            c.no_answer += n
    return out


def event_out(svc: Services, e: Event, counts: Counts) -> EventOut:
    return EventOut(
        id=e.public_id, uid=e.organizer_uid, invite_uid=e.uid, summary=e.summary,
        start=e.start_at, end=e.end_at, status=e.status, sequence=e.sequence,
        page_url=svc.page_url(e.public_id), location=e.location, description=e.description,
        organizer=e.organizer_email, organizer_name=e.organizer_name, timezone=e.tzid,
        all_day=e.all_day, recurring=e.recurring, created_at=e.created_at,
        updated_at=e.updated_at, counts=counts)


async def visible_event(session: AsyncSession, who: Principal, ref: str) -> Event:
    try:
        # Co-organizers may share a calendar UID: look in the key's own scope first.
        event = await events.find(session, ref, organizer=who.organizer, domain=who.domain)
    except events.NotFound:
        raise ApiError(404, "not_found", f"no event {ref!r}") from None
    if not who.may_see(event.organizer_email, event.organizer_domain):
        raise ApiError(404, "not_found", f"no event {ref!r}")
    return event


def require_writer(who: Principal, event: Event | None = None) -> None:
    if who.scope == "domain":
        raise ApiError(403, "forbidden", "domain keys read events, attendees and reports; "
                                         "changes need the organizer's key")
    if event is not None and who.scope == "organizer" and who.organizer != event.organizer_email:
        raise ApiError(403, "forbidden", "this event belongs to another organizer")


def _zoned(value: datetime, tz: str, field: str) -> datetime:
    """A naive value is in ``tz``; an aware one is kept in ``tz`` if given, else in UTC (a
    bare UTC offset is no time zone a calendar could name)."""
    zone: zoneinfo.ZoneInfo | None = None
    if tz:
        try:
            zone = zoneinfo.ZoneInfo(tz)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            zone = None
    if value.tzinfo is None:
        if zone is None:
            raise ApiError(422, "invalid", f"{field}: give a UTC offset (2026-05-01T19:30:00Z) "
                                           "or a timezone")
        local = value.replace(tzinfo=zone)
        if local.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != value:
            # In the hour the clocks skip: no such local time. Python would quietly make
            # it the next hour's, the invite would still say the skipped one.
            raise ApiError(422, "invalid", f"{field}: {value:%H:%M} does not exist on "
                                           f"{value:%Y-%m-%d} in {tz} (the clocks skip it)")
        return local
    return value.astimezone(zone or UTC)


def _page_links(request: Request, response: Response, svc: Services, total: int, limit: int,
                offset: int) -> None:
    """X-Total-Count and an RFC 8288 Link header (next, prev) on a paginated list."""
    response.headers["X-Total-Count"] = str(total)
    params = [(k, v) for k, v in request.query_params.multi_items()
              if k not in ("limit", "offset")]
    base = svc.config.base_url + request.url.path

    def url(at: int) -> str:
        return f"{base}?{urlencode([*params, ('limit', limit), ('offset', at)])}"

    links = []
    if offset + limit < total:
        links.append(f'<{url(offset + limit)}>; rel="next"')
    if offset > 0:
        links.append(f'<{url(max(0, offset - limit))}>; rel="prev"')
    if links:
        response.headers["Link"] = ", ".join(links)


def _list_headers(what: str) -> dict[str, Any]:
    return {
        "X-Total-Count": {"schema": {"type": "integer"}, "required": True,
                          "description": f"{what} matching the filters, on all pages"},
        "Link": {"schema": {"type": "string"},
                 "description": 'RFC 8288: <URL>; rel="next" (and rel="prev") pages'},
    }


def client_ip(request: Request, trusted: list[str]) -> str:
    """The client's address for rate limits: the peer, or — when the peer is a trusted
    proxy — the nearest X-Forwarded-For hop that is not itself a trusted proxy (walking from
    the right: the left part is whatever the client chose to send)."""
    ip = request.client.host if request.client else "unknown"
    if ip in trusted:
        hops = [h.strip() for h in request.headers.get("x-forwarded-for", "").split(",")]
        for hop in reversed([h for h in hops if h]):
            ip = hop
            if hop not in trusted:
                break
    return ip


def _limited(wait: float) -> ApiError:
    return ApiError(429, "rate_limited", "too many requests; try again later",
                    {"Retry-After": str(int(wait) + 1)})


def mailbox_key(address: str) -> str:
    """The mailbox an address reaches, for rate limits: lower case, without a +tag (most
    providers deliver fan+anything@ to fan@, so tags must not multiply an allowance)."""
    local, _, domain = address.lower().rpartition("@")
    return f"{local.split('+', 1)[0] or local}@{domain}"


def rate_limit(request: Request, svc: Services, address: str | None = None,
               event_ids: Sequence[str] = (), invites: int = 0) -> None:
    """Public endpoints: per client IP, per recipient mailbox (requests per hour and invites
    per day) and per event ([web] rate_limit, rate_limit_per_address,
    rate_limit_invites_per_address, rate_limit_per_event); 429 when one is spent.
    ``invites``: how many invites the request asks for (default: one per event id). A
    request refused by the daily invite cap still counts against the hourly request limit."""
    state = request.app.state
    wait = state.ip_limiter.hit(client_ip(request, svc.config.web.trusted_proxies))
    if not wait and address:
        mailbox = mailbox_key(address)
        wait = state.address_limiter.hit(mailbox)
        if not wait:
            wait = state.invites_limiter.hit(mailbox, n=invites or len(event_ids) or 1)
    if not wait and event_ids:
        event_rate_limit(request, event_ids)
    if wait:
        raise _limited(wait)


def event_rate_limit(request: Request, event_ids: Sequence[str]) -> None:
    limiter = request.app.state.event_limiter
    for event_id in event_ids:
        wait = limiter.hit(event_id)
        if wait:
            raise _limited(wait)


async def read_body(request: Request) -> Any:
    """JSON or an HTML form, as the public endpoints accept both; 415 for anything else."""
    ctype = media_type(request)
    if ctype in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.form()
        return {k: v for k, v in form.items() if isinstance(v, str)} | (
            {"events": [v for v in form.getlist("events") if isinstance(v, str)]}
            if "events" in form else {})
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(415, "unsupported_media_type",
                       f"Content-Type {ctype!r} is not accepted here; send application/json "
                       "or a form (application/x-www-form-urlencoded, multipart/form-data)")
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_request", "the body is not valid JSON") from None


def _model(model: type[Any], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        raise ApiError(422, "invalid", f"{where}: {err.get('msg', 'invalid')}") from None


def _form_or_json(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema},
        "application/x-www-form-urlencoded": {"schema": schema}}}}


# --------------------------------------------------------------------------------------------
# Events


@router.get("/events", response_model=list[EventOut], tags=["events"], dependencies=[KnownQuery],
            responses={200: {"headers": _list_headers("events")}, **errors(*READ)})
async def list_events(
        request: Request, response: Response, svc: SvcDep, who: PrincipalDep,
        status: Annotated[Literal["confirmed", "cancelled"] | None, Query()] = None,
        start_from: Annotated[Day | None, Query(
            alias="from", description="events starting at or after (ISO 8601 date or "
                                      "date-time; UTC unless it has an offset)")] = None,
        start_to: Annotated[Day | None, Query(
            alias="to", description="events starting before")] = None,
        q: Annotated[Text | None, Query(max_length=200, description="text in the summary or "
                                                                    "location")] = None,
        organizer: Annotated[Text | None, Query(max_length=320,
                                                description="one organizer's events")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> list[EventOut]:
    """Events this key sees, by start time (then creation), with filters and pages."""
    where = events.EventFilter(
        organizer=organizer if who.scope != "organizer" else who.organizer,
        domain=who.domain if who.scope == "domain" else None, status=status,
        start_from=_utc(start_from), start_to=_utc(start_to), text=q or None)
    others = (who.scope == "organizer" and organizer is not None
              and normalize_email(organizer) != who.organizer)
    rows: Sequence[Event] = []
    total = 0
    async with svc.sessions() as session:
        if not others:  # an organizer key asking for someone else's events gets none
            total = await events.listing_total(session, where)
            rows = await events.listing(session, where=where, limit=limit, offset=offset)
        counts = await counts_for(session, [e.id for e in rows])
    _page_links(request, response, svc, total, limit, offset)
    return [event_out(svc, e, counts[e.id]) for e in rows]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@router.post("/events", response_model=EventOut, status_code=201, tags=["events"],
             dependencies=[KnownQuery, JsonBody], responses=errors(400, 401, 403, 413, 415, 422))
async def create_event(body: EventCreate, svc: SvcDep, who: PrincipalDep) -> EventOut:
    """A new event, sent in the organizer's name from our addresses to everyone added later
    (``POST /events/{id}/attendees``, the public invite endpoints and pages)."""
    if who.scope == "domain":
        raise ApiError(403, "forbidden", "domain keys read; events are created with an "
                                         "organizer's or an admin key")
    organizer = who.organizer or ""
    if who.scope == "admin":
        if not body.organizer:
            raise ApiError(422, "invalid", "organizer: an admin key names the organizer")
        organizer = body.organizer
    elif body.organizer and body.organizer.strip().lower() != organizer:
        raise ApiError(403, "forbidden", "this key creates events of "
                                         f"{organizer} only")
    try:
        organizer = subscriptions.check_email(organizer)
    except subscriptions.InvalidAddress as exc:
        raise ApiError(422, "invalid", f"organizer: {exc}") from None
    start = _zoned(body.start, body.timezone, "start")
    end = _zoned(body.end, body.timezone, "end")
    if end < start:
        raise ApiError(422, "invalid", "end: must not be before start")
    async with svc.sessions.begin() as session:
        event = await events.create_via_api(
            svc, session, organizer=organizer, organizer_name=body.organizer_name,
            summary=body.summary, start=start, end=end, location=body.location,
            description=body.description)
        return event_out(svc, event, Counts())


@router.get("/events/{event_id}", response_model=EventOut, tags=["events"],
            dependencies=[KnownQuery],
            responses=errors(*READ))
async def get_event(event_id: str, svc: SvcDep, who: PrincipalDep) -> EventOut:
    """One event by API id, the UID customers see, or the organizer's own UID."""
    async with svc.sessions() as session:
        event = await visible_event(session, who, event_id)
        return event_out(svc, event, (await counts_for(session, [event.id]))[event.id])


@router.patch("/events/{event_id}", response_model=EventOut, tags=["events"],
              dependencies=[KnownQuery, JsonBody], responses=errors(*WRITE_BODY))
async def patch_event(event_id: str, body: EventPatch, svc: SvcDep,
                      who: PrincipalDep) -> EventOut:
    """Change an event; every subscriber gets the new version, like an edit made in the
    organizer's calendar (SEQUENCE rises only if customers would see a difference)."""
    from ..itip import content as content_mod

    async with svc.sessions.begin() as session:
        event = await visible_event(session, who, event_id)
        require_writer(who, event)
        if event.status == "cancelled":
            raise ApiError(409, "conflict", "the event is cancelled")
        tz = body.timezone or event.tzid
        start = _zoned(body.start, tz, "start") if body.start else None
        end = _zoned(body.end, tz, "end") if body.end else None
        new = content_mod.edit(event.content, summary=body.summary, location=body.location,
                               description=body.description, start=start, end=end)
        summary = content_mod.summarize(new)
        if summary.end < summary.start:
            raise ApiError(422, "invalid", "end: must not be before start")
        await events.change(svc, session, event, new, origin="api")
        return event_out(svc, event, (await counts_for(session, [event.id]))[event.id])


@router.delete("/events/{event_id}", response_model=EventOut, tags=["events"],
               dependencies=[KnownQuery],
               responses=errors(401, 403, 404, 422))
async def delete_event(event_id: str, svc: SvcDep, who: PrincipalDep) -> EventOut:
    """Cancel an event: every subscriber gets the cancellation (METHOD:CANCEL). The event
    stays readable, with status ``cancelled``; cancelling twice changes nothing."""
    async with svc.sessions.begin() as session:
        event = await visible_event(session, who, event_id)
        require_writer(who, event)
        await events.cancel(svc, session, event, origin="api")
        return event_out(svc, event, (await counts_for(session, [event.id]))[event.id])


# --------------------------------------------------------------------------------------------
# Attendees

_ANSWERED = tuple(PARTSTAT_RSVP)


def _attendee_filter(q: Select[Any], event_id: int, status: str | None,
                     rsvp: str | None) -> Select[Any]:
    q = q.where(Subscription.event_id == event_id)
    if status is not None:
        q = q.where(Subscription.status == status)
    if rsvp == "none":
        q = q.where(or_(Subscription.partstat.is_(None),
                        Subscription.partstat.not_in(_ANSWERED)))
    elif rsvp is not None:
        wanted = [p for p, letter in PARTSTAT_RSVP.items() if letter == rsvp]
        q = q.where(Subscription.partstat.in_(wanted))
    return q


@router.get("/events/{event_id}/attendees", response_model=list[AttendeeOut],
            tags=["attendees"], dependencies=[KnownQuery],
            responses={200: {"headers": _list_headers("attendees")}, **errors(*READ)})
async def list_attendees(
        event_id: str, request: Request, response: Response, svc: SvcDep, who: PrincipalDep,
        status: Annotated[Literal["active", "unsubscribed", "bounced"] | None, Query()] = None,
        rsvp: Annotated[Literal["Y", "N", "M", "none"] | None, Query(
            description="Y, N or M: that answer; none: no answer yet")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Annotated[int, Query(ge=0, le=1_000_000_000)] = 0) -> list[AttendeeOut]:
    """The event's attendees in the order they were added, with filters and pages."""
    async with svc.sessions() as session:
        event = await visible_event(session, who, event_id)
        total = int((await session.execute(_attendee_filter(
            select(func.count(Subscription.id)), event.id, status, rsvp))).scalar_one())
        subs = (await session.execute(
            _attendee_filter(select(Subscription), event.id, status, rsvp)
            .order_by(Subscription.id).limit(limit).offset(offset))).scalars().all()
    _page_links(request, response, svc, total, limit, offset)
    return [AttendeeOut(email=s.email, name=s.name, rsvp=rsvp_letter(s.partstat),
                        partstat=s.partstat, responded_at=s.responded_at, status=s.status,
                        source=s.source) for s in subs]


# A bulk request is taken whole in one transaction: bounded, so one upload cannot hold the
# database (and the SQLite writer) for minutes. Larger lists go in several requests.
MAX_BULK = 100_000


def parse_people_csv(text: str) -> list[tuple[str, str]]:
    """Rows of email[,name], or columns named by a header row (``email``, ``e-mail``,
    ``email address``, ``mail``; ``name``, ``full name``, or ``first name`` + ``last name``);
    ``,``, ``;`` or tab between cells (see ciserver/peoplecsv.py)."""
    return [(p.email, p.name) for p in _people(text)]


def _people(text: str) -> list[peoplecsv.Person]:
    try:
        return peoplecsv.parse(text)
    except peoplecsv.CsvError as exc:
        raise ApiError(422, "invalid", f"body: {exc}") from None


def _csv_text(data: bytes, content_type: str) -> str:
    """The upload's text in its own character set (BOM, else the declared charset, else
    UTF-8, else Windows-1252), not always UTF-8: a spreadsheet saved on Windows would keep
    "Jos\ufffd" for "José", and a UTF-16 file would read as garbage addresses."""
    try:
        return peoplecsv.decode(data, peoplecsv.charset_of(content_type))
    except peoplecsv.CsvError as exc:
        raise ApiError(422, "invalid", f"body: {exc}") from None


_BULK_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {
        "type": "array", "maxItems": MAX_BULK,
        "items": AttendeeIn.model_json_schema(ref_template="#/components/schemas/{model}")}},
    "text/csv": {"schema": {"type": "string"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "string", "format": "binary"}}}}}}}


@router.post("/events/{event_id}/attendees", response_model=Accepted, status_code=202,
             tags=["attendees"], openapi_extra=_BULK_BODY, responses=errors(*WRITE_BODY),
             dependencies=[KnownQuery])
async def add_attendees(event_id: str, request: Request, svc: SvcDep,
                        who: PrincipalDep) -> Accepted:
    """Add customers in bulk and send each the invite: a JSON list of ``{email, name?}``,
    a CSV body (``text/csv``: email[,name] rows, or a header row naming the columns:
    ``email``/``e-mail``/``email address``/``mail`` and ``name``/``full name`` or ``first
    name`` + ``last name``; ``,``, ``;`` or tab between cells; UTF-8, UTF-16 with a BOM,
    the ``charset`` declared, else Windows-1252) or a CSV upload (multipart field ``file``).
    At most 100000 per request, taken whole or not at all; addresses already invited are
    counted in ``already``."""
    ctype = media_type(request)
    lines: list[int] = []  # a CSV's line of each person, for errors about one of them
    if ctype in ("text/csv", "multipart/form-data"):
        if ctype == "text/csv":
            data, declared = await request.body(), request.headers.get("content-type", "")
        else:
            form = await request.form()
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(422, "invalid", "file: upload a CSV file in the field 'file'")
            data, declared = await upload.read(), upload.headers.get("content-type", "")
        found = _people(_csv_text(data, declared))
        people, lines = [(p.email, p.name) for p in found], [p.line for p in found]
    else:
        data = await read_body(request)
        if not isinstance(data, list):
            raise ApiError(422, "invalid", "body: expected a JSON list of {email, name?}")
        if len(data) > MAX_BULK:
            raise ApiError(413, "too_large", f"at most {MAX_BULK} attendees per request")
        items = [_model(AttendeeIn, d) for d in data]
        people = [(a.email, a.name) for a in items]
    if not people:
        raise ApiError(422, "invalid", "body: no attendees given")
    if len(people) > MAX_BULK:
        raise ApiError(413, "too_large", f"at most {MAX_BULK} attendees per request")
    for i, (email, _) in enumerate(people):
        if _CONTROL_RE.search(email):
            raise ApiError(422, "invalid_email",
                           f"{_csv_line(lines, i)}{email!r} is not a valid email address")
    people = [(e, _CONTROL_RE.sub("", n)) for e, n in people]
    async with svc.sessions.begin() as session:
        event = await visible_event(session, who, event_id)
        require_writer(who, event)
        try:
            queued, already = await subscriptions.invite_many(
                svc, session, event, people, origin=f"api key {who.prefix}".strip())
        except subscriptions.InvalidAddress as exc:
            raise ApiError(422, "invalid_email", _bad_line(people, lines) + str(exc)) from None
        except subscriptions.EventClosed as exc:
            raise ApiError(409, "conflict", str(exc)) from None
    return Accepted(count=queued, already=already)


def _csv_line(lines: Sequence[int], i: int) -> str:
    return f"line {lines[i]}: " if i < len(lines) else ""


def _bad_line(people: Sequence[tuple[str, str]], lines: Sequence[int]) -> str:
    """"line N: " of a CSV's first refused address ("" for JSON): looked for only once a
    list was refused, so accepted uploads do not check every address twice."""
    for i, (email, _) in enumerate(people[:len(lines)]):
        try:
            subscriptions.check_email(email)
        except subscriptions.InvalidAddress:
            return _csv_line(lines, i)
    return ""


# --------------------------------------------------------------------------------------------
# Reports


def _csv_response(chunks: AsyncIterator[str], filename: str) -> StreamingResponse:
    return StreamingResponse(
        (c.encode("utf-8") async for c in chunks), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/events/{event_id}/report.csv", tags=["reports"],
            response_class=StreamingResponse)
async def event_report(event_id: str, svc: SvcDep, who: PrincipalDep,
                       bom: bool = False) -> StreamingResponse:
    async with svc.sessions() as session:
        event = await visible_event(session, who, event_id)
    return _csv_response(reports.csv_chunks(svc, event_id=event.id, bom=bom),
                         f"{event.public_id}.csv")


@router.get("/reports/organizer.csv", tags=["reports"], response_class=StreamingResponse)
async def organizer_report(svc: SvcDep, who: PrincipalDep, organizer: str | None = None,
                           bom: bool = False) -> StreamingResponse:
    target = (organizer or who.organizer or "").lower()
    if not target:
        raise ApiError(422, "invalid", "organizer: give ?organizer=EMAIL with this key")
    if not who.may_see(target, target.rpartition("@")[2]):
        raise ApiError(403, "forbidden", f"this key does not see {target}")
    return _csv_response(reports.csv_chunks(svc, organizer=target, bom=bom), "organizer.csv")


@router.get("/reports/domain/{domain}.csv", tags=["reports"], response_class=StreamingResponse)
async def domain_report(domain: str, svc: SvcDep, who: PrincipalDep,
                        bom: bool = False) -> StreamingResponse:
    domain = domain.lower()
    if not (who.scope == "admin" or (who.scope == "domain" and who.domain == domain)):
        raise ApiError(403, "forbidden", f"this key does not see the domain {domain}")
    return _csv_response(reports.csv_chunks(svc, domain=domain, bom=bom), f"{domain}.csv")


# --------------------------------------------------------------------------------------------
# Public invite endpoints (no key, rate-limited; CORS for embed buttons, see app.py)


async def public_invite(svc: Services, request: Request, refs: list[str], email: str,
                        name: str, *, source: str = "page", origin: str = "") -> InviteAccepted:
    """Subscribe one address to events and queue their invites, rate-limited per client IP,
    per address and per event. Concurrent requests are committed together
    (services/signups.py); each answers once its own sign-up is committed."""
    try:
        email = subscriptions.check_recipient(svc, email)
    except subscriptions.InvalidAddress as exc:
        raise ApiError(422, "invalid_email", str(exc)) from None
    rate_limit(request, svc, email, invites=len(refs))
    try:
        done = await _signups(request, svc).submit(
            signups.Signup(refs, email, name, source, origin))
    except events.NotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except subscriptions.EventClosed as exc:
        raise ApiError(409, "conflict", str(exc)) from None
    except signups.Limited as exc:
        raise _limited(exc.wait) from None
    return InviteAccepted(status="queued" if done.queued else "already_subscribed",
                          events=done.events)


def _signups(request: Request, svc: Services) -> signups.SignupBatcher:
    batcher: signups.SignupBatcher | None = getattr(request.app.state, "signups", None)
    if batcher is None:
        limiter = request.app.state.event_limiter

        def per_event(ids: Sequence[str]) -> float:
            for event_id in ids:
                wait: float = limiter.hit(event_id)
                if wait:
                    return wait
            return 0.0

        batcher = request.app.state.signups = signups.SignupBatcher(svc, per_event)
    return batcher


def _embed_origin(request: Request) -> str:
    """Where a public API request came from: the embedding site (Origin) for buttons, else
    "public api" (a script or app calling the endpoint itself)."""
    site = request.headers.get("origin", "").strip()
    return f"button {site}"[:200] if site and site != "null" else "public api"


PUBLIC_ERRORS = errors(400, 404, 409, 413, 415, 422, 429)


async def _invite_one(request: Request, event_id: str) -> InviteAccepted:
    data = _model(InviteIn, await read_body(request))
    if data.website:  # a bot filled the hidden field: answer like success, send nothing
        return InviteAccepted(status="queued", events=[event_id])
    return await public_invite(request.app.state.svc, request, [event_id], data.email,
                               data.name, origin=_embed_origin(request))


async def _invite_many(request: Request) -> InviteAccepted:
    data = _model(MultiInviteIn, await read_body(request))
    refs = list(dict.fromkeys(data.events))
    if data.website:
        return InviteAccepted(status="queued", events=refs)
    return await public_invite(request.app.state.svc, request, refs, data.email, data.name,
                               origin=_embed_origin(request))


@router.post("/events/{event_id}/invites", response_model=InviteAccepted, status_code=202,
             tags=["public"], openapi_extra=_form_or_json(InviteIn), responses=PUBLIC_ERRORS,
             dependencies=[KnownQuery])
async def invite_one(event_id: str, request: Request) -> InviteAccepted:
    """A customer asks for an event's invite (no key; what invite buttons call). Answered
    202 whether the invite is queued now or was sent before; rate-limited."""
    return await _invite_one(request, event_id)


@router.post("/invites", response_model=InviteAccepted, status_code=202, tags=["public"],
             openapi_extra=_form_or_json(MultiInviteIn), responses=PUBLIC_ERRORS,
             dependencies=[KnownQuery])
async def invite_many(request: Request) -> InviteAccepted:
    """The same for several events at once (multi-event pages and buttons)."""
    return await _invite_many(request)


async def public_fast(request: Request) -> InviteAccepted:
    """The two public routes above, served straight from the application's front door
    (web.app.CiApp) instead of through FastAPI's middleware, routing and dependency solving:
    the endpoint that buttons and mail campaigns hit hardest (bench/web). The FastAPI routes
    stay, to describe them in /openapi.json. Same body handling, same errors, same answer."""
    if request.scope.get("query_string"):  # parsed only when there is one
        for name in request.query_params:
            raise ApiError(422, "invalid", f"{name or '(empty)'}: unknown query parameter "
                                           "(this route takes: none)")
    event_id = request.path_params.get("event_id")
    return await (_invite_one(request, event_id) if event_id is not None
                  else _invite_many(request))
