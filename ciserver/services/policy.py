"""Who may create events through create@: the allow-list and sender authentication.

A message's *identity* is the sender address that authentication vouches for
(services.senderauth: the From address as written with ``sender_auth = "none"``, else only
when DKIM or a trusted Authentication-Results header proves it). The identity must be the
invitation's ORGANIZER (or itself be allowed), and the ORGANIZER must be on the allow-list.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..addresses import normalize_email
from ..config import OrganizersConfig


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""
    identity: str = ""


def matches(address: str, patterns: list[str]) -> bool:
    address = normalize_email(address)
    domain = address.rpartition("@")[2]
    for pattern in patterns:
        p = pattern.strip().lower()
        if p.startswith("*@"):
            if domain == p[2:]:
                return True
        elif address == p:
            return True
    return False


class OrganizerPolicy:
    def __init__(self, cfg: OrganizersConfig) -> None:
        self.cfg = cfg

    def sender_allowed(self, from_addr: str) -> bool:
        """Cheap check at SMTP time, before we accept the message."""
        return matches(from_addr, self.cfg.allow)

    def check(self, identity: str, organizer: str) -> Decision:
        """May the sender that authentication proved (``identity``, "" for none) create or
        change events of ``organizer``?"""
        if not self.cfg.allow:
            return Decision(False, "this server has no allowed organizers yet "
                                   "(the operator sets [organizers] allow)")
        if not identity:
            how = {"dkim": "no valid DKIM signature of the sender's domain",
                   "authentication-results": "no passing result from the trusted mail "
                                             "server"}.get(self.cfg.sender_auth, "no sender")
            return Decision(False, f"the sender could not be authenticated ({how}; "
                                   f"sender_auth = {self.cfg.sender_auth})")
        organizer = normalize_email(organizer)
        if not matches(organizer, self.cfg.allow):
            return Decision(False, f"the organizer {organizer} is not allowed to create "
                                   "events on this server", identity)
        # A delegate, or a shared calendar (Google group calendars name the calendar as
        # ORGANIZER and the person as sender), acts for the organizer only if the operator
        # allowed that sender too.
        if identity != organizer and not matches(identity, self.cfg.allow):
            return Decision(False, f"the invitation names {organizer} as ORGANIZER but was "
                                   f"sent by {identity}, who is not allowed to act for it; "
                                   "send it from the organizer's own calendar account",
                            identity)
        return Decision(True, "", identity)
