"""The SQL schema (SQLAlchemy 2 declarative); Alembic migrations are checked against it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (no zone support) and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            raise TypeError(f"not a datetime: {value!r}")
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# BIGINT on PostgreSQL, but INTEGER on SQLite where only "INTEGER PRIMARY KEY" is the rowid.
Id = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    scope: Mapped[str] = mapped_column(String(16))  # organizer | domain | admin
    organizer_email: Mapped[str | None] = mapped_column(String(320))
    domain: Mapped[str | None] = mapped_column(String(255))
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("organizer_email", "organizer_uid"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    public_id: Mapped[str] = mapped_column(String(32), unique=True)
    uid: Mapped[str] = mapped_column(String(300), unique=True)  # the UID customers see
    organizer_uid: Mapped[str] = mapped_column(String(1000))
    organizer_email: Mapped[str] = mapped_column(String(320), index=True)
    organizer_domain: Mapped[str] = mapped_column(String(255), index=True)
    organizer_name: Mapped[str] = mapped_column(String(300), default="")
    origin: Mapped[str] = mapped_column(String(16))  # calendar | api
    content: Mapped[str] = mapped_column(Text)
    summary: Mapped[str] = mapped_column(Text, default="")
    location: Mapped[str] = mapped_column(Text, default="")
    description: Mapped[str] = mapped_column(Text, default="")
    start_at: Mapped[datetime] = mapped_column(UTCDateTime())
    end_at: Mapped[datetime] = mapped_column(UTCDateTime())
    tzid: Mapped[str] = mapped_column(String(64), default="")
    all_day: Mapped[bool] = mapped_column(Boolean, default=False)
    recurring: Mapped[bool] = mapped_column(Boolean, default=False)
    rsvp_until: Mapped[datetime] = mapped_column(UTCDateTime())
    organizer_sequence: Mapped[int] = mapped_column(Integer, default=0)
    organizer_dtstamp: Mapped[datetime | None] = mapped_column(UTCDateTime())
    sequence: Mapped[int] = mapped_column(Integer, default=0)  # server-owned, customers see it
    status: Mapped[str] = mapped_column(String(16), default="confirmed")  # | cancelled
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # When the report after the event's end was mailed (reports schedule); None = not yet.
    report_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Page(Base):
    """A shareable page (/p/{slug}) showing one or many events with one invite form."""

    __tablename__ = "pages"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    slug: Mapped[str] = mapped_column(String(80), unique=True)
    organizer_email: Mapped[str] = mapped_column(String(320), index=True)
    title: Mapped[str] = mapped_column(String(300), default="")
    intro: Mapped[str] = mapped_column(Text, default="")
    layout: Mapped[str] = mapped_column(String(16), default="list")  # single | list | grid
    color_primary: Mapped[str] = mapped_column(String(16), default="#0b57d0")
    color_background: Mapped[str] = mapped_column(String(16), default="#ffffff")
    color_text: Mapped[str] = mapped_column(String(16), default="#1a1a1a")
    logo_url: Mapped[str] = mapped_column(String(1000), default="")
    background_url: Mapped[str] = mapped_column(String(1000), default="")
    date_from: Mapped[datetime | None] = mapped_column(UTCDateTime())
    date_to: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Chosen events (API ids, JSON list); empty = every event of the organizer in the range.
    event_ids: Mapped[str] = mapped_column(Text, default="[]")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Digest(Base):
    """The last daily digest mailed to an organizer (reports schedule)."""

    __tablename__ = "digests"
    organizer_email: Mapped[str] = mapped_column(String(320), primary_key=True)
    last_sent_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ConsoleToken(Base):
    """A used console sign-in link (kind "link", its nonce) or a signed-out console session
    (kind "session", its id), kept until the token it came from has expired anyway."""

    __tablename__ = "console_tokens"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # link | session
    ident: Mapped[str] = mapped_column(String(64), primary_key=True)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class EventVersion(Base):
    __tablename__ = "event_versions"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    changes: Mapped[str] = mapped_column(Text)  # what changed, comma separated
    origin: Mapped[str] = mapped_column(String(16))  # calendar | api
    inbox_id: Mapped[int | None] = mapped_column(Id)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Subscription(Base):
    __tablename__ = "subscriptions"
    __table_args__ = (UniqueConstraint("event_id", "email"),
                      Index("ix_subscriptions_event_status", "event_id", "status"))
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(320), index=True)
    domain: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(300), default="")
    status: Mapped[str] = mapped_column(String(16), default="active")
    source: Mapped[str] = mapped_column(String(16))  # page | api | forwarded
    # Where exactly: the page slug, "button", "email-cta", the API key prefix, the forwarder.
    origin: Mapped[str] = mapped_column(String(200), default="", server_default="")
    forwarded_by: Mapped[int | None] = mapped_column(Id)
    partstat: Mapped[str] = mapped_column(String(16), default="NEEDS-ACTION")
    responded_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    delivered_sequence: Mapped[int | None] = mapped_column(Integer)
    soft_bounces: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Answer(Base):
    """The current answer of one subscription, for the whole event ("") or one occurrence."""

    __tablename__ = "answers"
    __table_args__ = (UniqueConstraint("subscription_id", "occurrence"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE"))
    occurrence: Mapped[str] = mapped_column(String(32), default="")
    partstat: Mapped[str] = mapped_column(String(16))
    sequence: Mapped[int | None] = mapped_column(Integer)
    stamp: Mapped[datetime] = mapped_column(UTCDateTime())
    comment: Mapped[str] = mapped_column(Text, default="")
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class RsvpHistory(Base):
    """Every answer ever received, applied or not."""

    __tablename__ = "rsvp_history"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE"), index=True)
    occurrence: Mapped[str] = mapped_column(String(32), default="")
    partstat: Mapped[str] = mapped_column(String(16))
    sequence: Mapped[int | None] = mapped_column(Integer)
    stamp: Mapped[datetime] = mapped_column(UTCDateTime())
    comment: Mapped[str] = mapped_column(Text, default="")
    outcome: Mapped[str] = mapped_column(String(16))  # applied | stale | late
    inbox_id: Mapped[int | None] = mapped_column(Id)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())


class InboxMessage(Base):
    __tablename__ = "inbox"
    __table_args__ = (Index("ix_inbox_status_id", "status", "id"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime())
    source: Mapped[str] = mapped_column(String(16))  # smtp | imap | cli
    peer: Mapped[str] = mapped_column(String(100), default="")
    mail_from: Mapped[str] = mapped_column(String(400), default="")
    rcpt_to: Mapped[str] = mapped_column(Text)  # newline separated
    message_id: Mapped[str] = mapped_column(String(400), default="")
    size: Mapped[int] = mapped_column(Integer)
    raw: Mapped[bytes] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16), default="new")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    processed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class OutboxItem(Base):
    """One mail to send. Invites have one row per subscription; the message is built at send
    time from the event's latest version, so rapid edits coalesce."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_state_next", "state", "next_attempt_at"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # invite | message
    subscription_id: Mapped[int | None] = mapped_column(
        ForeignKey("subscriptions.id", ondelete="CASCADE"), unique=True)
    wanted_sequence: Mapped[int] = mapped_column(Integer, default=0)
    sent_sequence: Mapped[int | None] = mapped_column(Integer)
    mail_from: Mapped[str] = mapped_column(String(400), default="")
    rcpt_to: Mapped[str] = mapped_column(String(400))
    rcpt_domain: Mapped[str] = mapped_column(String(255), index=True)
    raw: Mapped[bytes | None] = mapped_column(LargeBinary)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    queued_at: Mapped[datetime] = mapped_column(UTCDateTime())
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime())
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_response: Mapped[str] = mapped_column(Text, default="")
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())
