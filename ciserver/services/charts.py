"""Charts drawn on the server as SVG: answers over time, and Y / N / M per game.

Hand-written SVG, no dependency. Every piece of text goes through :func:`esc`, which escapes
markup and drops the characters XML cannot carry, so organizer and customer text can never
become markup. Each chart is a complete document (``xmlns`` set, a ``viewBox`` so it scales)
for an ``<img src>``, an ``<object>`` or inline use; it has no script, no external reference
and no event handler.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from xml.sax.saxutils import escape

from ..store.models import Event
from . import reports
from .context import Services
from .reports import Counts, TimelinePoint

COLORS = {"invited": "#80868b", "Y": "#188038", "N": "#d93025", "M": "#e37400",
          "none": "#dadce0"}
LABELS = {"invited": "invited", "Y": "yes", "N": "no", "M": "maybe", "none": "no answer"}
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif"'

# Characters outside XML 1.0's Char production (control characters, lone surrogates, …).
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def esc(text: object, limit: int | None = None) -> str:
    """Text for SVG content or a double-quoted attribute."""
    s = _NOT_XML.sub("", str(text))
    if limit is not None and len(s) > limit:
        s = s[:limit - 1].rstrip() + "…"
    return escape(s, {'"': "&quot;", "'": "&#39;"})


def _n(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _open(width: float, height: float, title: str, desc: str) -> list[str]:
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(width)}" '
            f'height="{_n(height)}" viewBox="0 0 {_n(width)} {_n(height)}" role="img" '
            f'aria-label="{esc(title)}" {FONT} font-size="12">',
            f"<title>{esc(title)}</title>", f"<desc>{esc(desc)}</desc>",
            f'<rect width="{_n(width)}" height="{_n(height)}" fill="#ffffff"/>',
            f'<text x="12" y="22" font-size="15" font-weight="600" fill="#202124">'
            f"{esc(title, 90)}</text>"]


def empty_svg(title: str, message: str = "No answers yet.", width: int = 720,
              height: int = 120) -> str:
    parts = _open(width, height, title, message)
    parts.append(f'<text x="{_n(width / 2)}" y="{_n(height / 2 + 14)}" text-anchor="middle" '
                 f'fill="#5f6368">{esc(message)}</text>')
    return "\n".join([*parts, "</svg>"]) + "\n"


def _nice_step(top: float, ticks: int = 5) -> float:
    raw = max(float(top), 1.0) / ticks
    mag = 10.0 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 5.0, 10.0):
        if raw <= m * mag:
            return max(m * mag, 1.0)
    return 10.0 * mag


def _legend(x: float, y: float, keys: Sequence[str], values: dict[str, int] | None = None
            ) -> list[str]:
    out = []
    for i, key in enumerate(keys):
        yy = y + i * 18
        label = LABELS[key] + (f" {values[key]}" if values is not None else "")
        out.append(f'<rect x="{_n(x)}" y="{_n(yy - 9)}" width="10" height="10" rx="2" '
                   f'fill="{COLORS[key]}"/>'
                   f'<text x="{_n(x + 15)}" y="{_n(yy)}" fill="#3c4043">{esc(label)}</text>')
    return out


def timeline_svg(points: Sequence[TimelinePoint], *, title: str, width: int = 720,
                 height: int = 320) -> str:
    """Cumulative invited, yes, no and maybe over time, as step lines."""
    if len(points) < 2:
        return empty_svg(title, "No answers yet.", width)
    left, right, top, bottom = 52.0, 130.0, 40.0, 34.0
    pw, ph = width - left - right, height - top - bottom
    t0, t1 = points[0].at, points[-1].at
    span = max((t1 - t0).total_seconds(), 1.0)
    ymax = max(max(p.invited, p.yes, p.no, p.maybe) for p in points)
    step = _nice_step(ymax)
    ytop = max(step * math.ceil(max(ymax, 1) / step), step)

    def x(t: datetime) -> float:
        return left + (t - t0).total_seconds() / span * pw

    def y(v: float) -> float:
        return top + ph - v / ytop * ph

    last = points[-1]
    parts = _open(width, height, title,
                  f"Answers over time until {t1:%Y-%m-%d %H:%M} UTC: invited {last.invited}, "
                  f"yes {last.yes}, no {last.no}, maybe {last.maybe}.")
    v = 0.0
    while v <= ytop + 1e-9:  # grid and y labels
        parts.append(f'<line x1="{_n(left)}" x2="{_n(left + pw)}" y1="{_n(y(v))}" '
                     f'y2="{_n(y(v))}" stroke="#e8eaed"/>'
                     f'<text x="{_n(left - 6)}" y="{_n(y(v) + 4)}" text-anchor="end" '
                     f'fill="#5f6368">{int(v)}</text>')
        v += step
    fmt = "%d %b %H:%M" if span <= 5 * 86400 else "%d %b %Y" if span > 300 * 86400 else "%d %b"
    shown: set[str] = set()
    for i in range(5):  # x labels
        t = t0 + timedelta(seconds=span * i / 4)
        label = f"{t:{fmt}}"
        if label in shown:
            continue
        shown.add(label)
        anchor = "start" if i == 0 else "end" if i == 4 else "middle"
        parts.append(f'<text x="{_n(x(t))}" y="{_n(top + ph + 20)}" text-anchor="{anchor}" '
                     f'fill="#5f6368">{esc(label)}</text>')
    parts.append(f'<line x1="{_n(left)}" x2="{_n(left + pw)}" y1="{_n(top + ph)}" '
                 f'y2="{_n(top + ph)}" stroke="#9aa0a6"/>')
    for key, attr in (("invited", "invited"), ("Y", "yes"), ("N", "no"), ("M", "maybe")):
        d = [f"M{_n(x(points[0].at))} {_n(y(getattr(points[0], attr)))}"]
        for p in points[1:]:
            d.append(f"H{_n(x(p.at))} V{_n(y(getattr(p, attr)))}")
        dash = ' stroke-dasharray="4 3"' if key == "invited" else ""
        parts.append(f'<path d="{" ".join(d)}" fill="none" stroke="{COLORS[key]}" '
                     f'stroke-width="2"{dash}><title>{esc(LABELS[key])}</title></path>')
    parts += _legend(left + pw + 16, top + 10, ["invited", "Y", "N", "M"],
                     {"invited": last.invited, "Y": last.yes, "N": last.no, "M": last.maybe})
    return "\n".join([*parts, "</svg>"]) + "\n"


def games_svg(games: Sequence[tuple[str, Counts]], *, title: str, width: int = 720,
              more: int = 0) -> str:
    """One stacked bar per game (or occurrence): yes, maybe, no, no answer."""
    if not games:
        return empty_svg(title, "No events.", width)
    # The label column widens with the chart; labels are cut to fit it (about 7 px a
    # character at 12 px), the whole label is in the bar's <title>.
    label_w, num_w, top, row = max(230.0, min(width * 0.33, 400.0)), 150.0, 58.0, 24.0
    fit = int((label_w - 12) / 7)
    bw = width - label_w - num_w - 12
    height = top + row * len(games) + (30 if more else 12)
    scale = max(max(c.invited for _, c in games), 1)
    total = Counts()
    for _, c in games:
        total += c
    parts = _open(width, height, title,
                  f"Yes, no and maybe per game for {len(games)} game(s): yes {total.yes}, "
                  f"no {total.no}, maybe {total.maybe}, no answer {total.no_answer}.")
    for i, key in enumerate(("Y", "M", "N", "none")):
        lx = 12 + i * 100
        parts.append(f'<rect x="{lx}" y="33" width="10" height="10" rx="2" '
                     f'fill="{COLORS[key]}"/><text x="{lx + 15}" y="42" fill="#3c4043">'
                     f"{esc(LABELS[key])}</text>")
    for i, (label, c) in enumerate(games):
        yy = top + i * row
        parts.append(f'<text x="{_n(label_w - 8)}" y="{_n(yy + 15)}" text-anchor="end" '
                     f'fill="#202124">{esc(label, fit)}<title>{esc(label)}</title></text>')
        x = label_w
        for key, value in (("Y", c.yes), ("M", c.maybe), ("N", c.no), ("none", c.no_answer)):
            if value <= 0:
                continue
            w = value / scale * bw
            parts.append(f'<rect x="{_n(x)}" y="{_n(yy + 3)}" width="{_n(max(w, 0.5))}" '
                         f'height="{_n(row - 7)}" fill="{COLORS[key]}">'
                         f"<title>{esc(f'{LABELS[key]}: {value}')}</title></rect>")
            x += w
        parts.append(f'<text x="{_n(label_w + bw + 8)}" y="{_n(yy + 15)}" fill="#3c4043">'
                     f"{esc(f'Y {c.yes} · N {c.no} · M {c.maybe} / {c.invited}')}</text>")
    if more:
        parts.append(f'<text x="12" y="{_n(height - 10)}" fill="#5f6368">'
                     f"{esc(f'… and {more} more')}</text>")
    return "\n".join([*parts, "</svg>"]) + "\n"


# --------------------------------------------------------------------------------------------
# Charts of a scope, read from the store (what the API routes and the console serve)


def _game_label(start: datetime, summary: str) -> str:
    return f"{start:%Y-%m-%d} {summary}"


async def event_timeline(svc: Services, event: Event) -> str:
    async with svc.sessions() as session:
        points = await reports.timeline(session, svc.dialect, event_id=event.id,
                                        until=min(svc.now(), event.rsvp_until))
    return timeline_svg(points, title=f"Answers over time: {event.summary}")


async def event_games(svc: Services, event: Event, limit: int = 60) -> str:
    """Y / N / M per occurrence of a recurring event (one bar for a single event)."""
    async with svc.sessions() as session:
        if event.recurring:
            per = await reports.occurrence_counts(session, event, limit)
            games = [(occ, c) for occ, c in per][:limit]
            more = max(len(per) - limit, 0)
        else:
            (one,) = await reports.event_summaries(session, event_id=event.id)
            games, more = [(_game_label(one.start, one.summary), one.counts)], 0
    return games_svg(games, title=f"Yes / no / maybe: {event.summary}", more=more)


async def scope_timeline(svc: Services, *, title: str, organizer: str | None = None,
                         domain: str | None = None) -> str:
    async with svc.sessions() as session:
        points = await reports.timeline(session, svc.dialect, organizer=organizer,
                                        domain=domain, until=svc.now())
    return timeline_svg(points, title=title)


async def scope_games(svc: Services, *, title: str, organizer: str | None = None,
                      domain: str | None = None, since: datetime | None = None,
                      limit: int = 40, offset: int = 0) -> str:
    """Y / N / M per game (event) of an organizer or a domain, in start order."""
    async with svc.sessions() as session:
        events = await reports.event_summaries(session, organizer=organizer, domain=domain,
                                               since=since, limit=limit + 1, offset=offset)
        more = 0
        if len(events) > limit:
            total = await reports.event_count(session, organizer=organizer, domain=domain,
                                              since=since)
            more = max(total - offset - limit, 1)
            events = events[:limit]
    games = [((f"{e.organizer}: " if domain else "") + _game_label(e.start, e.summary), e.counts)
             for e in events]
    return games_svg(games, title=title, more=more)
