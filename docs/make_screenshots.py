"""Make the README's screenshots: ``.venv/bin/python docs/make_screenshots.py``.

Starts the web app on loopback (a throw-away SQLite database in a temporary directory, no
mail sent anywhere) with demo data: a basketball team's season of home games, fans who signed
up over the last three weeks on a season page, through a button on the club's site, from a
mailing, the API or a forwarded invite, and their answers. Then drives Debian's headless
Chromium (/usr/bin/chromium, through Playwright) and writes, 1280 px wide, into docs/:

- page.png            the season page fans pick their games on
- console.png         the organizer console: events, live counts, Y / N / M per game
- console-editor.png  the page configurator with its live preview
- console-event.png   one game's report: figures, answers over time, where fans came from

The organizer's console session is signed with the server's secret here, as the magic link
would have done.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import sys
import tempfile
import threading
import time
import zoneinfo
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ciserver import config as config_mod
from ciserver.services import events, pages, subscriptions
from ciserver.services.auth import ConsoleAuth
from ciserver.services.context import Services
from ciserver.store import db, models
from ciserver.web.app import create_app

DOCS = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
WIDTH = 1280
ORGANIZER = "tickets@hoops.example"
TEAM = "Harbor City Hoops"
ARENA = "Harbor Arena, 1 Pier Street"
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
OPPONENTS = ["Bay City Comets", "Metro Hawks", "Lakeside Lynx", "Capital Kings",
             "Desert Suns", "Northern Wolves", "Mountain Bears", "Coastal Pelicans"]
GAME_DAYS = [-6, -2, 3, 6, 10, 13, 17, 21]  # from today, 19:30 New York
PAGE_SLUG = "home-games"
ORIGINS = [("page", PAGE_SLUG, 46), ("page", "button https://hoops.example", 20),
           ("page", "email-cta", 16), ("api", "api key cis_7f3a", 8),
           ("forwarded", "forwarded by jordan.lee@example.net", 6), ("page", "event-page", 4)]
FIRST = ["Alex", "Sam", "Jordan", "Taylor", "Chris", "Robin", "Casey", "Jamie", "Morgan",
         "Riley", "Drew", "Avery", "Quinn", "Reese", "Parker", "Sky", "Dana", "Lee"]
LAST = ["Lee", "Garcia", "Smith", "Nguyen", "Brown", "Rossi", "Kim", "Okafor", "Müller",
        "Santos", "Cohen", "Patel", "Dubois", "Jensen", "Silva", "Ito"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def load_config(state: Path, port: int) -> config_mod.Config:
    return config_mod.load(None, {
        "CISERVER_SERVER__DOMAIN": "invites.hoops.example",
        "CISERVER_SERVER__STATE_DIR": str(state),
        # the address a real installation would show (nothing is fetched from it)
        "CISERVER_SERVER__PUBLIC_URL": "https://invites.hoops.example",
        "CISERVER_SERVER__SECRET_KEY": "screenshots-only",
        "CISERVER_DATABASE__URL": f"sqlite+aiosqlite:///{state / 'demo.db'}",
        "CISERVER_SMTP__LISTEN": f"127.0.0.1:{free_port()}",
        "CISERVER_WEB__LISTEN": f"127.0.0.1:{port}",
        "CISERVER_ORGANIZERS__ALLOW": f'["{ORGANIZER}"]',
    })


# --------------------------------------------------------------------------------------------
# Demo data


@dataclass
class Demo:
    games: list[str]  # API ids, in start order
    featured: str  # the game whose report is shown


def _answer(session: AsyncSession, sub: models.Subscription, partstat: str, at: datetime,
            current: models.Answer | None = None) -> models.Answer:
    """An answer as services.attendee records one from a fan's calendar: its history, and
    the answer that counts."""
    session.add(models.RsvpHistory(subscription_id=sub.id, occurrence="", partstat=partstat,
                                   sequence=0, stamp=at, comment="", outcome="applied",
                                   received_at=at))
    if current is None:
        current = models.Answer(subscription_id=sub.id, occurrence="", partstat=partstat,
                                sequence=0, stamp=at, comment="", received_at=at)
        session.add(current)
    else:
        current.partstat, current.stamp, current.received_at = partstat, at, at
    sub.partstat, sub.responded_at = partstat, at
    return current


async def seed(cfg: config_mod.Config, now: datetime) -> Demo:
    rnd = random.Random(2030)
    svc = Services.open(cfg)
    real_clock = svc.clock
    try:
        await db.ensure_schema(svc.engine, cfg.database_url)
        today = now.astimezone(NEW_YORK).replace(hour=19, minute=30, second=0, microsecond=0)
        ids: list[str] = []
        svc.clock = lambda: now - timedelta(days=24)
        async with svc.sessions.begin() as session:
            for n, (days, rival) in enumerate(zip(GAME_DAYS, OPPONENTS, strict=True)):
                start = today + timedelta(days=days)
                event = await events.create_via_api(
                    svc, session, organizer=ORGANIZER, organizer_name=TEAM,
                    summary=f"{TEAM} vs {rival}", start=start,
                    end=start + timedelta(hours=2, minutes=30), location=ARENA,
                    description=f"Regular season, home game {n + 1}. Doors open at 18:30.")
                ids.append(event.public_id)
        featured = ids[GAME_DAYS.index(3)]
        people = [(f"{f.lower()}.{a.lower()}{i or ''}@example.net".replace("ü", "ue"),
                   f"{f} {a}") for i in range(3) for f in FIRST for a in LAST]
        rnd.shuffle(people)
        weights = [w for _s, _o, w in ORIGINS]
        for public_id in ids:
            crowd = 150 if public_id == featured else rnd.randint(70, 140)
            async with svc.sessions.begin() as session:
                event = await events.find(session, public_id)
                opened = max(now - timedelta(days=22), event.start_at - timedelta(days=28))
                closes = min(event.start_at, now)
                span = (closes - opened).total_seconds()
                for email, name in rnd.sample(people, crowd):
                    # most sign up early, some the day before
                    at = opened + timedelta(seconds=span * rnd.random() ** 1.6)
                    source, origin, _w = rnd.choices(ORIGINS, weights)[0]
                    svc.clock = lambda at=at: at  # the sign-up time
                    sub = (await subscriptions.invite(svc, session, event, email, name, source,
                                                      origin=origin, send=False)).subscription
                    await session.flush()
                    answered = at + timedelta(minutes=rnd.randint(5, 60 * 30))
                    pick = rnd.random()
                    if answered < closes and pick < 0.82:
                        partstat = ("ACCEPTED" if pick < 0.58 else "TENTATIVE" if pick < 0.70
                                    else "DECLINED")
                        first = _answer(session, sub, partstat, answered)
                        if partstat == "TENTATIVE" and rnd.random() < 0.4:
                            later = answered + timedelta(hours=rnd.randint(6, 72))
                            if later < closes:  # made up their mind
                                _answer(session, sub, "ACCEPTED", later, first)
                    elif rnd.random() < 0.05:
                        await subscriptions.stop(svc, session, sub, "bounced")
                    elif rnd.random() < 0.03:
                        await subscriptions.stop(svc, session, sub, "unsubscribed")
        svc.clock = lambda: now - timedelta(days=20)
        async with svc.sessions.begin() as session:
            await pages.create(svc, session, ORGANIZER, pages.PageSettings(
                title=f"{TEAM} — home games", layout="grid",
                intro="Pick your games and get them in your calendar: real invites that "
                      "stay up to date if a tip-off time changes.",
                color_primary="#c8102e", color_background="#ffffff", color_text="#1d1d1f",
                event_ids=tuple(ids[2:])), slug=PAGE_SLUG)
        return Demo(ids, featured)
    finally:
        svc.clock = real_clock
        await svc.close()


async def check_answers(cfg: config_mod.Config) -> int:
    svc = Services.open(cfg)
    try:
        async with svc.sessions() as session:
            return len((await session.execute(select(models.Answer.id))).all())
    finally:
        await svc.close()


# --------------------------------------------------------------------------------------------
# The server, in a thread with its own event loop


class Server(threading.Thread):
    def __init__(self, cfg: config_mod.Config, port: int) -> None:
        super().__init__(daemon=True)
        self.cfg, self.port = cfg, port
        self.server: uvicorn.Server | None = None
        self.secret = b""

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        svc = Services.open(self.cfg)
        self.secret = svc.book.secret
        try:
            self.server = uvicorn.Server(uvicorn.Config(
                create_app(svc), host="127.0.0.1", port=self.port, log_level="warning",
                lifespan="off"))
            await self.server.serve()
        finally:
            await svc.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit("the server did not start")

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
        self.join(timeout=30)


# --------------------------------------------------------------------------------------------
# Screenshots


def shoot(server: Server, demo: Demo, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    made: list[Path] = []
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            context = browser.new_context(viewport={"width": WIDTH, "height": 900},
                                          device_scale_factor=1, locale="en-US",
                                          timezone_id="America/New_York")
            value, _claims = ConsoleAuth(server.secret, 3600).new_session(
                ORGANIZER, datetime.now(UTC))
            context.add_cookies([{"name": "ci_session", "value": value, "domain": "127.0.0.1",
                                  "path": "/console", "httpOnly": True, "sameSite": "Lax"}])
            page = context.new_page()
            page.on("console", lambda m: problems.append(m.text)
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))

            def save(name: str, full_page: bool) -> None:
                path = out / name
                page.screenshot(path=str(path), full_page=full_page)
                made.append(path)

            page.goto(f"{server.url}/p/{PAGE_SLUG}")
            page.wait_for_selector("input[name=events]")
            for box in page.locator("input[name=events]").all()[:2]:
                box.check()
            page.fill("#email", "alex.garcia@example.net")
            save("page.png", full_page=True)

            page.goto(f"{server.url}/console")
            page.wait_for_selector("#events")
            assert page.locator("figure.chart svg").count() == 1
            save("console.png", full_page=True)

            page.goto(f"{server.url}/console/pages/new")
            page.fill("#title", f"{TEAM} — playoffs")
            page.fill("#intro", "Get the playoff games in your calendar the minute tip-off "
                                "times are set.")
            page.check("input[name=layout][value=list]")
            page.fill("#color_primary", "#1d428a")
            for game in demo.games[4:7]:
                page.check(f"input[name=events][value='{game}']")
            deadline = time.monotonic() + 15
            while True:  # the preview follows the form (no eval: the console's CSP)
                frame = page.frame(name="preview")
                try:
                    html = frame.content() if frame is not None else ""
                except Exception:  # navigating
                    html = ""
                if "playoffs" in html and "1d428a" in html:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("the preview did not follow the form")
                time.sleep(0.2)
            page.wait_for_load_state("networkidle")
            page.click("h1")  # no focus ring on the last box ticked
            save("console-editor.png", full_page=True)

            page.goto(f"{server.url}/console/events/{demo.featured}")
            page.wait_for_selector("figure.chart svg")
            save("console-event.png", full_page=True)
        finally:
            browser.close()
    bad = [m for m in problems if "Content Security Policy" in m or "Refused" in m]
    if bad:
        raise SystemExit("the browser reported problems:\n" + "\n".join(bad))
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, default=DOCS, help="where to write the PNGs")
    args = parser.parse_args()
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} is missing: apt-get install chromium", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ciserver-shots-") as tmp:
        port = free_port()
        cfg = load_config(Path(tmp), port)
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        demo = asyncio.run(seed(cfg, now))
        print(f"seeded {len(demo.games)} games, {asyncio.run(check_answers(cfg))} answers")
        server = Server(cfg, port)
        server.start()
        try:
            server.wait()
            made = shoot(server, demo, args.out)
        finally:
            server.stop()
    for path in made:
        print(f"{path} ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
