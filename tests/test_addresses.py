"""Our addresses and tokens."""

from __future__ import annotations

from ciserver.addresses import TOKEN_LENGTH, AddressBook, Kind, make_token, verify_token

SECRET = b"k" * 32


def test_tokens_round_trip_and_survive_lower_casing() -> None:
    for sub_id in (1, 2, 12345, 2**40):
        token = make_token(SECRET, sub_id)
        assert len(token) == TOKEN_LENGTH and token == token.lower()
        assert verify_token(SECRET, token) == sub_id
        assert verify_token(SECRET, token.upper().lower()) == sub_id
        assert verify_token(b"other secret", token) is None
    assert make_token(SECRET, 1)[:4] != make_token(SECRET, 2)[:4]


def test_forged_and_malformed_tokens() -> None:
    token = make_token(SECRET, 7)
    flipped = token[:-1] + ("a" if token[-1] != "a" else "b")
    for bad in ("", "a" * 26, flipped, token + "a", "!" * 26, "0" * 26):
        assert verify_token(SECRET, bad) is None


def test_address_book() -> None:
    book = AddressBook("Invites.Example.com", SECRET)
    rsvp = book.address(Kind.RSVP, 42)
    assert len(rsvp.split("@")[0]) < 64
    parsed = book.parse(rsvp.upper())
    assert parsed is not None and parsed.kind is Kind.RSVP and parsed.subscription_id == 42
    assert book.parse("CREATE@invites.example.com").kind is Kind.CREATE  # type: ignore[union-attr]
    assert book.parse("<mailto:unsubscribe+" + book.token(5) + "@invites.example.com>") \
        .kind is Kind.UNSUBSCRIBE  # type: ignore[union-attr]
    for other in ("create@elsewhere.example", "postmaster@invites.example.com",
                  "create+x@invites.example.com", "rsvp@invites.example.com",
                  f"rsvp+{'a' * 26}@invites.example.com", "bounce+@invites.example.com",
                  "nobody"):
        assert book.parse(other) is None
