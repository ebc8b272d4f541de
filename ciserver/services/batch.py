"""What one inbox batch shares: preloaded answers and rows written with one statement each.

The inbox applies many messages in one transaction (services.inbox.process_many). Answers and
answer history are then collected here as plain, not yet added, model objects and inserted
with one executemany each at the end: per-row ORM inserts were the largest remaining cost of
recording a REPLY (bench/inbound).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncSession

from ..store.models import Answer, RsvpHistory

_ANSWERS = cast(Table, Answer.__table__)
_HISTORY = cast(Table, RsvpHistory.__table__)
_ANSWER_COLUMNS = [c.name for c in _ANSWERS.columns if c.name != "id"]
_HISTORY_COLUMNS = [c.name for c in _HISTORY.columns if c.name != "id"]


@dataclass
class Batch:
    answers: dict[tuple[int, str], Answer] = field(default_factory=dict)
    answers_for: set[int] = field(default_factory=set)  # subscriptions preloaded
    new_answers: list[Answer] = field(default_factory=list)
    history: list[RsvpHistory] = field(default_factory=list)

    async def write(self, session: AsyncSession) -> None:
        if self.new_answers:
            await session.execute(insert(_ANSWERS), [
                {c: getattr(a, c) for c in _ANSWER_COLUMNS} for a in self.new_answers])
        if self.history:
            await session.execute(insert(_HISTORY), [
                {c: getattr(h, c) for c in _HISTORY_COLUMNS} for h in self.history])
        self.new_answers.clear()
        self.history.clear()


def of(session: AsyncSession) -> Batch | None:
    batch = session.info.get("batch")
    return batch if isinstance(batch, Batch) else None
