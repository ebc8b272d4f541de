"""Hand-written mail fixtures in tests/data/, with their placeholders filled in.

The fixtures are shaped like what real clients send back to an ORGANIZER address
``rsvp+TOKEN@invites.example.com`` and contain the literal placeholders ``{{TOKEN}}``,
``{{UID}}`` and ``{{SEQUENCE}}``. Calendar data is often base64-encoded (Outlook, Google's
``invite.ics``), where a plain text replace cannot reach it, so base64 parts are decoded,
filled in and encoded again; everything else is replaced in the text as it stands.
"""

from __future__ import annotations

import base64
import email
import re
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]


DEFAULTS = {
    "TOKEN": "pmrgs4dfnzzwk5dfon2gk4tbgq",
    "UID": "PLACEHOLDER-UID@invites.example.com",
    "SEQUENCE": "0",
}
_PLACEHOLDER_RE = re.compile(r"\{\{([A-Z_]+)\}\}")


def _fill(text: str, values: dict[str, str]) -> str:
    def one(m: re.Match[str]) -> str:
        key = m.group(1)
        if key not in values:
            raise KeyError(f"fixture placeholder {{{{{key}}}}} has no value")
        return values[key]

    return _PLACEHOLDER_RE.sub(one, text)


def load_fixture(name: str, **subs: object) -> bytes:
    """The raw message ``tests/data/<name>`` with placeholders replaced and CRLF line ends.

    Keyword names are the placeholder names, case-insensitive
    (``load_fixture("x.eml", token="abc", uid="u@x", sequence=3)``); placeholders not
    given keep the defaults in :data:`DEFAULTS`.
    """
    values = dict(DEFAULTS)
    for key, value in subs.items():
        if key.upper() not in DEFAULTS:
            raise TypeError(f"unknown fixture placeholder {key!r}; known: {sorted(DEFAULTS)}")
        values[key.upper()] = str(value)

    text = (DATA_DIR / name).read_bytes().decode("utf-8")
    text = text.replace("\r\n", "\n").replace("\r", "\n")

    # base64 bodies: decode, fill, re-encode (76-column lines), in place.
    msg = email.message_from_string(text)
    for part in msg.walk():
        if part.is_multipart():
            continue
        if str(part.get("Content-Transfer-Encoding", "")).strip().lower() != "base64":
            continue
        encoded = str(part.get_payload()).strip("\n")
        decoded = base64.b64decode(encoded).decode("utf-8")
        filled = _fill(decoded, values)
        if filled != decoded:
            new = base64.encodebytes(filled.encode("utf-8")).decode("ascii").rstrip("\n")
            if text.count(encoded) != 1:
                raise ValueError(f"{name}: a base64 body occurs more than once")
            text = text.replace(encoded, new)

    text = _fill(text, values)
    return text.replace("\n", "\r\n").encode("utf-8")
