"""Report routes beside the CSV ones of web/api.py: JSON equivalents (paginated), counts,
answer history, SVG charts, and "mail me this report".

Authorized like every API route (``Authorization: Bearer``): an organizer key sees its own
events, a domain key every organizer under its domain and nothing outside it, an admin key
everything. An event another key cannot see is "not found"; an organizer or domain it
cannot see is "forbidden".
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from ..addresses import domain_of, normalize_email
from ..services import charts, reports, subscriptions
from ..services.apikeys import Principal
from ..services.context import Services
from ..store.models import Event
from .api import Counts, KnownQuery, PrincipalDep, SvcDep, visible_event
from .errors import ApiError

# KnownQuery: a parameter these routes do not take (?offset=, ?page=) is a 422 naming the
# ones they do (?cursor=), not the same first page again and again.
router = APIRouter(prefix="/api/v1", tags=["reports"], dependencies=[KnownQuery])

MAX_PAGE = 10000
Limit = Annotated[int | None, Query(ge=1, le=MAX_PAGE, description="rows per page "
                                    "([reports] page_size when absent)")]
Cursor = Annotated[str | None, Query(description="next_cursor of the page before")]
SVG_HEADERS = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
               "Cache-Control": "private, max-age=60"}


# --------------------------------------------------------------------------------------------
# Models


class ReportRowOut(BaseModel):
    """A row of the CSV report, as JSON (cells are not neutralised: JSON is no spreadsheet)."""

    event_uid: str
    event_summary: str
    event_start: str = Field(description="UTC, ISO 8601")
    email: str
    name: str
    rsvp: str | None = Field(description="Y, N, M or null (no answer yet)")
    partstat: str
    responded_at: str | None
    occurrence: str | None = Field(description="null: the answer to the whole event; else "
                                               "the occurrence's start (UTC, ISO 8601)")
    status: str = Field(description="active | unsubscribed | bounced")
    source: str = Field(description="page | api | forwarded")
    event_id: str
    origin: str = Field(description="page slug, \"button\", API key prefix, "
                                    "\"forwarded by …\"")


class RowsPage(BaseModel):
    rows: list[ReportRowOut]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page; null "
                                                "on the last page")


class HistoryEntryOut(BaseModel):
    event_uid: str
    event_summary: str
    event_start: str
    email: str
    name: str
    occurrence: str | None
    received_at: str
    partstat: str
    rsvp: str | None
    outcome: str = Field(description="applied | stale | late | counter")
    late: bool = Field(description="came after the event ended; the report is unchanged")
    stale: bool = Field(description="older than the answer already applied; report unchanged")
    sequence: int | None
    answer_stamp: str
    comment: str
    source: str
    origin: str
    event_id: str


class HistoryPage(BaseModel):
    entries: list[HistoryEntryOut]
    next_cursor: str | None


class OccurrenceOut(BaseModel):
    occurrence: str
    counts: Counts


class SourceOut(BaseModel):
    source: str = Field(description="page | api | forwarded")
    origin: str
    counts: Counts


class EventSummaryOut(BaseModel):
    id: str
    uid: str
    summary: str
    start: datetime
    end: datetime
    status: str
    recurring: bool
    organizer: str
    page_url: str
    counts: Counts


class EventReportOut(EventSummaryOut):
    occurrences: list[OccurrenceOut] = Field(description="recurring events: per occurrence")
    sources: list[SourceOut]
    charts: dict[str, str] = Field(description="URLs of the SVG charts")


class OrganizerOut(BaseModel):
    organizer: str
    events: int
    counts: Counts


class ScopeReportOut(BaseModel):
    organizer: str | None = None
    domain: str | None = None
    totals: Counts
    events_total: int
    events: list[EventSummaryOut]
    next_offset: int | None = Field(description="?offset= of the next page of events")
    organizers: list[OrganizerOut] | None = Field(None, description="domain reports")
    sources: list[SourceOut]
    charts: dict[str, str]


class SendIn(BaseModel):
    to: str | None = Field(None, max_length=320, description="default: the organizer "
                           "(required for a domain report); an organizer key mails only "
                           "its organizer, a domain key addresses under its domain")
    history: bool = Field(False, description="attach the answer history instead")
    bom: bool | None = Field(None, description="UTF-8 BOM; default [reports] attachment_bom")


class SendOut(BaseModel):
    status: str = Field(description="queued")
    to: str
    filename: str
    rows: int


# --------------------------------------------------------------------------------------------
# Helpers


def counts_out(c: reports.Counts) -> Counts:
    return Counts(invited=c.invited, yes=c.yes, no=c.no, maybe=c.maybe,
                  no_answer=c.no_answer, bounced=c.bounced, unsubscribed=c.unsubscribed)


def row_out(r: reports.ReportRow) -> ReportRowOut:
    return ReportRowOut(
        event_uid=r.event_uid, event_summary=r.event_summary, event_start=r.event_start,
        email=r.email, name=r.name, rsvp=r.rsvp or None, partstat=r.partstat,
        responded_at=r.responded_at or None, occurrence=r.occurrence or None, status=r.status,
        source=r.source, event_id=r.event_id, origin=r.origin)


def history_out(h: reports.HistoryRow) -> HistoryEntryOut:
    return HistoryEntryOut(
        event_uid=h.event_uid, event_summary=h.event_summary, event_start=h.event_start,
        email=h.email, name=h.name, occurrence=h.occurrence or None, received_at=h.received_at,
        partstat=h.partstat, rsvp=h.rsvp or None, outcome=h.outcome, late=h.late == "yes",
        stale=h.stale == "yes", sequence=int(h.sequence) if h.sequence else None,
        answer_stamp=h.answer_stamp, comment=h.comment, source=h.source, origin=h.origin,
        event_id=h.event_id)


def summary_out(svc: Services, e: reports.EventSummary) -> EventSummaryOut:
    return EventSummaryOut(id=e.id, uid=e.uid, summary=e.summary, start=e.start, end=e.end,
                           status=e.status, recurring=e.recurring, organizer=e.organizer,
                           page_url=svc.page_url(e.id), counts=counts_out(e.counts))


def sources_out(items: list[reports.SourceSummary]) -> list[SourceOut]:
    return [SourceOut(source=s.source, origin=s.origin, counts=counts_out(s.counts))
            for s in items]


def organizer_target(who: Principal, organizer: str | None) -> str:
    """The organizer a request means (?organizer=, else the key's own), if the key sees it."""
    target = normalize_email(organizer or who.organizer or "")
    if not target or "@" not in target:
        raise ApiError(422, "invalid", "organizer: give ?organizer=EMAIL with this key")
    if not who.may_see(target, domain_of(target)):
        raise ApiError(403, "forbidden", f"this key does not see {target}")
    return target


def domain_target(who: Principal, domain: str) -> str:
    domain = domain.lower().lstrip("@")
    if not (who.scope == "admin" or (who.scope == "domain" and who.domain == domain)):
        raise ApiError(403, "forbidden", f"this key does not see the domain {domain}")
    return domain


async def event_for(svc: Services, who: Principal, ref: str) -> Event:
    async with svc.sessions() as session:
        return await visible_event(session, who, ref)


def page_limit(svc: Services, limit: int | None) -> int:
    return limit or svc.config.reports.page_size


def _bad_cursor(exc: ValueError) -> ApiError:
    return ApiError(422, "invalid", f"cursor: {exc}")


async def rows_json(svc: Services, cursor: str | None, limit: int | None,
                    **scope: Any) -> RowsPage:
    async with svc.sessions() as session:
        try:
            rows, nxt = await reports.rows_page(session, cursor=cursor,
                                                limit=page_limit(svc, limit), **scope)
        except ValueError as exc:
            raise _bad_cursor(exc) from None
    return RowsPage(rows=[row_out(r) for r in rows], next_cursor=nxt)


async def history_json(svc: Services, cursor: str | None, limit: int | None,
                       **scope: Any) -> HistoryPage:
    async with svc.sessions() as session:
        try:
            rows, nxt = await reports.history_page(session, cursor=cursor,
                                                   limit=page_limit(svc, limit), **scope)
        except ValueError as exc:
            raise _bad_cursor(exc) from None
    return HistoryPage(entries=[history_out(h) for h in rows], next_cursor=nxt)


def history_csv(svc: Services, filename: str, bom: bool, **scope: Any) -> StreamingResponse:
    chunks = reports.history_csv_chunks(svc, bom=bom, **scope)
    return StreamingResponse(
        (c.encode("utf-8") async for c in chunks), media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="{filename}"'})


def svg(text: str) -> Response:
    return Response(text, media_type="image/svg+xml", headers=SVG_HEADERS)


async def scope_report(svc: Services, limit: int, offset: int, base: str, *,
                       organizer: str | None = None, domain: str | None = None
                       ) -> ScopeReportOut:
    async with svc.sessions() as session:
        total = await reports.totals(session, organizer=organizer, domain=domain)
        n = await reports.event_count(session, organizer=organizer, domain=domain)
        events = await reports.event_summaries(session, organizer=organizer, domain=domain,
                                               limit=limit, offset=offset)
        sources = await reports.source_summaries(session, organizer=organizer, domain=domain)
        per_org = await reports.organizer_summaries(session, domain) if domain else None
    return ScopeReportOut(
        organizer=organizer, domain=domain, totals=counts_out(total), events_total=n,
        events=[summary_out(svc, e) for e in events],
        next_offset=offset + limit if offset + limit < n else None,
        organizers=[OrganizerOut(organizer=o.organizer, events=o.events,
                                 counts=counts_out(o.counts)) for o in per_org]
        if per_org is not None else None,
        sources=sources_out(sources),
        charts={"timeline": f"{base}/charts/timeline.svg", "games": f"{base}/charts/games.svg"})


def recipient(who: Principal, to: str | None, default: str | None) -> str:
    """Where "mail me this report" goes: never an address outside what the key owns."""
    if not to:
        if default:
            return default
        raise ApiError(422, "invalid", "to: give the address to mail the report to")
    try:
        to = subscriptions.check_email(to)
    except subscriptions.InvalidAddress as exc:
        raise ApiError(422, "invalid_email", str(exc)) from None
    if who.scope == "organizer" and to != who.organizer:
        raise ApiError(403, "forbidden", "an organizer key mails reports to its organizer only")
    if who.scope == "domain" and domain_of(to) != who.domain:
        raise ApiError(403, "forbidden", f"a domain key mails reports to addresses under "
                                         f"{who.domain} only")
    return to


async def send(svc: Services, body: SendIn, to: str, title: str, filename: str,
               **scope: Any) -> SendOut:
    bom = svc.config.reports.attachment_bom if body.bom is None else body.bom
    mail = await reports.mail_report(svc, to=to, title=title, history=body.history, bom=bom,
                                     filename=filename, **scope)
    return SendOut(status="queued", to=to, filename=mail.filename, rows=mail.rows)


SendBody = Annotated[SendIn | None, Body()]
Bom = Annotated[bool, Query(description="start with a UTF-8 BOM (Excel)")]
EventsLimit = Annotated[int, Query(ge=1, le=1000, description="events per page")]
Offset = Annotated[int, Query(ge=0)]
Organizer = Annotated[str | None, Query(description="default: the key's organizer")]
Since = Annotated[datetime | None, Query(description="only games from this time on")]
GamesLimit = Annotated[int, Query(ge=1, le=200)]


# --------------------------------------------------------------------------------------------
# One event


@router.get("/events/{event_id}/summary", response_model=EventReportOut)
async def event_summary(event_id: str, svc: SvcDep, who: PrincipalDep) -> EventReportOut:
    """Counts (invited, Y, N, M, no answer, bounced, unsubscribed), per occurrence of a
    recurring event, and per source (page, button, API call, forward)."""
    async with svc.sessions() as session:
        event = await visible_event(session, who, event_id)
        (one,) = await reports.event_summaries(session, event_id=event.id)
        occurrences = await reports.occurrence_counts(session, event) if event.recurring else []
        sources = await reports.source_summaries(session, event_id=event.id)
    base = f"/api/v1/events/{event.public_id}"
    return EventReportOut(
        **summary_out(svc, one).model_dump(by_alias=False),
        occurrences=[OccurrenceOut(occurrence=o, counts=counts_out(c)) for o, c in occurrences],
        sources=sources_out(sources),
        charts={"timeline": f"{base}/charts/timeline.svg", "games": f"{base}/charts/games.svg"})


@router.get("/events/{event_id}/report.json", response_model=RowsPage)
async def event_rows(event_id: str, svc: SvcDep, who: PrincipalDep, limit: Limit = None,
                     cursor: Cursor = None) -> RowsPage:
    """The rows of report.csv as JSON, a page at a time."""
    event = await event_for(svc, who, event_id)
    return await rows_json(svc, cursor, limit, event_id=event.id)


@router.get("/events/{event_id}/history.json", response_model=HistoryPage)
async def event_history(event_id: str, svc: SvcDep, who: PrincipalDep, limit: Limit = None,
                        cursor: Cursor = None) -> HistoryPage:
    """Every answer received for the event, with its time, including late and stale ones."""
    event = await event_for(svc, who, event_id)
    return await history_json(svc, cursor, limit, event_id=event.id)


@router.get("/events/{event_id}/history.csv", response_class=StreamingResponse)
async def event_history_csv(event_id: str, svc: SvcDep, who: PrincipalDep,
                            bom: Bom = False) -> StreamingResponse:
    event = await event_for(svc, who, event_id)
    return history_csv(svc, f"{event.public_id}-history.csv", bom, event_id=event.id)


@router.get("/events/{event_id}/charts/timeline.svg", response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}}}})
async def event_timeline_svg(event_id: str, svc: SvcDep, who: PrincipalDep) -> Response:
    """Invited, yes, no and maybe over time."""
    return svg(await charts.event_timeline(svc, await event_for(svc, who, event_id)))


@router.get("/events/{event_id}/charts/games.svg", response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}}}})
async def event_games_svg(event_id: str, svc: SvcDep, who: PrincipalDep) -> Response:
    """Yes / no / maybe per occurrence (a recurring event) or for the event."""
    return svg(await charts.event_games(svc, await event_for(svc, who, event_id)))


@router.post("/events/{event_id}/report/send", response_model=SendOut, status_code=202)
async def event_send(event_id: str, svc: SvcDep, who: PrincipalDep,
                     body: SendBody = None) -> SendOut:
    """Mail the event's report CSV (or its history) through the outbox."""
    body = body or SendIn()
    event = await event_for(svc, who, event_id)
    to = recipient(who, body.to, event.organizer_email)
    return await send(svc, body, to, event.summary, f"{event.public_id}.csv",
                      event_id=event.id)


# --------------------------------------------------------------------------------------------
# One organizer


@router.get("/reports/organizer/summary", response_model=ScopeReportOut)
async def organizer_summary(svc: SvcDep, who: PrincipalDep, organizer: Organizer = None,
                            limit: EventsLimit = 100, offset: Offset = 0) -> ScopeReportOut:
    """Totals, per event (a page of events) and per source for all of an organizer's events."""
    target = organizer_target(who, organizer)
    return await scope_report(svc, limit, offset, "/api/v1/reports/organizer",
                              organizer=target)


@router.get("/reports/organizer.json", response_model=RowsPage)
async def organizer_rows(svc: SvcDep, who: PrincipalDep, organizer: Organizer = None,
                         limit: Limit = None, cursor: Cursor = None) -> RowsPage:
    """The rows of organizer.csv as JSON, a page at a time."""
    return await rows_json(svc, cursor, limit, organizer=organizer_target(who, organizer))


@router.get("/reports/organizer/history.json", response_model=HistoryPage)
async def organizer_history(svc: SvcDep, who: PrincipalDep, organizer: Organizer = None,
                            limit: Limit = None, cursor: Cursor = None) -> HistoryPage:
    return await history_json(svc, cursor, limit,
                              organizer=organizer_target(who, organizer))


@router.get("/reports/organizer/history.csv", response_class=StreamingResponse)
async def organizer_history_csv(svc: SvcDep, who: PrincipalDep, organizer: Organizer = None,
                                bom: Bom = False) -> StreamingResponse:
    return history_csv(svc, "organizer-history.csv", bom,
                       organizer=organizer_target(who, organizer))


@router.get("/reports/organizer/charts/timeline.svg", response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}}}})
async def organizer_timeline_svg(svc: SvcDep, who: PrincipalDep,
                                 organizer: Organizer = None) -> Response:
    target = organizer_target(who, organizer)
    return svg(await charts.scope_timeline(svc, title=f"Answers over time: {target}",
                                           organizer=target))


@router.get("/reports/organizer/charts/games.svg", response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}}}})
async def organizer_games_svg(svc: SvcDep, who: PrincipalDep, organizer: Organizer = None,
                              since: Since = None, limit: GamesLimit = 40,
                              offset: Offset = 0) -> Response:
    target = organizer_target(who, organizer)
    return svg(await charts.scope_games(svc, title=f"Yes / no / maybe per game: {target}",
                                        organizer=target, since=since, limit=limit,
                                        offset=offset))


@router.post("/reports/organizer/send", response_model=SendOut, status_code=202)
async def organizer_send(svc: SvcDep, who: PrincipalDep, organizer: Organizer = None,
                         body: SendBody = None) -> SendOut:
    body = body or SendIn()
    target = organizer_target(who, organizer)
    to = recipient(who, body.to, target)
    return await send(svc, body, to, f"organizer {target}", "organizer.csv", organizer=target)


# --------------------------------------------------------------------------------------------
# One domain


@router.get("/reports/domain/{domain}/summary", response_model=ScopeReportOut)
async def domain_summary(domain: str, svc: SvcDep, who: PrincipalDep,
                         limit: EventsLimit = 100, offset: Offset = 0) -> ScopeReportOut:
    """Totals, per organizer, per event (a page) and per source for a whole domain."""
    domain = domain_target(who, domain)
    return await scope_report(svc, limit, offset, f"/api/v1/reports/domain/{domain}",
                              domain=domain)


@router.get("/reports/domain/{domain}.json", response_model=RowsPage)
async def domain_rows(domain: str, svc: SvcDep, who: PrincipalDep, limit: Limit = None,
                      cursor: Cursor = None) -> RowsPage:
    """The rows of the domain's CSV as JSON, a page at a time."""
    return await rows_json(svc, cursor, limit, domain=domain_target(who, domain))


@router.get("/reports/domain/{domain}/history.json", response_model=HistoryPage)
async def domain_history(domain: str, svc: SvcDep, who: PrincipalDep, limit: Limit = None,
                         cursor: Cursor = None) -> HistoryPage:
    return await history_json(svc, cursor, limit, domain=domain_target(who, domain))


@router.get("/reports/domain/{domain}/history.csv", response_class=StreamingResponse)
async def domain_history_csv(domain: str, svc: SvcDep, who: PrincipalDep,
                             bom: Bom = False) -> StreamingResponse:
    domain = domain_target(who, domain)
    return history_csv(svc, f"{domain}-history.csv", bom, domain=domain)


@router.get("/reports/domain/{domain}/charts/timeline.svg", response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}}}})
async def domain_timeline_svg(domain: str, svc: SvcDep, who: PrincipalDep) -> Response:
    domain = domain_target(who, domain)
    return svg(await charts.scope_timeline(svc, title=f"Answers over time: {domain}",
                                           domain=domain))


@router.get("/reports/domain/{domain}/charts/games.svg", response_class=Response,
            responses={200: {"content": {"image/svg+xml": {}}}})
async def domain_games_svg(domain: str, svc: SvcDep, who: PrincipalDep, since: Since = None,
                           limit: GamesLimit = 40, offset: Offset = 0) -> Response:
    domain = domain_target(who, domain)
    return svg(await charts.scope_games(svc, title=f"Yes / no / maybe per game: {domain}",
                                        domain=domain, since=since, limit=limit,
                                        offset=offset))


@router.post("/reports/domain/{domain}/send", response_model=SendOut, status_code=202)
async def domain_send(domain: str, svc: SvcDep, who: PrincipalDep,
                      body: SendBody = None) -> SendOut:
    body = body or SendIn()
    domain = domain_target(who, domain)
    to = recipient(who, body.to, who.organizer)
    return await send(svc, body, to, f"domain {domain}", f"{domain}.csv", domain=domain)
