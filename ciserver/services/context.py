"""What every service needs: configuration, the store, our addresses, the clock.

Edges (smtp, web, relay, cli) get one :class:`Services` and call service functions with it.
The clock and the DNS resolver are attributes so tests can replace them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from ..addresses import AddressBook
from ..config import Config
from ..signing import DkimSigner, from_config
from ..store import db

log = logging.getLogger("ciserver")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Services:
    config: Config
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    book: AddressBook
    clock: Callable[[], datetime] = utcnow
    resolver: Any = None  # dns.asyncresolver.Resolver-like; None = the system's
    outbox_ready: asyncio.Event = field(default_factory=asyncio.Event)
    inbox_ready: asyncio.Event = field(default_factory=asyncio.Event)
    group_commit: Any = None  # services.inbox.GroupCommit, created on first use
    outbox_signal: Callable[[], None] | None = None
    signer: DkimSigner | None = None  # DKIM for outgoing mail ([dkim]); None = unsigned

    @classmethod
    def open(cls, config: Config) -> Services:
        engine = db.make_engine(config.database_url, echo=config.database.echo)
        book = AddressBook(config.server.domain, config.secret(),
                           config.server.create_local_part)
        signer = config.dkim_signer if config.dkim_signer is not None else from_config(config)
        return cls(config=config, engine=engine, sessions=db.sessionmaker(engine), book=book,
                   signer=signer)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def now(self) -> datetime:
        return self.clock()

    def page_url(self, public_id: str) -> str:
        return f"{self.config.base_url}/e/{public_id}"

    def unsubscribe_url(self, token: str) -> str:
        return f"{self.config.base_url}/u/{token}"

    def wake_outbox(self) -> None:
        self.outbox_ready.set()
        if self.outbox_signal is not None:  # an inbox process tells the daemon's relay
            self.outbox_signal()

    def wake_inbox(self) -> None:
        self.inbox_ready.set()

    async def close(self) -> None:
        if self.group_commit is not None:
            self.group_commit.close()
        await self.engine.dispose()
