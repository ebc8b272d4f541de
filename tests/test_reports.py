"""Reports as organizers and domain owners meet them: CSV parsed back, counts, the answer
history with late and stale answers flagged, rows per occurrence, where customers came from,
domain isolation (several domains; organizer, domain and admin keys; API and CLI), mail with
the CSV attached (CLI --send, the API, the schedules, with two instances at once), SVG
charts, BOM and formula neutralising, and the JSON pages."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from ciserver import config as config_mod
from ciserver import relay
from ciserver.services import apikeys, charts, events, reports, schedule, subscriptions
from ciserver.services.context import Services
from ciserver.store import db, models
from ciserver.web.app import create_app

from .conftest import DOMAIN, ORGANIZER, Captured, Pipeline, Sink, make_config
from .test_replies import FAN_ONE, FAN_TWO, LAST_END, game_night, itip, organizer_update, send_itip

START = datetime(2027, 5, 1, 18, 0, tzinfo=UTC)
NOW = datetime(2027, 4, 1, 12, 0, tzinfo=UTC)
COLUMNS = ["event_uid", "event_summary", "event_start", "email", "name", "rsvp", "partstat",
           "responded_at", "occurrence", "status", "source", "event_id"]
SVG = "{http://www.w3.org/2000/svg}"


@pytest.fixture
async def client(svc: Services) -> AsyncIterator[httpx.AsyncClient]:
    svc.clock = lambda: NOW
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(svc)),
                                 base_url="http://testserver") as c:
        yield c


async def key_for(svc: Services, **scope: Any) -> dict[str, str]:
    _, key = await apikeys.create(svc, **scope)
    return {"Authorization": f"Bearer {key}"}


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text.removeprefix("\ufeff"))))


async def make_event(svc: Services, organizer: str = ORGANIZER, summary: str = "Game 1",
                     start: datetime = START) -> models.Event:
    async with svc.sessions.begin() as session:
        return await events.create_via_api(svc, session, organizer=organizer,
                                           organizer_name="Org", summary=summary, start=start,
                                           end=start + timedelta(hours=2))


async def add(svc: Services, event: models.Event, email: str, *, name: str = "",
              source: str = "page", origin: str = "", partstat: str = "",
              status: str = "active", at: datetime | None = None) -> int:
    """A customer, their answer (applied, with its history) and status."""
    async with svc.sessions.begin() as session:
        ev = await session.get(models.Event, event.id)
        assert ev is not None
        sub = (await subscriptions.invite(svc, session, ev, email, name, source, origin=origin,
                                          send=False)).subscription
        if partstat:
            await answer(session, sub.id, partstat, at=at or svc.now())
        if status != "active":
            await subscriptions.stop(svc, session, sub, status)
        return sub.id


async def answer(session: Any, sub_id: int, partstat: str, *, at: datetime,
                 outcome: str = "applied", occurrence: str = "", sequence: int = 0,
                 comment: str = "") -> None:
    """What services.attendee records for one received answer."""
    session.add(models.RsvpHistory(subscription_id=sub_id, occurrence=occurrence,
                                   partstat=partstat, sequence=sequence, stamp=at,
                                   comment=comment, outcome=outcome, received_at=at))
    if outcome != "applied":
        return
    current = (await session.execute(select(models.Answer).where(
        models.Answer.subscription_id == sub_id, models.Answer.occurrence == occurrence))
    ).scalar_one_or_none()
    if current is None:
        session.add(models.Answer(subscription_id=sub_id, occurrence=occurrence,
                                  partstat=partstat, sequence=sequence, stamp=at,
                                  comment=comment, received_at=at))
    else:
        current.partstat, current.received_at = partstat, at
    if not occurrence:
        sub = await session.get(models.Subscription, sub_id)
        sub.partstat, sub.responded_at = partstat, at


def attachment(mail: Captured) -> tuple[str, str]:
    """(file name, text) of the mail's CSV attachment."""
    for part in mail.message.walk():
        if part.get_filename():
            assert part.get_content_type() == "text/csv"
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            return part.get_filename() or "", payload.decode("utf-8")
    raise AssertionError("no attachment")


def svg_root(text: str) -> ET.Element:
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg"
    assert not any(el.tag.endswith("script") or el.tag.endswith("foreignObject")
                   for el in root.iter())
    assert not any(a.startswith("on") for el in root.iter() for a in el.attrib)
    return root


def svg_text(root: ET.Element) -> str:
    return " ".join(t for el in root.iter() for t in (el.text or "",))


# --------------------------------------------------------------------------------------------
# One event: counts, rows, origin, JSON pages


@dataclass
class Season:
    game: models.Event
    other: models.Event


async def season(svc: Services) -> Season:
    game = await make_event(svc, summary="Final")
    other = await make_event(svc, summary="Semi", start=START - timedelta(days=3))
    t = NOW - timedelta(days=3)
    await add(svc, game, "yes1@example.com", name="Ann", source="page", origin="spring-page",
              partstat="ACCEPTED", at=t)
    await add(svc, game, "yes2@example.com", source="page", origin="button",
              partstat="ACCEPTED", at=t + timedelta(hours=5))
    await add(svc, game, "no@example.com", source="api", origin="cis_abcdefgh",
              partstat="DECLINED", at=t + timedelta(days=1))
    await add(svc, game, "maybe@example.com", source="forwarded",
              origin="forwarded by yes1@example.com", partstat="TENTATIVE",
              at=t + timedelta(days=1, hours=2))
    await add(svc, game, "quiet@example.com", source="page", origin="spring-page")
    await add(svc, game, "gone@example.com", source="page", origin="button", status="bounced")
    await add(svc, game, "stop@example.com", source="api", origin="cis_abcdefgh",
              partstat="DECLINED", status="unsubscribed")
    await add(svc, other, "yes1@example.com", partstat="ACCEPTED", at=t)
    return Season(game, other)


async def test_counts_rows_and_origin(svc: Services, client: httpx.AsyncClient) -> None:
    s = await season(svc)
    org = await key_for(svc, organizer=ORGANIZER)
    gid = s.game.public_id

    r = await client.get(f"/api/v1/events/{gid}/report.csv", headers=org)
    rows = parse_csv(r.text)
    assert list(rows[0])[:12] == COLUMNS and "origin" in rows[0]
    by = {row["email"]: row for row in rows}
    assert len(rows) == 7
    assert {e: (x["rsvp"], x["status"]) for e, x in by.items()} == {
        "yes1@example.com": ("Y", "active"), "yes2@example.com": ("Y", "active"),
        "no@example.com": ("N", "active"), "maybe@example.com": ("M", "active"),
        "quiet@example.com": ("", "active"), "gone@example.com": ("", "bounced"),
        "stop@example.com": ("N", "unsubscribed")}
    assert (by["yes1@example.com"]["source"], by["yes1@example.com"]["origin"]) == (
        "page", "spring-page")
    assert by["yes2@example.com"]["origin"] == "button"
    assert (by["no@example.com"]["source"], by["no@example.com"]["origin"]) == (
        "api", "cis_abcdefgh")
    assert by["maybe@example.com"]["origin"] == "forwarded by yes1@example.com"
    assert by["yes1@example.com"]["responded_at"] == "2027-03-29T12:00:00Z"
    assert by["quiet@example.com"]["responded_at"] == ""
    assert all(x["event_id"] == gid and x["event_summary"] == "Final" for x in rows)

    r = await client.get(f"/api/v1/events/{gid}/summary", headers=org)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["counts"] == {"invited": 7, "Y": 2, "N": 2, "M": 1, "no_answer": 2,
                              "bounced": 1, "unsubscribed": 1}
    assert body["occurrences"] == []
    sources = {(x["source"], x["origin"]): x["counts"]["invited"] for x in body["sources"]}
    assert sources == {("page", "spring-page"): 2, ("page", "button"): 2,
                       ("api", "cis_abcdefgh"): 2,
                       ("forwarded", "forwarded by yes1@example.com"): 1}
    assert body["charts"]["games"].endswith(f"/events/{gid}/charts/games.svg")

    # The JSON equivalent, a page at a time, gives the same rows in the same order.
    got: list[dict[str, Any]] = []
    cursor = None
    pages = 0
    while True:
        r = await client.get(f"/api/v1/events/{gid}/report.json", headers=org,
                             params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        got += page["rows"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 4
    assert [x["email"] for x in got] == [x["email"] for x in rows]
    assert got[0]["rsvp"] is None or got[0]["rsvp"] in "YNM"
    quiet = next(x for x in got if x["email"] == "quiet@example.com")
    assert quiet["rsvp"] is None and quiet["responded_at"] is None and quiet["occurrence"] is None
    r = await client.get(f"/api/v1/events/{gid}/report.json", headers=org,
                         params={"cursor": "garbage!"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"

    # The organizer's summary: totals, per event, sources.
    r = await client.get("/api/v1/reports/organizer/summary", headers=org)
    body = r.json()
    assert body["events_total"] == 2 and [e["summary"] for e in body["events"]] == ["Semi",
                                                                                   "Final"]
    assert body["totals"]["invited"] == 8 and body["totals"]["Y"] == 3
    r = await client.get("/api/v1/reports/organizer/summary?limit=1&offset=0", headers=org)
    assert r.json()["next_offset"] == 1 and len(r.json()["events"]) == 1

    # Organizer JSON pages cover both events, in the CSV's order.
    r = await client.get("/api/v1/reports/organizer.csv", headers=org)
    csv_emails = [(x["event_id"], x["email"]) for x in parse_csv(r.text)]
    r = await client.get("/api/v1/reports/organizer.json?limit=10000", headers=org)
    assert [(x["event_id"], x["email"]) for x in r.json()["rows"]] == csv_emails
    assert r.json()["next_cursor"] is None


async def test_sqlite_fast_path_matches_the_generic_one(sqlite_svc: Services,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    svc = sqlite_svc
    svc.clock = lambda: NOW
    s = await season(svc)
    odd = await make_event(svc, summary='He said "go",\nthen\r-left', start=START)
    tricky = ['Last, First', 'A "quoted" name', "two\nlines", "cr\rhere", "=1+1", "-3,4",
              "@home, \"x\"", "Zoë ñ 東京", "", "'already", "\ttab", "|pipe", "%pct",
              "＝HYPERLINK(1)", "＋1", "－1", "＠SUM(1)"]
    for i, name in enumerate(tricky):
        sub_id = await add(svc, odd, f"t{i:02d}@example.com", origin=f"o{i}, {name}",
                           partstat=("ACCEPTED", "DECLINED", "DELEGATED", "X-ODD,ONE", "")[i % 5])
        async with svc.sessions.begin() as session:  # as stored, past any input cleaning
            await session.execute(update(models.Subscription).where(
                models.Subscription.id == sub_id).values(name=name))
    async with svc.sessions.begin() as session:
        sub = (await session.execute(select(models.Subscription).where(
            models.Subscription.email == "maybe@example.com"))).scalar_one()
        await answer(session, sub.id, "DECLINED", at=NOW, occurrence="2027-05-08T18:00:00Z")
        await session.execute(update(models.Event).where(models.Event.id == odd.id)
                              .values(organizer_uid="-uid,with comma"))
    fast = await reports.csv_text(svc, organizer=ORGANIZER)
    sync_chunks = reports.csv_sync_chunks(svc, organizer=ORGANIZER, batch=4)
    assert sync_chunks is not None and "".join(sync_chunks) == fast
    monkeypatch.setattr(reports, "sqlite_path", lambda svc: None)
    generic = await reports.csv_text(svc, organizer=ORGANIZER)
    assert generic == fast
    rows = parse_csv(fast)
    assert len(rows) == 9 + len(tricky)
    by = {r["email"]: r for r in rows}
    assert [by[f"t{i:02d}@example.com"]["name"] for i in range(len(tricky))] == [
        "Last, First", 'A "quoted" name', "two\nlines", "cr\rhere",
        "'=1+1", "'-3,4", "'@home, \"x\"", "Zoë ñ 東京", "", "'already", "'\ttab", "'|pipe",
        "'%pct", "'＝HYPERLINK(1)", "'＋1", "'－1", "'＠SUM(1)"]
    assert by["t03@example.com"]["partstat"] == "X-ODD,ONE" and by["t03@example.com"][
        "rsvp"] == ""
    assert by["t02@example.com"]["responded_at"] != ""  # DELEGATED: an answer, no letter
    assert by["t00@example.com"]["event_uid"] == "'-uid,with comma"
    async with svc.sessions() as session:
        plain = [r async for r in reports.stream_rows(session, event_id=s.game.id)]
    assert [r.email for r in plain] == [x["email"] for x in parse_csv(
        await reports.csv_text(svc, event_id=s.game.id))]
    assert await reports.count_rows(svc, organizer=ORGANIZER) == 9 + len(tricky)


# --------------------------------------------------------------------------------------------
# History: every answer with its time; stale and late ones kept and flagged; occurrences


async def test_history_per_occurrence_late_and_stale(sqlite_pipeline: Pipeline) -> None:
    p = sqlite_pipeline
    game = await game_night(p, FAN_ONE, FAN_TWO)
    await organizer_update(p, game, 1)
    p.sink.clear()
    await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="ACCEPTED",
                                           sequence=1, dtstamp=datetime(2026, 2, 20, 9,
                                                                        tzinfo=UTC)))
    p.now += timedelta(hours=1)
    stale = await send_itip(p, game, FAN_TWO, itip("REPLY", game, FAN_TWO, partstat="DECLINED",
                                                   sequence=0, dtstamp=datetime(2026, 2, 20, 10,
                                                                                tzinfo=UTC)))
    assert "stale" in stale.result
    p.now += timedelta(hours=1)
    await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE, partstat="DECLINED",
                                           sequence=1, rid="RECURRENCE-ID:20260311T230000Z",
                                           dtstamp=datetime(2026, 2, 20, 11, tzinfo=UTC)))
    p.now = LAST_END + timedelta(minutes=5)
    late = await send_itip(p, game, FAN_ONE, itip("REPLY", game, FAN_ONE, partstat="ACCEPTED",
                                                  sequence=1,
                                                  dtstamp=LAST_END + timedelta(minutes=4)))
    assert "late" in late.result
    auth = await p.auth()

    r = await p.http.get(f"/api/v1/events/{game.id}/history.json", headers=auth)
    assert r.status_code == 200, r.text
    entries = r.json()["entries"]
    assert [(e["email"], e["occurrence"], e["partstat"], e["outcome"], e["late"], e["stale"])
            for e in entries] == [
        (FAN_TWO, None, "ACCEPTED", "applied", False, False),
        (FAN_TWO, None, "DECLINED", "stale", False, True),
        (FAN_ONE, "2026-03-11T23:00:00Z", "DECLINED", "applied", False, False),
        (FAN_ONE, None, "ACCEPTED", "late", True, False)]
    assert entries[0]["received_at"] == "2026-02-20T15:00:00Z"
    assert entries[3]["received_at"] == "2026-03-26T02:05:00Z"
    assert entries[1]["sequence"] == 0 and entries[1]["answer_stamp"] == "2026-02-20T10:00:00Z"

    r = await p.http.get(f"/api/v1/events/{game.id}/history.csv", headers=auth)
    hist = parse_csv(r.text)
    assert [(h["outcome"], h["late"], h["stale"]) for h in hist] == [
        ("applied", "", ""), ("stale", "", "yes"), ("applied", "", ""), ("late", "yes", "")]
    # A page at a time, with a cursor
    r = await p.http.get(f"/api/v1/events/{game.id}/history.json?limit=3", headers=auth)
    first = r.json()
    r = await p.http.get(f"/api/v1/events/{game.id}/history.json", headers=auth,
                         params={"limit": 3, "cursor": first["next_cursor"]})
    assert [e["outcome"] for e in r.json()["entries"]] == ["late"]
    assert r.json()["next_cursor"] is None

    # The report: late and stale answers change nothing; the occurrence has its own row.
    report = await p.report(game.id)
    assert [(x["email"], x["occurrence"], x["rsvp"]) for x in report] == [
        (FAN_ONE, "", ""), (FAN_ONE, "2026-03-11T23:00:00Z", "N"), (FAN_TWO, "", "Y")]
    r = await p.http.get(f"/api/v1/events/{game.id}/summary", headers=auth)
    occ = {o["occurrence"]: o["counts"] for o in r.json()["occurrences"]}
    assert list(occ) == ["2026-03-05T00:00:00Z", "2026-03-11T23:00:00Z",
                         "2026-03-18T23:00:00Z", "2026-03-25T23:00:00Z"]
    assert occ["2026-03-11T23:00:00Z"] == {"invited": 2, "Y": 1, "N": 1, "M": 0,
                                           "no_answer": 0, "bounced": 0, "unsubscribed": 0}
    assert occ["2026-03-18T23:00:00Z"]["Y"] == 1 and occ["2026-03-18T23:00:00Z"][
        "no_answer"] == 1

    # Charts of the same event: the timeline ends with one yes; a bar per occurrence.
    r = await p.http.get(f"/api/v1/events/{game.id}/charts/timeline.svg", headers=auth)
    assert r.headers["content-type"].startswith("image/svg+xml")
    assert "default-src 'none'" in r.headers["content-security-policy"]
    root = svg_root(r.text)
    assert "yes 1" in svg_text(root) and "invited 2" in svg_text(root)
    r = await p.http.get(f"/api/v1/events/{game.id}/charts/games.svg", headers=auth)
    root = svg_root(r.text)
    labels = [t.text for t in root.iter(f"{SVG}text")]
    assert "2026-03-11T23:00:00Z" in labels and "Y 1 · N 1 · M 0 / 2" in labels


async def test_timeline_counts_changes_once(sqlite_svc: Services) -> None:
    svc = sqlite_svc
    svc.clock = lambda: NOW
    ev = await make_event(svc)
    t0 = NOW - timedelta(days=2)
    sub = await add(svc, ev, "a@example.com", partstat="ACCEPTED", at=t0)
    await add(svc, ev, "b@example.com", partstat="TENTATIVE", at=t0 + timedelta(hours=2))
    async with svc.sessions.begin() as session:
        await answer(session, sub, "DECLINED", at=t0 + timedelta(days=1))
        await answer(session, sub, "ACCEPTED", at=t0 + timedelta(days=1, hours=1),
                     outcome="stale")
    async with svc.sessions() as session:
        points = await reports.timeline(session, svc.dialect, event_id=ev.id, until=NOW)
    last = points[-1]
    assert (last.invited, last.yes, last.no, last.maybe) == (2, 0, 1, 1)
    assert max(p.yes for p in points) == 1
    assert points == sorted(points, key=lambda p: p.at)


# --------------------------------------------------------------------------------------------
# Domain isolation


@dataclass
class World:
    a: models.Event  # a@team.example
    b: models.Event  # b@team.example
    c: models.Event  # c@nba.example
    d: models.Event  # d@team.example.org: a longer domain, not team.example


async def world(svc: Services) -> World:
    w = World(await make_event(svc, "a@team.example", "A game"),
              await make_event(svc, "b@team.example", "B game"),
              await make_event(svc, "c@nba.example", "C game"),
              await make_event(svc, "d@team.example.org", "D game"))
    for ev, fan in ((w.a, "fan.a"), (w.b, "fan.b"), (w.c, "fan.c"), (w.d, "fan.d")):
        await add(svc, ev, f"{fan}@example.com", partstat="ACCEPTED")
    return w


FAN = {"a": "fan.a@example.com", "b": "fan.b@example.com", "c": "fan.c@example.com",
       "d": "fan.d@example.com"}


async def test_domain_isolation_api(svc: Services, client: httpx.AsyncClient,
                                    sink: Sink) -> None:
    w = await world(svc)
    key_a = await key_for(svc, organizer="a@team.example")
    key_team = await key_for(svc, domain="team.example")
    key_nba = await key_for(svc, domain="nba.example")
    admin = await key_for(svc, admin=True)

    async def emails(path: str, key: dict[str, str], **params: Any) -> set[str]:
        r = await client.get(path, headers=key, params=params)
        assert r.status_code == 200, (path, r.text)
        if path.endswith(".csv"):
            return {x["email"] for x in parse_csv(r.text)}
        if path.endswith("history.json"):
            return {x["email"] for x in r.json()["entries"]}
        if path.endswith(".json"):
            return {x["email"] for x in r.json()["rows"]}
        return {o for e in r.json()["events"] for o in [e["organizer"]]}

    async def code(method: str, path: str, key: dict[str, str], **params: Any) -> int:
        r = await client.request(method, path, headers=key, params=params,
                                 **({"json": {}} if method == "POST" else {}))
        return r.status_code

    fans = {k: {v} for k, v in FAN.items()}
    org_paths = ["/api/v1/reports/organizer.csv", "/api/v1/reports/organizer.json",
                 "/api/v1/reports/organizer/history.csv",
                 "/api/v1/reports/organizer/history.json"]
    for path in org_paths:
        assert await emails(path, key_a) == fans["a"]
        assert await emails(path, key_team, organizer="b@team.example") == fans["b"]
        assert await emails(path, admin, organizer="c@nba.example") == fans["c"]
        assert await code("GET", path, key_a, organizer="b@team.example") == 403
        assert await code("GET", path, key_team, organizer="c@nba.example") == 403
        assert await code("GET", path, key_team, organizer="d@team.example.org") == 403
        assert await code("GET", path, key_nba, organizer="a@team.example") == 403
    assert await emails("/api/v1/reports/organizer/summary", key_a) == {"a@team.example"}
    for tail in ("summary", "charts/timeline.svg", "charts/games.svg"):
        path = f"/api/v1/reports/organizer/{tail}"
        assert await code("GET", path, key_a, organizer="c@nba.example") == 403
        assert await code("GET", path, key_team, organizer="b@team.example") == 200
    r = await client.get("/api/v1/reports/organizer/charts/games.svg", headers=key_a)
    assert "A game" in r.text and "B game" not in r.text

    for suffix in (".csv", ".json", "/history.csv", "/history.json"):
        path = f"/api/v1/reports/domain/team.example{suffix}"
        assert await emails(path, key_team) == fans["a"] | fans["b"]  # not d@team.example.org
        assert await emails(path, admin) == fans["a"] | fans["b"]
        for key in (key_a, key_nba):
            assert await code("GET", path, key) == 403
        assert await emails(f"/api/v1/reports/domain/nba.example{suffix}", key_nba) == fans["c"]
        assert await code("GET", f"/api/v1/reports/domain/nba.example{suffix}", key_team) == 403
    r = await client.get("/api/v1/reports/domain/team.example/summary", headers=key_team)
    body = r.json()
    assert {o["organizer"] for o in body["organizers"]} == {"a@team.example", "b@team.example"}
    assert body["totals"]["invited"] == 2 and body["events_total"] == 2
    for tail in ("summary", "charts/timeline.svg", "charts/games.svg"):
        assert await code("GET", f"/api/v1/reports/domain/nba.example/{tail}", key_team) == 403
        assert await code("GET", f"/api/v1/reports/domain/team.example/{tail}", key_a) == 403
    r = await client.get("/api/v1/reports/domain/team.example/charts/games.svg",
                         headers=key_team)
    assert "C game" not in r.text and "D game" not in r.text and "B game" in r.text

    # One event: another domain's event does not exist for the key.
    for tail in ("summary", "report.json", "report.csv", "history.json", "history.csv",
                 "charts/timeline.svg", "charts/games.svg"):
        assert await code("GET", f"/api/v1/events/{w.c.public_id}/{tail}", key_team) == 404
        assert await code("GET", f"/api/v1/events/{w.b.public_id}/{tail}", key_a) == 404
        assert await code("GET", f"/api/v1/events/{w.b.public_id}/{tail}", key_team) == 200
        assert await code("GET", f"/api/v1/events/{w.c.public_id}/{tail}", admin) == 200
    assert await code("POST", f"/api/v1/events/{w.c.public_id}/report/send", key_team) == 404

    # Sending: never to an address outside what the key owns.
    r = await client.post("/api/v1/reports/organizer/send", headers=key_a,
                          json={"to": "someone@evil.example"})
    assert r.status_code == 403
    r = await client.post("/api/v1/reports/domain/team.example/send", headers=key_team,
                          json={"to": "boss@nba.example"})
    assert r.status_code == 403
    r = await client.post("/api/v1/reports/domain/team.example/send", headers=key_team)
    assert r.status_code == 422  # a domain report needs "to"
    r = await client.post("/api/v1/reports/domain/nba.example/send", headers=key_team,
                          json={"to": "boss@team.example"})
    assert r.status_code == 403
    r = await client.post("/api/v1/reports/domain/team.example/send", headers=key_team,
                          json={"to": "boss@team.example"})
    assert r.status_code == 202 and r.json()["to"] == "boss@team.example"
    await relay.Relay(svc).drain()
    (mail,) = sink.wait(1)
    assert mail.rcpt_tos == ["boss@team.example"]
    name, text = attachment(mail)
    assert name == "team.example.csv"
    assert {x["email"] for x in parse_csv(text)} == fans["a"] | fans["b"]


async def test_api_send_mails_the_csv(svc: Services, client: httpx.AsyncClient,
                                      sink: Sink) -> None:
    s = await season(svc)
    org = await key_for(svc, organizer=ORGANIZER)
    r = await client.post(f"/api/v1/events/{s.game.public_id}/report/send", headers=org)
    assert r.status_code == 202, r.text
    assert r.json() == {"status": "queued", "to": ORGANIZER,
                        "filename": f"{s.game.public_id}.csv", "rows": 7}
    r = await client.post(f"/api/v1/events/{s.game.public_id}/report/send", headers=org,
                          json={"history": True, "bom": False})
    assert r.status_code == 202 and r.json()["filename"] == f"{s.game.public_id}-history.csv"
    await relay.Relay(svc).drain()
    report_mail, history_mail = sorted(sink.wait(2), key=lambda m: attachment(m)[0])[::-1]
    assert report_mail.rcpt_tos == [ORGANIZER]
    assert "Invited 7: yes 2, no 2, maybe 1, no answer 2" in report_mail.text()
    name, text = attachment(report_mail)
    assert name == f"{s.game.public_id}.csv" and text.startswith("\ufeff")  # BOM by default
    expected = (await client.get(f"/api/v1/events/{s.game.public_id}/report.csv",
                                 headers=org)).text
    assert parse_csv(text) == parse_csv(expected)
    name, text = attachment(history_mail)
    assert name.endswith("-history.csv") and not text.startswith("\ufeff")
    assert {h["outcome"] for h in parse_csv(text)} == {"applied"}
    assert len(parse_csv(text)) == 5


# --------------------------------------------------------------------------------------------
# Spreadsheet safety and BOM


async def test_formulas_neutralised_everywhere(svc: Services, client: httpx.AsyncClient) -> None:
    ev = await make_event(svc, summary='=HYPERLINK("http://evil","x")')
    sub = await add(svc, ev, "=cmd@example.com", name="+SUM(A1)", origin="@origin")
    async with svc.sessions.begin() as session:
        await answer(session, sub, "ACCEPTED", at=NOW, comment="-2+3")
    org = await key_for(svc, organizer=ORGANIZER)
    row = parse_csv((await client.get(f"/api/v1/events/{ev.public_id}/report.csv",
                                      headers=org)).text)[0]
    assert row["event_summary"].startswith("'=") and row["name"] == "'+SUM(A1)"
    assert row["email"] == "'=cmd@example.com" and row["origin"] == "'@origin"
    hist = parse_csv((await client.get(f"/api/v1/events/{ev.public_id}/history.csv",
                                       headers=org)).text)[0]
    assert hist["comment"] == "'-2+3" and hist["email"] == "'=cmd@example.com"
    # JSON is no spreadsheet: the values as they are.
    r = await client.get(f"/api/v1/events/{ev.public_id}/report.json", headers=org)
    assert r.json()["rows"][0]["name"] == "+SUM(A1)"
    for path in (f"/api/v1/events/{ev.public_id}/report.csv",
                 f"/api/v1/events/{ev.public_id}/history.csv",
                 "/api/v1/reports/organizer.csv", "/api/v1/reports/organizer/history.csv"):
        with_bom = await client.get(path, headers=org, params={"bom": "true"})
        without = await client.get(path, headers=org)
        assert with_bom.content == "\ufeff".encode() + without.content
        assert not without.content.startswith("\ufeff".encode())


# --------------------------------------------------------------------------------------------
# Charts


def test_chart_functions_escape_text() -> None:
    evil = '<script>alert("x")</script> & \'q\' \x01\x1b ]]> <!--'
    t0 = datetime(2027, 1, 1, tzinfo=UTC)
    points = [reports.TimelinePoint(t0 + timedelta(hours=i), i, i // 2, i // 3, 0)
              for i in range(10)]
    for text in (charts.timeline_svg(points, title=evil),
                 charts.games_svg([(evil, reports.Counts(5, 2, 1, 1, 1)),
                                   ("ok", reports.Counts(3, 3))], title=evil, more=4),
                 charts.empty_svg(evil, evil)):
        root = svg_root(text)
        assert "<script" not in text and "\x01" not in text
        title = root.find(f"{SVG}title")
        assert title is not None and title.text == evil.replace("\x01", "").replace("\x1b", "")
    root = svg_root(charts.games_svg([("g", reports.Counts(5, 2, 1, 1, 1))], title="t"))
    bars = [el for el in root.iter(f"{SVG}rect") if el.find(f"{SVG}title") is not None]
    assert [b.find(f"{SVG}title").text for b in bars] == [  # type: ignore[union-attr]
        "yes: 2", "maybe: 1", "no: 1", "no answer: 1"]
    svg_root(charts.timeline_svg([], title="nothing"))
    svg_root(charts.games_svg([], title="nothing"))


async def test_chart_routes_escape_organizer_text(svc: Services,
                                                  client: httpx.AsyncClient) -> None:
    evil = '<svg onload="alert(1)"><script>alert(2)</script>&amp;'
    ev = await make_event(svc, summary=evil)
    await add(svc, ev, "fan@example.com", name=evil, partstat="ACCEPTED",
              at=NOW - timedelta(days=1))
    org = await key_for(svc, organizer=ORGANIZER)
    for path in (f"/api/v1/events/{ev.public_id}/charts/timeline.svg",
                 f"/api/v1/events/{ev.public_id}/charts/games.svg",
                 "/api/v1/reports/organizer/charts/timeline.svg",
                 "/api/v1/reports/organizer/charts/games.svg"):
        r = await client.get(path, headers=org)
        assert r.status_code == 200 and r.headers["content-type"].startswith("image/svg+xml")
        root = svg_root(r.text)
        if "games" in path or path.startswith("/api/v1/events"):
            assert evil in svg_text(root) or any(
                evil in (el.text or "") for el in root.iter())
    assert (await client.get(f"/api/v1/events/{ev.public_id}/charts/games.svg")
            ).status_code == 401


# --------------------------------------------------------------------------------------------
# Schedules: one mail per event and per day, with two instances at once


async def _outbox_reports(svc: Services) -> list[models.OutboxItem]:
    async with svc.sessions() as session:
        return list((await session.execute(select(models.OutboxItem).where(
            models.OutboxItem.kind == "message").order_by(models.OutboxItem.id))
        ).scalars().all())


async def test_final_report_once_with_two_instances(tmp_path: Path, db_url: str,
                                                    sink: Sink) -> None:
    cfg = make_config(tmp_path, db_url, sink, reports={"after_event": "true"})
    one, two = Services.open(cfg), Services.open(cfg)
    await db.ensure_schema(one.engine, cfg.database_url)
    try:
        clock = [NOW]
        one.clock = two.clock = lambda: clock[0]
        s = await season(one)
        assert await schedule.tick(one) == 0  # not ended yet
        clock[0] = START + timedelta(hours=2, minutes=1)  # "Final" ended a minute ago
        results = await asyncio.gather(*(schedule.tick(x) for x in (one, two, one, two)))
        assert sum(results) == 2  # "Final" and "Semi" (ended a week before), once each
        assert await schedule.tick(two) == 0
        clock[0] += timedelta(days=1)
        assert await asyncio.gather(schedule.tick(one), schedule.tick(two)) == [0, 0]
        items = await _outbox_reports(one)
        assert len(items) == 2
        async with one.sessions() as session:
            sent = (await session.execute(select(models.Event.report_sent_at).where(
                models.Event.id == s.game.id))).scalar_one()
        assert sent == START + timedelta(hours=2, minutes=1)
        # The claim itself, raced head to head: exactly one instance wins it.
        async with one.sessions.begin() as session:
            await session.execute(update(models.Event).where(models.Event.id == s.other.id)
                                  .values(report_sent_at=None))
        mail = await reports.prepare_mail(one, to=ORGANIZER, title="x", event_id=s.other.id)
        won = await asyncio.gather(*(schedule.claim_final_report(x, s.other.id, mail)
                                     for x in (one, two, one, two)))
        assert sorted(won) == [False, False, False, True]
        digest_won = await asyncio.gather(*(schedule.claim_digest(x, ORGANIZER, mail)
                                            for x in (one, two, two)))
        assert sorted(digest_won) == [False, False, True]
        async with one.sessions.begin() as session:
            await session.execute(update(models.Event).where(models.Event.id == s.other.id)
                                  .values(report_sent_at=sent))
            await session.execute(update(models.OutboxItem).where(
                models.OutboxItem.id > items[-1].id).values(state="cancelled"))
        await relay.Relay(one).drain()
        mails = sink.wait(2)
        final = next(m for m in mails if attachment(m)[0] == f"{s.game.public_id}.csv")
        assert final.rcpt_tos == [ORGANIZER]
        assert "Report: Final (final)" in final.message["Subject"]
        assert "final report" in final.text()
        assert {x["email"] for x in parse_csv(attachment(final)[1])} >= {"yes1@example.com",
                                                                          "stop@example.com"}
    finally:
        await one.close()
        await two.close()


async def test_daily_digest_once_a_day(tmp_path: Path, db_url: str, sink: Sink) -> None:
    cfg = make_config(tmp_path, db_url, sink, reports={"daily_digest": "true",
                                                       "digest_hour": "7"})
    one, two = Services.open(cfg), Services.open(cfg)
    await db.ensure_schema(one.engine, cfg.database_url)
    try:
        clock = [NOW]
        one.clock = two.clock = lambda: clock[0]
        await season(one)
        old = await make_event(one, "old@team.example", "Long ago",
                               start=NOW - timedelta(days=30))
        await add(one, old, "x@example.com")
        other = await make_event(one, "c@nba.example", "C game")
        await add(one, other, "fan.c@example.com", partstat="ACCEPTED")

        clock[0] = datetime(2027, 4, 2, 6, 30, tzinfo=UTC)  # first check: nothing sent before
        assert sum(await asyncio.gather(schedule.tick(one), schedule.tick(two))) == 2
        clock[0] = datetime(2027, 4, 2, 6, 59, tzinfo=UTC)
        assert await schedule.tick(one) == 0
        clock[0] = datetime(2027, 4, 2, 7, 0, tzinfo=UTC)  # the day's digest hour
        async with one.sessions.begin() as session:
            sub = (await session.execute(select(models.Subscription).where(
                models.Subscription.email == "quiet@example.com"))).scalar_one()
            await answer(session, sub.id, "ACCEPTED", at=clock[0])
        assert sum(await asyncio.gather(schedule.tick(one), schedule.tick(two),
                                        schedule.tick(one))) == 2
        clock[0] = datetime(2027, 4, 2, 23, 0, tzinfo=UTC)
        assert await schedule.tick(two) == 0
        items = await _outbox_reports(one)
        assert sorted(i.rcpt_to for i in items) == sorted([ORGANIZER, "c@nba.example"] * 2)
        async with one.sessions() as session:
            digests = {d.organizer_email: d.last_sent_at for d in (await session.execute(
                select(models.Digest))).scalars()}
        assert digests == {ORGANIZER: datetime(2027, 4, 2, 7, 0, tzinfo=UTC),
                           "c@nba.example": datetime(2027, 4, 2, 7, 0, tzinfo=UTC)}
        await relay.Relay(one).drain()
        mails = [m for m in sink.wait(4) if m.rcpt_tos == [ORGANIZER]]
        second = next(m for m in mails if "Since the last digest" in m.text())
        assert "1 answer(s) received" in second.text()
        name, text = attachment(second)
        assert name == "digest-2027-04-02.csv"
        rows = parse_csv(text)
        assert {x["event_summary"] for x in rows} == {"Final", "Semi"}  # not "Long ago"
        assert next(x for x in rows if x["email"] == "quiet@example.com")["rsvp"] == "Y"
    finally:
        await one.close()
        await two.close()


def test_digest_slot() -> None:
    assert schedule.digest_slot(datetime(2027, 4, 2, 6, 59, tzinfo=UTC), 7) == datetime(
        2027, 4, 1, 7, tzinfo=UTC)
    assert schedule.digest_slot(datetime(2027, 4, 2, 7, 0, tzinfo=UTC), 7) == datetime(
        2027, 4, 2, 7, tzinfo=UTC)


async def test_schedule_task_runs_and_stops(sqlite_svc: Services) -> None:
    svc = sqlite_svc
    svc.config.reports.after_event = True
    svc.clock = lambda: NOW
    ev = await make_event(svc, start=NOW - timedelta(hours=3))
    stop = asyncio.Event()
    task = asyncio.create_task(schedule.run(svc, stop, poll=0.05))
    for _ in range(100):
        if await _outbox_reports(svc):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 5)
    assert len(await _outbox_reports(svc)) == 1
    async with svc.sessions.begin() as session:  # events cancelled or long over: no mail
        await session.execute(update(models.Event).where(models.Event.id == ev.id)
                              .values(report_sent_at=None, status="cancelled"))
    assert await schedule.tick(svc) == 0


def test_reports_config_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[reports]\nafter_event = true\ndaily_digest = true\ndigest_hour = 18\n")
    cfg = config_mod.load(path, {})
    assert cfg.reports.after_event and cfg.reports.daily_digest and cfg.reports.digest_hour == 18
    path.write_text("[reports]\ndigest_hour = 24\n")
    with pytest.raises(config_mod.ConfigError, match=r"\[reports\] digest_hour"):
        config_mod.load(path, {})
    with pytest.raises(config_mod.ConfigError, match=r"\[reports\] page_size"):
        config_mod.load(None, {"CISERVER_REPORTS__PAGE_SIZE": "0"})


# --------------------------------------------------------------------------------------------
# The CLI, as a user runs it


CISERVER = [sys.executable, "-m", "ciserver"]


def _cli(config: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("CISERVER_")}
    r = subprocess.run([*CISERVER, "-c", str(config), *args], env=env, capture_output=True,
                       timeout=120)
    assert r.returncode == code, (args, r.stdout[-2000:], r.stderr[-2000:])
    return r


async def test_cli_reports(tmp_path: Path, sink: Sink) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[server]\ndomain = "{DOMAIN}"\nstate_dir = "{tmp_path / "state"}"\n'
        'public_url = "https://invites.example.com"\n'
        f'[relay]\nsmarthost = "127.0.0.1:{sink.port}"\ntls = "none"\n')
    cfg = config_mod.load(conf, {})
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    try:
        svc.clock = lambda: NOW
        w = await world(svc)
        s = await season(svc)
        async with svc.sessions.begin() as session:
            sub = (await session.execute(select(models.Subscription).where(
                models.Subscription.email == "quiet@example.com"))).scalar_one()
            await answer(session, sub.id, "DECLINED", at=START + timedelta(hours=3),
                         outcome="late")
            await answer(session, sub.id, "TENTATIVE", at=NOW - timedelta(days=5),
                         outcome="stale")

        def run(*args: str, code: int = 0) -> subprocess.CompletedProcess[bytes]:
            return _cli(conf, *args, code=code)

        team = {x["email"] for x in parse_csv(run("report", "domain", "team.example",
                                                  "--format", "csv").stdout.decode())}
        assert {FAN["a"], FAN["b"], "yes1@example.com"} <= team  # zach@team.example too
        assert FAN["c"] not in team and FAN["d"] not in team
        only_a = parse_csv(run("report", "organizer", "A@team.example", "--format", "csv")
                           .stdout.decode())
        assert {x["email"] for x in only_a} == {FAN["a"]}
        nba = parse_csv(run("report", "domain", "nba.example", "--format", "csv")
                        .stdout.decode())
        assert [x["email"] for x in nba] == [FAN["c"]]
        assert parse_csv(run("report", "event", w.c.public_id, "--format", "csv")
                         .stdout.decode())[0]["event_id"] == w.c.public_id

        table = run("report", "event", s.game.public_id).stdout.decode()
        for word in ("invited", "no answer", "bounced", "spring-page", "cis_abcdefgh",
                     "where customers came from", "yes1@example.com"):
            assert word in table, word
        domain_table = run("report", "domain", "team.example").stdout.decode()
        assert "per organizer" in domain_table and "b@team.example" in domain_table
        assert "c@nba.example" not in domain_table

        hist = run("report", "event", s.game.public_id, "--history").stdout.decode()
        assert "LATE" in hist and "STALE" in hist and "answer history" in hist
        hist_rows = parse_csv(run("report", "event", s.game.public_id, "--history",
                                  "--format", "csv").stdout.decode())
        quiet = [h for h in hist_rows if h["email"] == "quiet@example.com"]
        assert [(h["outcome"], h["late"], h["stale"]) for h in quiet] == [
            ("late", "yes", ""), ("stale", "", "yes")]

        # The progress bar goes to stderr; stdout stays exactly the CSV.
        plain = run("report", "organizer", ORGANIZER, "--format", "csv").stdout
        shown = run("report", "organizer", ORGANIZER, "--format", "csv", "--progress")
        assert shown.stdout == plain and b"rows" in shown.stderr
        assert parse_csv(shown.stdout.decode()) == parse_csv(plain.decode())
        out = tmp_path / "out.csv"
        r = run("report", "organizer", ORGANIZER, "--output", str(out), "--progress", "--bom")
        assert r.stdout == b"" and out.read_bytes() == "\ufeff".encode() + plain
        assert b"100%" in r.stderr

        chart = run("report", "event", s.game.public_id, "--chart", "games").stdout.decode()
        assert "Y 2 · N 2 · M 1 / 7" in svg_text(svg_root(chart))
        svg_file = tmp_path / "t.svg"
        run("report", "domain", "team.example", "--chart", "timeline", "--output",
            str(svg_file))
        svg_root(svg_file.read_text())

        r = run("report", "event", s.game.public_id, "--send")
        assert f"queued for delivery to {ORGANIZER}" in r.stdout.decode()
        r = run("report", "domain", "team.example", "--send", "--to", "boss@team.example",
                "--history")
        assert "boss@team.example" in r.stdout.decode()
        assert "--to" in run("report", "domain", "team.example", "--send",
                             code=2).stderr.decode()
        bad = run("report", "event", s.game.public_id, "--send", "--to", "notanemail",
                  code=2).stderr.decode()  # a relay would complete a bare name
        assert "'--to'" in bad and "not a valid email address" in bad
        await relay.Relay(svc).drain()
        mails = sink.wait(2)
        event_mail = next(m for m in mails if m.rcpt_tos == [ORGANIZER])
        name, text = attachment(event_mail)
        assert name == f"{s.game.public_id}.csv" and len(parse_csv(text)) == 7
        boss = next(m for m in mails if m.rcpt_tos == ["boss@team.example"])
        name, text = attachment(boss)
        assert name.endswith("history.csv")
        emails = {h["email"] for h in parse_csv(text)}
        assert {FAN["a"], FAN["b"], "quiet@example.com"} <= emails
        assert FAN["c"] not in emails and FAN["d"] not in emails
    finally:
        await svc.close()


async def test_schedules_follow_a_configuration_reload(tmp_path: Path, db_url: str,
                                                      sink: Sink) -> None:
    """schedule.run reads [reports] on every round: turning after_event on while it runs
    (what SIGHUP's reload does to the shared config) mails the due report, no restart."""
    cfg = make_config(tmp_path, db_url, sink)
    svc = Services.open(cfg)
    await db.ensure_schema(svc.engine, cfg.database_url)
    stop = asyncio.Event()
    try:
        svc.clock = lambda: START + timedelta(hours=2, minutes=1)  # "Final" has ended
        await season(svc)
        task = asyncio.create_task(schedule.run(svc, stop, poll=0.05))
        await asyncio.sleep(0.2)
        assert await _outbox_reports(svc) == []  # off
        svc.config.reports.after_event = True
        for _ in range(100):
            if await _outbox_reports(svc):
                break
            await asyncio.sleep(0.05)
        assert len(await _outbox_reports(svc)) == 2  # "Final" and "Semi"
        stop.set()
        await asyncio.wait_for(task, 5)
    finally:
        stop.set()
        await svc.close()
