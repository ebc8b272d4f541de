"""The REST API and pages as a client meets them (httpx against the ASGI app)."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from icalendar import Calendar

from ciserver import relay
from ciserver.services import apikeys, events, subscriptions
from ciserver.services.context import Services
from ciserver.web.app import create_app

from .conftest import ORGANIZER, Sink

START = datetime(2027, 5, 1, 18, 0, tzinfo=UTC)


@pytest.fixture
async def client(svc: Services) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(svc)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://testserver") as c:
        yield c


async def key_for(svc: Services, **scope: str | bool) -> dict[str, str]:
    _, key = await apikeys.create(svc, **scope)  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {key}"}


async def make_event(svc: Services, organizer: str = ORGANIZER, summary: str = "Game 1") -> str:
    async with svc.sessions.begin() as session:
        event = await events.create_via_api(svc, session, organizer=organizer,
                                            organizer_name="Org", summary=summary,
                                            start=START, end=START + timedelta(hours=2))
        return event.public_id


async def test_keys_and_scopes(svc: Services, client: httpx.AsyncClient) -> None:
    r = await client.get("/api/v1/events")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = await client.get("/api/v1/events", headers={"Authorization": "Bearer cis_nope"})
    assert r.status_code == 401
    mine = await make_event(svc)
    other = await make_event(svc, organizer="coach@nba.example", summary="Other")
    org = await key_for(svc, organizer=ORGANIZER)
    dom = await key_for(svc, domain="nba.example")
    admin = await key_for(svc, admin=True)
    assert [e["id"] for e in (await client.get("/api/v1/events", headers=org)).json()] == [mine]
    assert [e["id"] for e in (await client.get("/api/v1/events", headers=dom)).json()] == [other]
    assert len((await client.get("/api/v1/events", headers=admin)).json()) == 2
    r = await client.get(f"/api/v1/events/{other}", headers=org)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = await client.patch(f"/api/v1/events/{other}", headers=dom, json={"summary": "x"})
    assert r.status_code == 403
    r = await client.get("/api/v1/reports/domain/team.example.csv", headers=dom)
    assert r.status_code == 403
    # revoked keys stop working
    row, key = await apikeys.create(svc, organizer=ORGANIZER)
    assert await apikeys.revoke(svc, str(row.id))
    r = await client.get("/api/v1/events", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 401


async def test_event_fields_and_api_edits_fan_out(svc: Services, client: httpx.AsyncClient,
                                                  sink: Sink) -> None:
    org = await key_for(svc, organizer=ORGANIZER)
    r = await client.post("/api/v1/events", headers=org, json={
        "summary": "Season opener", "start": "2027-05-01T19:30:00", "end": "2027-05-01T22:00:00",
        "timezone": "America/New_York", "location": "MSG"})
    assert r.status_code == 201, r.text
    ev = r.json()
    for key in ("id", "uid", "summary", "start", "end", "status", "sequence", "page_url"):
        assert key in ev
    assert ev["start"].startswith("2027-05-01T23:30:00") and ev["timezone"] == "America/New_York"
    r = await client.post(f"/api/v1/events/{ev['id']}/attendees", headers=org,
                          json=[{"email": "a@example.com", "name": "A"},
                                {"email": "b@example.com"}])
    assert r.status_code == 202 and r.json() == {"count": 2, "already": 0}
    await relay.Relay(svc).drain()
    assert len(sink.wait(2)) == 2
    sink.clear()
    r = await client.patch(f"/api/v1/events/{ev['id']}", headers=org,
                           json={"start": "2027-05-01T20:00:00", "description": "Doors at 6"})
    assert r.status_code == 200 and r.json()["sequence"] == 1
    await relay.Relay(svc).drain()
    for m in sink.wait(2):
        vevent = Calendar.from_ical(m.calendar()).events[0]
        assert int(vevent["SEQUENCE"]) == 1 and "Doors at 6" in str(vevent["DESCRIPTION"])
        assert vevent.start.astimezone(UTC) == datetime(2027, 5, 2, 0, 0, tzinfo=UTC)
    sink.clear()
    r = await client.delete(f"/api/v1/events/{ev['id']}", headers=org)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    await relay.Relay(svc).drain()
    assert {str(Calendar.from_ical(m.calendar())["METHOD"]) for m in sink.wait(2)} == {"CANCEL"}
    r = await client.post(f"/api/v1/events/{ev['id']}/invites", json={"email": "c@example.com"})
    assert r.status_code == 409


async def test_bulk_csv_and_bad_addresses(svc: Services, client: httpx.AsyncClient) -> None:
    eid = await make_event(svc)
    org = await key_for(svc, organizer=ORGANIZER)
    r = await client.post(f"/api/v1/events/{eid}/attendees",
                          headers={**org, "Content-Type": "text/csv"},
                          content="email,name\nx@example.com,X\ny@example.com,\n")
    assert r.status_code == 202 and r.json()["count"] == 2
    r = await client.post(f"/api/v1/events/{eid}/attendees", headers=org,
                          files={"file": ("fans.csv", b"z@example.com,Zed\n", "text/csv")})
    assert r.status_code == 202 and r.json()["count"] == 1
    r = await client.post(f"/api/v1/events/{eid}/attendees", headers=org,
                          json=[{"email": "ok@example.com"}, {"email": "not an address"}])
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_email"
    attendees = (await client.get(f"/api/v1/events/{eid}/attendees", headers=org)).json()
    assert sorted(a["email"] for a in attendees) == ["x@example.com", "y@example.com",
                                                     "z@example.com"]  # nothing half-written
    assert all(a["rsvp"] is None and a["status"] == "active" for a in attendees)


async def test_public_invites(svc: Services, client: httpx.AsyncClient) -> None:
    a, b = await make_event(svc), await make_event(svc, summary="Game 2")
    r = await client.post(f"/api/v1/events/{a}/invites", json={"email": "Fan@Example.com"})
    assert r.status_code == 202 and r.json()["status"] == "queued"
    r = await client.post(f"/api/v1/events/{a}/invites", data={"email": "fan@example.com"})
    assert r.status_code == 202 and r.json()["status"] == "already_subscribed"
    r = await client.post("/api/v1/invites", json={"email": "multi@example.com",
                                                   "events": [a, b]})
    assert r.status_code == 202 and r.json()["events"] == [a, b]
    for body, code in (({"email": "nope"}, 422), ({}, 422)):
        r = await client.post(f"/api/v1/events/{a}/invites", json=body)
        assert r.status_code == code and "error" in r.json()
    r = await client.post(f"/api/v1/events/{a}/invites", content=b"{not json",
                          headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
    r = await client.post("/api/v1/events/zzzz/invites", json={"email": "x@example.com"})
    assert r.status_code == 404


async def test_rate_limit(svc: Services, client: httpx.AsyncClient) -> None:
    eid = await make_event(svc)
    svc.config.web.rate_limit = 3
    client._transport.app.state.ip_limiter.limit = 3  # type: ignore[attr-defined]
    codes = []
    for i in range(5):
        r = await client.post(f"/api/v1/events/{eid}/invites", json={"email": f"f{i}@example.com"})
        codes.append(r.status_code)
    assert codes == [202, 202, 202, 429, 429]
    assert r.headers["Retry-After"] and r.json()["error"]["code"] == "rate_limited"


async def test_page_escapes_organizer_text(svc: Services, client: httpx.AsyncClient) -> None:
    eid = await make_event(svc, summary='<script>alert("x")</script><img src=x onerror=alert(1)>')
    r = await client.get(f"/e/{eid}")
    assert r.status_code == 200
    assert "<script>" not in r.text and "<img src=x" not in r.text
    assert "&lt;script&gt;" in r.text
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    r = await client.post(f"/e/{eid}", data={"email": "page@example.com", "name": "P"})
    assert r.status_code == 200 and "on its way" in r.text
    r = await client.post(f"/e/{eid}", data={"email": "bad"})
    assert r.status_code == 422 and "valid email" in r.text
    r = await client.post(f"/e/{eid}", data={"email": "bot@example.com", "website": "spam"})
    assert r.status_code == 200  # the honeypot answers like success but subscribes nobody
    org = await key_for(svc, organizer=ORGANIZER)
    emails = [a["email"] for a in (await client.get(f"/api/v1/events/{eid}/attendees",
                                                    headers=org)).json()]
    assert emails == ["page@example.com"]


async def test_unsubscribe_one_click(svc: Services, client: httpx.AsyncClient,
                                     sink: Sink) -> None:
    eid = await make_event(svc)
    async with svc.sessions.begin() as session:
        event = await events.find(session, eid)
        sub = (await subscriptions.invite(svc, session, event, "u@example.com")).subscription
    token = svc.book.token(sub.id)
    r = await client.get(f"/u/{token}")
    assert r.status_code == 200 and "Unsubscribe" in r.text
    r = await client.get(f"/u/{'a' * 26}")
    assert r.status_code == 404
    org = await key_for(svc, organizer=ORGANIZER)
    attendees = (await client.get(f"/api/v1/events/{eid}/attendees", headers=org)).json()
    assert attendees[0]["status"] == "active"  # a GET (mail scanners) changes nothing
    r = await client.post(f"/u/{token}", content=b"List-Unsubscribe=One-Click",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200
    attendees = (await client.get(f"/api/v1/events/{eid}/attendees", headers=org)).json()
    assert attendees[0]["status"] == "unsubscribed"
    await relay.Relay(svc).drain()
    assert sink.to("u@example.com") == []  # the queued invite was cancelled


async def test_reports_and_ops(svc: Services, client: httpx.AsyncClient) -> None:
    eid = await make_event(svc, summary="=HYPERLINK(\"http://evil\")")
    async with svc.sessions.begin() as session:
        event = await events.find(session, eid)
        await subscriptions.invite(svc, session, event, "r@example.com", "+cmd|' /C calc'!A0")
    org = await key_for(svc, organizer=ORGANIZER)
    r = await client.get(f"/api/v1/events/{eid}/report.csv", headers=org)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert rows[0]["event_summary"].startswith("'=") and rows[0]["name"].startswith("'+")
    assert list(rows[0])[:9] == ["event_uid", "event_summary", "event_start", "email", "name",
                                 "rsvp", "partstat", "responded_at", "occurrence"]
    r = await client.get("/api/v1/reports/organizer.csv", headers=org)
    assert r.status_code == 200 and "r@example.com" in r.text
    r = await client.get("/api/v1/reports/organizer.csv?bom=true", headers=org)
    assert r.content.startswith("\ufeff".encode())
    assert (await client.get("/healthz")).json()["status"] == "ok"
    spec = (await client.get("/openapi.json")).json()
    assert "/api/v1/events/{event_id}/invites" in spec["paths"]
    assert (await client.get("/metrics")).status_code == 200  # from 127.0.0.1
    outside = httpx.AsyncClient(transport=httpx.ASGITransport(
        app=create_app(svc), client=("203.0.113.5", 40000)), base_url="http://testserver")
    async with outside:
        r = await outside.get("/metrics")
        assert r.status_code == 403 and "metrics_allow" in r.text
        assert (await outside.get("/healthz")).status_code == 200


async def test_api_docs_page_gets_a_policy_that_lets_swagger_run(
        client: httpx.AsyncClient) -> None:
    r = await client.get("/api/docs")
    assert r.status_code == 200 and "/openapi.json" in r.text
    csp = r.headers["content-security-policy"]
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert f'<script nonce="{nonce}">' in r.text and "<script>" not in r.text
    assert "https://cdn.jsdelivr.net" in csp and "frame-ancestors 'none'" in csp
    # the CDN's files are pinned and checked by the browser (Subresource Integrity)
    for name in ("swagger-ui-bundle.js", "swagger-ui.css"):
        tag = next(line for line in r.text.splitlines() if name in line)
        assert "@5.35.0/" in tag and 'integrity="sha384-' in tag and "crossorigin" in tag
    # every other HTML page keeps the strict policy: no CDN
    r = await client.get("/console/login")
    assert "cdn.jsdelivr.net" not in r.headers["content-security-policy"]
