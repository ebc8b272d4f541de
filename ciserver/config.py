"""Typed configuration: one TOML file plus ``CISERVER_SECTION__KEY`` environment overrides.

Every option is declared once, with its type, default and help text; the example file
(`config/ciserver.example.toml`) documents the same keys and a test keeps the two in step.
Errors name the file, the section, the key and the expected form.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

ENV_PREFIX = "CISERVER_"


class ConfigError(Exception):
    """A configuration problem, worded for the person who edits the file."""


def _opt(default: Any, help: str) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


TlsMode = Literal["none", "starttls", "implicit"]
SenderAuth = Literal["none", "dkim", "authentication-results"]
LogLevel = Literal["debug", "info", "warning", "error"]
EventLoop = Literal["auto", "asyncio", "uvloop"]


@dataclass
class ServerConfig:
    domain: str = _opt("localhost", "The mail domain ciserver answers for (MX points here).")
    public_url: str = _opt(
        "", "Base URL of the web pages and API; empty = http://<web.listen>."
    )
    secret_key: str = _opt(
        "", "HMAC key for tokens; empty = generated once and kept in state_dir/secret_key."
    )
    state_dir: str = _opt(
        "",
        "Directory for the SQLite database and the generated secret; empty = "
        "$STATE_DIRECTORY (systemd), else $XDG_STATE_HOME/ciserver, else ~/.local/state/ciserver.",
    )
    create_local_part: str = _opt("create", "Local part of the address organizers invite.")
    log_level: LogLevel = _opt("info", "debug | info | warning | error")
    inbox_processes: int = _opt(
        1, "Processes that parse and apply received mail beside the daemon's loop "
           "(0 = in the daemon's own loop).")
    event_loop: EventLoop = _opt(
        "auto", "auto | asyncio | uvloop: the daemon's event loop (auto = uvloop if installed).")


@dataclass
class DatabaseConfig:
    url: str = _opt(
        "",
        "SQLAlchemy URL: sqlite+aiosqlite:////path/ciserver.db or "
        "postgresql+asyncpg://user@host/db; empty = SQLite in state_dir.",
    )
    echo: bool = _opt(False, "Log every SQL statement (debugging only).")


@dataclass
class SmtpConfig:
    listen: str = _opt("127.0.0.1:2525", "host:port of the SMTP listener (port 25 in production).")
    hostname: str = _opt("", "Name in the SMTP greeting; empty = server.domain.")
    max_message_size: int = _opt(10485760, "Bytes; larger mail is refused with 552.")
    max_recipients: int = _opt(50, "Recipients per message; more are refused with 452.")
    data_timeout: int = _opt(300, "Seconds a client may stay idle before it is disconnected.")
    session_timeout: int = _opt(
        900, "Seconds one SMTP connection may last in all (a slow client cannot hold it).")
    max_connections: int = _opt(200, "Concurrent SMTP connections; more get 421 and are closed.")
    max_connections_per_ip: int = _opt(20, "Concurrent SMTP connections from one IP address.")
    tls_cert: str = _opt("", "PEM certificate (chain) for STARTTLS; empty = no STARTTLS.")
    tls_key: str = _opt("", "PEM private key for tls_cert.")


@dataclass
class WebConfig:
    listen: str = _opt("127.0.0.1:8080", "host:port of the web pages and REST API.")
    rate_limit: int = _opt(
        30, "Public invite requests allowed per client IP per minute (0 = unlimited)."
    )
    rate_limit_per_address: int = _opt(
        5, "Invite requests for one recipient mailbox (the address without its +tag) per "
        "hour (0 = unlimited)."
    )
    rate_limit_invites_per_address: int = _opt(
        250, "Invites public requests may queue for one mailbox per day, all events together "
             "(0 = unlimited). Like rate_limit_per_address it counts the address without its "
             "+tag, so fan+1@, fan+2@ … share one allowance."
    )
    rate_limit_per_event: int = _opt(
        1200, "Public invite requests for one event per minute, from everyone together "
             "(0 = unlimited)."
    )
    max_body_size: int = _opt(
        10485760, "Bytes; larger request bodies (bulk attendee uploads included) get 413."
    )
    metrics_allow: list[str] = _opt(
        ["127.0.0.0/8", "::1/128"], "Networks (CIDR) whose clients may read /metrics (after "
        "trusted_proxies are resolved); others get 403. [\"0.0.0.0/0\", \"::/0\"] opens it. "
        "Behind a reverse proxy on the same host, list it in trusted_proxies, or every "
        "request comes from 127.0.0.1.")
    trusted_proxies: list[str] = _opt(
        [], "IPs of reverse proxies whose X-Forwarded-For is believed."
    )
    console_session_lifetime: int = _opt(
        43200, "Seconds an organizer stays signed in to the console after using a sign-in "
               "link (12 hours)."
    )


@dataclass
class RelayConfig:
    smarthost: str = _opt(
        "", "host:port of the outgoing relay; empty = deliver directly to each domain's MX."
    )
    tls: TlsMode = _opt("starttls", "none | starttls | implicit (smarthost connection).")
    tls_verify: bool = _opt(True, "Verify the smarthost's TLS certificate.")
    ca_file: str = _opt("", "CA bundle for the smarthost's certificate; empty = system CAs.")
    username: str = _opt("", "AUTH user at the smarthost (optional).")
    password: str = _opt("", "AUTH password at the smarthost (optional).")
    workers: int = _opt(4, "Concurrent deliveries of this instance.")
    timeout: int = _opt(60, "Seconds for one SMTP conversation step.")
    retry_base: int = _opt(60, "Seconds before the first retry of a temporary (4xx) failure.")
    retry_max: int = _opt(14400, "Upper bound of the retry interval in seconds.")
    max_queue_lifetime: int = _opt(
        432000, "Seconds a message may stay queued before it fails (5 days)."
    )
    mx_port: int = _opt(25, "Port used for direct MX delivery (tests use another).")
    claim_timeout: int = _opt(
        600, "Seconds a relay worker's claim on a message holds; after a crash another "
             "instance sends it then (PostgreSQL). Keep it above the longest delivery.")
    rate_limit: int = _opt(0, "Messages per second in all (0 = unlimited); the rest waits.")
    domain_rate_limit: int = _opt(
        0, "Messages per second to one recipient domain (0 = unlimited); the rest waits.")
    domain_concurrency: int = _opt(
        5, "Connections at once to one recipient domain (direct MX delivery).")


@dataclass
class OrganizersConfig:
    allow: list[str] = _opt(
        [], "Organizer addresses and *@domain patterns allowed to create events via create@."
    )
    sender_auth: SenderAuth = _opt(
        "none", "none | dkim | authentication-results: how the sender of create@ mail is proven."
    )
    authserv_id: list[str] = _opt(
        [], "authserv-ids of upstream MTAs whose Authentication-Results headers are trusted "
            "(sender_auth = \"authentication-results\").")
    decline_counter: bool = _opt(
        False, "Answer a customer's COUNTER (a proposed new time) with DECLINECOUNTER "
               "automatically; either way the organizer is told.")
    reply_accepted: bool = _opt(
        True, "create@ answers the organizer's invitation with an iTIP REPLY (ACCEPTED), so "
              "their calendar shows it as accepted.")
    confirm: bool = _opt(
        True, "Mail the organizer the event page when an invite is taken or refused."
    )


ImapAfter = Literal["seen", "move"]


@dataclass
class ImapAccount:
    """One mailbox at another provider that ciserver fetches mail from (an ``[imap]`` entry)."""

    host: str = _opt("", "(required) name of the IMAP server, e.g. imap.fastmail.com.")
    port: int = _opt(0, "0 = 993 for tls = \"implicit\", else 143.")
    tls: TlsMode = _opt("implicit", "implicit | starttls | none (none only on a trusted network).")
    tls_verify: bool = _opt(True, "Verify the server's TLS certificate.")
    ca_file: str = _opt("", "CA bundle for the server's certificate; empty = system CAs.")
    username: str = _opt("", "(required) login name at the IMAP server.")
    password: str = field(  # repr=False: a logged config never shows it
        default="", repr=False,
        metadata={"help": "(required) password (or app password) for username."})
    mailbox: str = _opt("INBOX", "Folder to fetch from.")
    deliver_to: str = _opt(
        "", "Recipient when no address of ours is found in Delivered-To, X-Original-To, To or "
            "Cc; empty = the create@ address.")
    after: ImapAfter = _opt(
        "seen", "seen | move: what is done to a message once it is safely in the inbox "
                "(flag \\Seen, or move it to move_to).")
    move_to: str = _opt("Processed", "Folder for handled messages when after = \"move\" "
                                     "(created if missing).")
    poll_interval: int = _opt(
        60, "Seconds between checks without IDLE; with IDLE, the mailbox is still re-checked "
            "this often (at most every 25 minutes).")
    idle: bool = _opt(True, "Use IMAP IDLE when the server offers it (new mail in seconds).")
    retry_max: int = _opt(
        300, "Upper bound in seconds of the reconnect delay (1 s, doubling on every failure).")
    timeout: int = _opt(60, "Seconds for connecting and for one IMAP command.")

    @property
    def effective_port(self) -> int:
        return self.port or (993 if self.tls == "implicit" else 143)

    @property
    def label(self) -> str:
        """user@host/mailbox, for logs (never the password)."""
        return f"{self.username}@{self.host}/{self.mailbox}"


IMAP_ACCOUNTS_FORM = (
    'a list of tables like [{host = "imap.example.com", username = "create@example.com", '
    'password = "..."}] (in the environment: the same list as JSON)'
)


@dataclass
class ImapConfig:
    accounts: list[ImapAccount] = _opt(
        [], "Mailboxes at other providers to fetch mail from; empty = no IMAP polling."
    )


DEFAULT_DKIM_HEADERS = [
    "From", "Reply-To", "Sender", "To", "Cc", "Subject", "Date", "Message-ID", "In-Reply-To",
    "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "List-Unsubscribe", "List-Unsubscribe-Post", "Auto-Submitted",
]
DEFAULT_DKIM_OVERSIGN = [
    "From", "Reply-To", "Sender", "To", "Cc", "Subject", "Date", "Message-ID", "MIME-Version",
    "Content-Type", "List-Unsubscribe", "List-Unsubscribe-Post",
]


@dataclass
class DkimConfig:
    selector: str = _opt(
        "", "DNS selector of the RSA key (s=; published at SELECTOR._domainkey.DOMAIN); "
            "empty = outgoing mail is not signed.")
    key_file: str = _opt(
        "", "PEM file of the RSA private key (2048 bits recommended, at least 1024); "
            "`ciserver dkim keygen` writes one.")
    domain: str = _opt(
        "", "Signing domain (d=); empty = [server] domain, the domain of every From we send "
            "(DMARC alignment).")
    ed25519_selector: str = _opt(
        "", "Selector of the optional second signature, ed25519-sha256 (RFC 8463); "
            "another name than selector.")
    ed25519_key_file: str = _opt(
        "", "PEM file of the ed25519 private key (`ciserver dkim keygen --ed25519`); "
            "empty = RSA signature only.")
    headers: list[str] = _opt(
        DEFAULT_DKIM_HEADERS, "Header fields signed when present (From is required).")
    oversign: list[str] = _opt(
        DEFAULT_DKIM_OVERSIGN, "Header fields (of headers) signed once more than present, so "
                               "no copy can be added in transit.")


@dataclass
class ReportsConfig:
    after_event: bool = _opt(
        False, "Mail each organizer an event's final report (CSV attached) once, when the "
               "event (its last occurrence) has ended.")
    after_event_delay: int = _opt(
        0, "Seconds to wait after the end before the final report is mailed.")
    daily_digest: bool = _opt(
        False, "Mail each organizer a daily digest: counts of their current events (not "
               "ended, or ended within a day) and the CSV of their answers.")
    digest_hour: int = _opt(7, "Hour of the day (UTC, 0-23) from which the daily digest goes "
                               "out.")
    poll_interval: int = _opt(
        60, "Seconds between two checks for reports to mail (every instance checks; one "
            "sends).")
    page_size: int = _opt(
        1000, "Rows per page of the JSON reports when the request gives no limit (at most "
              "10000).")
    attachment_bom: bool = _opt(
        True, "Start mailed CSV files with a UTF-8 BOM, so Excel reads them as UTF-8.")


@dataclass
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    web: WebConfig = field(default_factory=WebConfig)
    relay: RelayConfig = field(default_factory=RelayConfig)
    organizers: OrganizersConfig = field(default_factory=OrganizersConfig)
    imap: ImapConfig = field(default_factory=ImapConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    reports: ReportsConfig = field(default_factory=ReportsConfig)
    source: str = "(defaults)"
    default_state_dir: str = ""  # resolved from the environment at load time
    from_environ: bool = False  # loaded from os.environ: a child process loads the same
    # signing.DkimSigner with its keys loaded by load(); None = not signing (or not loaded)
    dkim_signer: Any = field(default=None, repr=False, compare=False)

    # Derived values -----------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return Path(self.server.state_dir or self.default_state_dir or _default_state({}))

    @property
    def database_url(self) -> str:
        if self.database.url:
            return self.database.url
        return f"sqlite+aiosqlite:///{self.state_path / 'ciserver.db'}"

    @property
    def base_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host, port = split_hostport(self.web.listen, "web", "listen", self.source)
        return f"http://{host}:{port}"

    @property
    def smtp_hostname(self) -> str:
        return self.smtp.hostname or self.server.domain

    def secret(self) -> bytes:
        """The HMAC key; generated and persisted in the state directory on first use."""
        if self.server.secret_key:
            return self.server.secret_key.encode()
        path = self.state_path / "secret_key"
        if path.exists():
            return path.read_text().strip().encode()
        path.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(32)
        # O_EXCL: two processes starting at once must agree on one secret.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_text().strip().encode()
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
        return value.encode()


SECTIONS: dict[str, type] = {
    "server": ServerConfig,
    "database": DatabaseConfig,
    "smtp": SmtpConfig,
    "web": WebConfig,
    "relay": RelayConfig,
    "organizers": OrganizersConfig,
    "imap": ImapConfig,
    "dkim": DkimConfig,
    "reports": ReportsConfig,
}
# Sections that later features read; accepted (and ignored here) so one file serves all.
RESERVED_SECTIONS = {"pages"}


def _default_state(env: Mapping[str, str]) -> str:
    if env.get("STATE_DIRECTORY"):  # systemd StateDirectory=
        return env["STATE_DIRECTORY"].split(":")[0]
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "ciserver")


def split_hostport(value: str, section: str, key: str, source: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not (0 <= int(port) < 65536):
        raise ConfigError(
            f"{source}: [{section}] {key}: expected \"host:port\", got {value!r}"
        )
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - explicit "all interfaces"


def _form(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(f'"{a}"' for a in get_args(tp))
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if get_origin(tp) is list:
        return "a list of strings"
    return "a string"


def _coerce(raw: Any, tp: Any, from_env: bool) -> Any:
    """Convert ``raw`` to ``tp`` or raise ValueError (the caller words the message)."""
    if get_origin(tp) is Literal:
        if isinstance(raw, str) and raw in get_args(tp):
            return raw
        raise ValueError
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if from_env and isinstance(raw, str) and raw.lower() in ("1", "true", "yes", "on"):
            return True
        if from_env and isinstance(raw, str) and raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError
    if tp is int:
        if isinstance(raw, bool):
            raise ValueError
        if isinstance(raw, int):
            return raw
        if from_env and isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
            return int(raw)
        raise ValueError
    if get_origin(tp) is list:
        if from_env and isinstance(raw, str):
            text = raw.strip()
            if text.startswith("["):
                raw = json.loads(text)
            else:
                raw = [p.strip() for p in text.split(",") if p.strip()]
        if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
            return list(raw)
        raise ValueError
    if isinstance(raw, str):
        return raw
    raise ValueError


def _apply(section_obj: Any, section: str, values: dict[str, Any], where: str, env: bool) -> None:
    hints = get_type_hints(type(section_obj))
    known = {f.name for f in fields(section_obj)}
    for key, raw in values.items():
        if key not in known:
            raise ConfigError(
                f"{where}: [{section}] {key}: unknown key (known: {', '.join(sorted(known))})"
            )
        tp = hints[key]
        if tp == list[ImapAccount]:
            setattr(section_obj, key, _imap_accounts(raw, section, key, where, env))
            continue
        try:
            setattr(section_obj, key, _coerce(raw, tp, env))
        except (ValueError, json.JSONDecodeError):
            raise ConfigError(
                f"{where}: [{section}] {key}: expected {_form(tp)}, got {raw!r}"
            ) from None


def _imap_accounts(raw: Any, section: str, key: str, where: str,
                   from_env: bool) -> list[ImapAccount]:
    """Parse ``[imap] accounts``: a TOML list of inline tables, or JSON from the environment."""
    if from_env and isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else []
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: [{section}] {key}: expected {IMAP_ACCOUNTS_FORM}; "
                              f"not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: [{section}] {key}: expected {IMAP_ACCOUNTS_FORM}, "
                          f"got {type(raw).__name__}")
    hints = get_type_hints(ImapAccount)
    known = [f.name for f in fields(ImapAccount)]
    accounts = []
    for i, values in enumerate(raw):
        at = f"{where}: [{section}] {key}[{i}]"
        if not isinstance(values, dict):
            raise ConfigError(f"{at}: expected a table like {{host = \"imap.example.com\", "
                              f"username = \"...\", password = \"...\"}}, "
                              f"got {type(values).__name__}")
        account = ImapAccount()
        for name, value in values.items():
            if name not in known:
                raise ConfigError(f"{at}.{name}: unknown key (known: {', '.join(known)})")
            tp = hints[name]
            try:
                setattr(account, name, _coerce(value, tp, from_env))
            except (ValueError, json.JSONDecodeError):
                shown = "(hidden)" if name == "password" else repr(value)
                raise ConfigError(f"{at}.{name}: expected {_form(tp)}, got {shown}") from None
        for name in ("host", "username", "password"):
            if not getattr(account, name):
                raise ConfigError(f"{at}.{name}: required (expected a non-empty string)")
        accounts.append(account)
    return accounts


def _validate_imap(cfg: Config) -> None:
    src = cfg.source
    for i, a in enumerate(cfg.imap.accounts):
        at = f"{src}: [imap] accounts[{i}]"
        if not 0 <= a.port < 65536:
            raise ConfigError(f"{at}.port: expected a port number (0 = the default), "
                              f"got {a.port}")
        for name in ("poll_interval", "retry_max", "timeout"):
            if getattr(a, name) <= 0:
                raise ConfigError(f"{at}.{name}: expected a positive integer (seconds)")
        if not a.mailbox:
            raise ConfigError(f"{at}.mailbox: expected a folder name like \"INBOX\"")
        if a.after == "move" and (not a.move_to or a.move_to == a.mailbox):
            raise ConfigError(f"{at}.move_to: expected a folder other than mailbox "
                              f"({a.mailbox!r}) when after = \"move\", got {a.move_to!r}")
        if a.deliver_to:
            local, at_sign, dom = a.deliver_to.rpartition("@")
            if not local or not at_sign or dom.lower() != cfg.server.domain.lower():
                raise ConfigError(
                    f"{at}.deliver_to: expected an address on [server] domain, like "
                    f"\"{cfg.server.create_local_part}@{cfg.server.domain}\", "
                    f"got {a.deliver_to!r}")


# A host name (RFC 1123 labels; "localhost" for the embedded default) and a plain local part.
_DOMAIN_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_LOCAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _validate(cfg: Config) -> None:
    src = cfg.source
    split_hostport(cfg.smtp.listen, "smtp", "listen", src)
    split_hostport(cfg.web.listen, "web", "listen", src)
    if cfg.relay.smarthost:
        split_hostport(cfg.relay.smarthost, "relay", "smarthost", src)
    for i, net in enumerate(cfg.web.metrics_allow):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"{src}: [web] metrics_allow[{i}]: expected a network like "
                              f"\"10.0.0.0/8\" or an address, got {net!r}") from None
    if not _DOMAIN_RE.match(cfg.server.domain):
        raise ConfigError(
            f"{src}: [server] domain: expected a domain name like \"invites.example.com\", "
            f"got {cfg.server.domain!r}"
        )
    if not _LOCAL_RE.match(cfg.server.create_local_part):
        raise ConfigError(
            f"{src}: [server] create_local_part: expected the part of an address before the @, "
            f"like \"create\" (letters, digits, . _ -), got {cfg.server.create_local_part!r}")
    if cfg.server.public_url and not cfg.server.public_url.startswith(("http://", "https://")):
        raise ConfigError(
            f"{src}: [server] public_url: expected an http:// or https:// URL, "
            f"got {cfg.server.public_url!r}"
        )
    url = cfg.database.url
    if url and not url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
        raise ConfigError(
            f"{src}: [database] url: expected \"sqlite+aiosqlite:///PATH\" or "
            f"\"postgresql+asyncpg://USER@HOST/DB\", got {url!r}"
        )
    for i, pattern in enumerate(cfg.organizers.allow):
        local, at, dom = pattern.rpartition("@")
        if not at or not dom or not local:
            raise ConfigError(
                f"{src}: [organizers] allow[{i}]: expected \"name@domain\" or \"*@domain\", "
                f"got {pattern!r}"
            )
    if cfg.web.console_session_lifetime <= 0:
        raise ConfigError(f"{src}: [web] console_session_lifetime: expected a positive integer "
                          f"(seconds), got {cfg.web.console_session_lifetime}")
    if bool(cfg.smtp.tls_cert) != bool(cfg.smtp.tls_key):
        raise ConfigError(f"{src}: [smtp] tls_key: expected both tls_cert and tls_key, or neither")
    for name in ("max_message_size", "max_recipients", "session_timeout", "max_connections",
                 "max_connections_per_ip"):
        if getattr(cfg.smtp, name) <= 0:
            raise ConfigError(f"{src}: [smtp] {name}: expected a positive integer")
    if cfg.organizers.sender_auth == "authentication-results" and not cfg.organizers.authserv_id:
        raise ConfigError(
            f"{src}: [organizers] authserv_id: expected the authserv-id of your MTA (a list of "
            "strings) when sender_auth = \"authentication-results\"")
    if cfg.server.inbox_processes < 0:
        raise ConfigError(f"{src}: [server] inbox_processes: expected 0 or a positive integer")
    for name in ("workers", "domain_concurrency", "claim_timeout"):
        if getattr(cfg.relay, name) <= 0:
            raise ConfigError(f"{src}: [relay] {name}: expected a positive integer")
    for name in ("rate_limit", "domain_rate_limit"):
        if getattr(cfg.relay, name) < 0:
            raise ConfigError(f"{src}: [relay] {name}: expected 0 (no limit) or more")
    r = cfg.reports
    if not 0 <= r.digest_hour <= 23:
        raise ConfigError(f"{src}: [reports] digest_hour: expected an hour from 0 to 23 (UTC), "
                          f"got {r.digest_hour}")
    if r.after_event_delay < 0:
        raise ConfigError(f"{src}: [reports] after_event_delay: expected 0 or more seconds")
    if r.poll_interval <= 0:
        raise ConfigError(f"{src}: [reports] poll_interval: expected a positive integer "
                          "(seconds)")
    if not 1 <= r.page_size <= 10000:
        raise ConfigError(f"{src}: [reports] page_size: expected 1 to 10000, got {r.page_size}")


DNS_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*")


def _validate_dkim(cfg: Config, check_files: bool) -> None:
    src, d = cfg.source, cfg.dkim
    for key in ("selector", "ed25519_selector"):
        value = getattr(d, key)
        if value and not DNS_NAME.fullmatch(value):
            raise ConfigError(f"{src}: [dkim] {key}: expected a DNS label like "
                              f"\"ciserver-2026\", got {value!r}")
    if d.domain and not DNS_NAME.fullmatch(d.domain.rstrip(".")):
        raise ConfigError(f"{src}: [dkim] domain: expected a domain name like "
                          f"\"invites.example.com\" (or empty = [server] domain), "
                          f"got {d.domain!r}")
    if d.selector and not d.key_file:
        raise ConfigError(f"{src}: [dkim] key_file: expected the PEM file of the RSA private "
                          "key when selector is set (`ciserver dkim keygen` writes one)")
    if d.key_file and not d.selector:
        raise ConfigError(f"{src}: [dkim] selector: expected the selector published in DNS "
                          "for key_file (or no key_file: mail is not signed)")
    if bool(d.ed25519_key_file) != bool(d.ed25519_selector):
        raise ConfigError(f"{src}: [dkim] ed25519_selector: expected both ed25519_selector "
                          "and ed25519_key_file, or neither")
    if d.ed25519_selector and not d.selector:
        raise ConfigError(f"{src}: [dkim] selector: expected an RSA key (selector, key_file) "
                          "beside ed25519: many receivers verify rsa-sha256 only")
    if d.ed25519_selector and d.ed25519_selector.lower() == d.selector.lower():
        raise ConfigError(f"{src}: [dkim] ed25519_selector: expected another selector than "
                          f"selector ({d.selector!r}): one DNS name holds one key")
    lower = [h.lower() for h in d.headers]
    for key, names in (("headers", d.headers), ("oversign", d.oversign)):
        for i, name in enumerate(names):
            if not re.fullmatch(r"[!-9;-~]+", name) or name.lower() == "dkim-signature":
                raise ConfigError(f"{src}: [dkim] {key}[{i}]: expected a header field name "
                                  f"like \"Subject\", got {name!r}")
            if key == "oversign" and name.lower() not in lower:
                raise ConfigError(f"{src}: [dkim] oversign[{i}]: {name!r} is not in headers")
    if "from" not in lower:
        raise ConfigError(f"{src}: [dkim] headers: expected a list that includes \"From\" "
                          "(RFC 6376 requires it to be signed)")
    if check_files:
        from .signing import from_config

        cfg.dkim_signer = from_config(cfg)


def load(path: str | os.PathLike[str] | None = None,
         environ: dict[str, str] | None = None, *, check_files: bool = True) -> Config:
    """Load the file (if any), apply environment overrides and validate.

    ``check_files``: load the files the configuration names (DKIM keys) now; off for
    commands that make them (`ciserver dkim keygen`)."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    cfg = Config(default_state_dir=_default_state(env), from_environ=environ is None)
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        cfg.source = str(p)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    for section, values in data.items():
        if section in RESERVED_SECTIONS:
            continue
        if section not in SECTIONS:
            raise ConfigError(
                f"{cfg.source}: [{section}]: unknown section (known: {', '.join(SECTIONS)})"
            )
        if not isinstance(values, dict):
            raise ConfigError(f"{cfg.source}: [{section}]: expected a table")
        _apply(getattr(cfg, section), section, values, cfg.source, env=False)
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        if section in RESERVED_SECTIONS:
            continue
        if section not in SECTIONS:
            raise ConfigError(f"environment {name}: unknown section [{section}]")
        _apply(getattr(cfg, section), section, {key: value}, f"environment {name}", env=True)
    _validate(cfg)
    _validate_imap(cfg)
    _validate_dkim(cfg, check_files)
    return cfg


def describe() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, help) for every option: the example file is checked against it."""
    out = []
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            out.append((section, f.name, default, f.metadata["help"]))
    return out
