"""The pages in a real browser: headless Chromium (Debian's, never a downloaded one) driven by
Playwright, against `ciserver serve` running as a subprocess. Screenshots go to artifacts/
(ignored by git, kept by CI)."""

from __future__ import annotations

import asyncio
import shutil
import zoneinfo
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from ciserver import config as config_mod
from ciserver.services import pages
from ciserver.services.context import Services

from .conftest import DOMAIN, ORGANIZER, Sink
from .organizer_mail import organizer_mail
from .test_e2e import Daemon, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "browser"
START = datetime(2030, 1, 10, 0, 30, tzinfo=UTC)

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="Debian's chromium is not installed")


@pytest.fixture
def browser() -> Iterator[object]:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            yield b
        finally:
            b.close()


def season(daemon: Daemon, games: int = 3) -> list[dict[str, str]]:
    """The organizer's calendar invites create@ to a few games; returns them (API view)."""
    for n in range(games):
        start = START + timedelta(days=3 * n)
        daemon.smtp(f"create@{DOMAIN}", organizer_mail(
            "google", uid=f"game-{n}@team.example", sequence=0, start=start,
            end=start + timedelta(hours=3), summary=f"Knicks vs Team {n}",
            location="Madison Square Garden"), ORGANIZER)
    key = daemon.cli("apikey", "create", "--organizer", ORGANIZER).stdout.strip().splitlines()[-1]
    auth = {"Authorization": f"Bearer {key}"}
    for _ in range(100):
        listed = httpx.get(f"{daemon.url}/api/v1/events", headers=auth).json()
        if len(listed) == games:
            return sorted(listed, key=lambda e: e["start"])
        import time

        time.sleep(0.1)
    raise AssertionError("the games were not created")


def make_page(daemon: Daemon, **settings: object) -> str:
    async def go() -> str:
        cfg = config_mod.load(daemon.config, {})
        svc = Services.open(cfg)
        try:
            async with svc.sessions.begin() as session:
                page = await pages.create(svc, session, ORGANIZER,
                                          pages.PageSettings(**settings))  # type: ignore[arg-type]
                return page.slug
        finally:
            await svc.close()

    # Playwright's sync API keeps an event loop in this thread: run ours in another one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, go()).result()


def test_fan_picks_two_games_and_gets_two_invites(tmp_path: Path, sink: Sink,
                                                  browser: object) -> None:
    daemon = Daemon(tmp_path, sink)
    daemon.start()
    try:
        games = season(daemon)
        sink.clear()
        slug = make_page(daemon, title="Knicks home games", layout="grid")
        page = browser.new_page()  # type: ignore[attr-defined]
        page.goto(f"{daemon.url}/p/{slug}")
        assert "Knicks home games" in page.title() or page.locator("h1").first.inner_text()
        page.screenshot(path=str(ARTIFACTS / "season-page.png"), full_page=True)
        for game in games[:2]:
            page.check(f"input[name=events][value='{game['id']}']")
        page.fill("#email", "fan@example.net")
        page.click("#send")
        page.wait_for_selector("text=fan@example.net", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "season-confirmation.png"), full_page=True)
        # (the organizer's confirmations of the games may still be arriving: count the fan's)
        wait_until(lambda: len(sink.to("fan@example.net")) >= 2, timeout=20)
        got = sink.to("fan@example.net")
        assert len(got) == 2
        summaries = sorted(m.calendar().split("SUMMARY:")[1].split("\r\n")[0] for m in got)
        assert summaries == sorted(g["summary"] for g in games[:2])
    finally:
        daemon.stop()


def test_viewer_time_zone_and_the_page_without_javascript(tmp_path: Path, sink: Sink,
                                                          browser: object) -> None:
    daemon = Daemon(tmp_path, sink)
    daemon.start()
    try:
        games = season(daemon, games=2)
        sink.clear()
        slug = make_page(daemon, title="Knicks home games", layout="list")
        # A fan in Berlin sees the venue's time and, under it, their own.
        ctx = browser.new_context(  # type: ignore[attr-defined]
            timezone_id="Europe/Berlin", locale="en-US")
        page = ctx.new_page()
        page.goto(f"{daemon.url}/p/{slug}")
        first = page.locator(".viewer-time").first
        first.wait_for(state="visible", timeout=5_000)
        start = datetime.fromisoformat(games[0]["start"].replace("Z", "+00:00"))
        berlin = start.astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))
        text = first.inner_text()
        assert text.startswith("Your time:") and berlin.strftime("%I:%M") in text, text
        page.screenshot(path=str(ARTIFACTS / "season-page-berlin.png"), full_page=True)
        ctx.close()
        # A fan in the venue's zone is not told twice.
        ctx = browser.new_context(  # type: ignore[attr-defined]
            timezone_id="America/New_York", locale="en-US")
        page = ctx.new_page()
        page.goto(f"{daemon.url}/p/{slug}")
        page.wait_for_load_state("load")
        assert not page.locator(".viewer-time").first.is_visible()
        ctx.close()
        # Without JavaScript the plain form POST works and answers with a page.
        ctx = browser.new_context(java_script_enabled=False)  # type: ignore[attr-defined]
        page = ctx.new_page()
        page.goto(f"{daemon.url}/p/{slug}")
        page.check(f"input[name=events][value='{games[1]['id']}']")
        page.fill("#email", "nojs@example.net")
        page.click("#send")
        page.wait_for_selector("text=nojs@example.net", timeout=10_000)
        page.screenshot(path=str(ARTIFACTS / "season-confirmation-nojs.png"), full_page=True)
        ctx.close()
        # (the organizer's confirmations of the games may still be arriving: count the fan's)
        wait_until(lambda: bool(sink.to("nojs@example.net")), timeout=20)
        got = sink.to("nojs@example.net")
        assert len(got) == 1 and games[1]["summary"] in got[0].calendar()
    finally:
        daemon.stop()
