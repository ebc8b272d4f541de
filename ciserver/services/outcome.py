"""The result of processing one inbox message for one of its recipients."""

from __future__ import annotations

from dataclasses import dataclass

# Worst first: the message's status is the worst of its recipients' outcomes.
SEVERITY = ("failed", "quarantined", "rejected", "done", "ignored")


@dataclass(frozen=True)
class Outcome:
    status: str  # done | ignored | rejected | quarantined | failed
    text: str

    @staticmethod
    def worst(outcomes: list[Outcome]) -> str:
        if not outcomes:
            return "ignored"
        return min((o.status for o in outcomes), key=SEVERITY.index)


def done(text: str) -> Outcome:
    return Outcome("done", text)


def ignored(text: str) -> Outcome:
    return Outcome("ignored", text)


def rejected(text: str) -> Outcome:
    return Outcome("rejected", text)


def quarantined(text: str) -> Outcome:
    return Outcome("quarantined", text)
