"""Lists of customers as CSV files (pure: no I/O), read the same way by the bulk upload
(``POST /api/v1/events/{id}/attendees``) and its command-line twin (``ciserver invite
EVENT --csv FILE``).

Organizers make these files with whatever they have, mostly spreadsheets, so:

- the character set is found, not assumed (:func:`decode`): a byte order mark first (Excel's
  "Unicode text" is UTF-16 with one), else the charset the sender declared, else UTF-8, and
  when the bytes are not valid UTF-8, Windows-1252 (Excel's "CSV" on Western Windows);
- the delimiter is sniffed among ``,`` ``;`` (Excel where the decimal mark is a comma) and
  tab (:func:`sniff`);
- an optional header row names the columns with the usual words (:data:`EMAIL_HEADERS`,
  :data:`NAME_HEADERS`, first and last name joined);
- every error names the line of the file it is about.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
from dataclasses import dataclass


class CsvError(ValueError):
    """The file cannot be read; the message says why (and where), for people."""


@dataclass(frozen=True)
class Person:
    line: int  # where the record starts in the file, counting from 1
    email: str
    name: str


# Header cells are compared without case, spaces, "-", "_" and ".": "E-mail Address",
# "email_address" and "EMAIL" all name the address column.
EMAIL_HEADERS = frozenset({"email", "emailaddress", "mail", "mailaddress"})
NAME_HEADERS = frozenset({"name", "fullname", "displayname"})
FIRST_HEADERS = frozenset({"firstname", "givenname", "first", "forename"})
LAST_HEADERS = frozenset({"lastname", "surname", "familyname", "last"})
_ANY_HEADER = EMAIL_HEADERS | NAME_HEADERS | FIRST_HEADERS | LAST_HEADERS
_FOLD = re.compile(r"[\s\-_.]+")

DELIMITERS = (",", ";", "\t")  # in order of preference when a line splits equally well

_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF16_LE, "utf-16"),
         (codecs.BOM_UTF16_BE, "utf-16"))
# Browsers read these labels as Windows-1252 (WHATWG Encoding): a file "in Latin-1" from
# Windows has curly quotes and the euro sign at 0x80-0x9F, which true Latin-1 would turn into
# invisible control characters.
_AS_CP1252 = frozenset({"latin-1", "iso8859-1", "ascii", "cp1252"})


def charset_of(content_type: str) -> str:
    """The ``charset`` parameter of a Content-Type header, or ""."""
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            return value.strip().strip('"').strip()
    return ""


def _cp1252(data: bytes) -> str:
    try:
        return data.decode("cp1252")
    except UnicodeDecodeError:  # the 5 bytes cp1252 leaves undefined: keep them as Latin-1
        return data.decode("latin-1")


def decode(data: bytes, charset: str = "") -> str:
    """The file's text: by its byte order mark, else by ``charset`` (as declared by the
    sender), else UTF-16 if it plainly is, else UTF-8, else Windows-1252. CsvError for a
    declared charset we do not know, or bytes that are not in the declared one."""
    for bom, codec in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                raise CsvError(f"the file starts with a {codec.upper()} byte order mark but "
                               f"is not valid {codec.upper()} (byte {exc.start})") from None
    if charset:
        try:
            codec = codecs.lookup(charset).name
        except LookupError:
            raise CsvError(f"unknown character set {charset!r}; send UTF-8") from None
        if codec in _AS_CP1252:
            return _cp1252(data)
        if codec != "utf-8":
            try:
                return data.decode(codec)
            except UnicodeDecodeError as exc:
                raise CsvError(f"the file is not valid {charset} (byte {exc.start})") from None
        # declared UTF-8: many tools say so by default, so a mislabelled file still falls
        # back below like an undeclared one
    if not charset:
        codec = _utf16_without_bom(data)
        if codec:
            try:
                return data.decode(codec)
            except UnicodeDecodeError:
                pass  # not UTF-16 after all: read on as below
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return _cp1252(data)


def _utf16_without_bom(data: bytes) -> str:
    """"utf-16-le" or "-be" when every other byte of the start is NUL, as in UTF-16 text of
    Latin letters saved without a BOM (no CSV in a single-byte set contains NULs); else ""."""
    head = data[:2000]
    if len(head) < 4 or b"\0" not in head:
        return ""
    even, odd = head[0::2].count(0), head[1::2].count(0)
    half = len(head) // 4  # at least half of the characters are ASCII
    if odd >= half and even == 0:
        return "utf-16-le"
    if even >= half and odd == 0:
        return "utf-16-be"
    return ""


def _fold(cell: str) -> str:
    return _FOLD.sub("", cell.strip().lower())


def sniff(first_line: str) -> str:
    """The delimiter that splits the file's first line into the most cells (a header or a
    first record); "," when none splits it, or on a tie."""
    best, most = ",", 1
    for delimiter in DELIMITERS:
        try:
            cells = next(csv.reader([first_line], delimiter=delimiter), [])
        except csv.Error:
            continue
        if len(cells) > most:
            best, most = delimiter, len(cells)
    return best


def parse(text: str) -> list[Person]:
    """The customers in a CSV text: rows of email[,name] (blank rows skipped), or columns
    named by a header row. CsvError names the line it is about."""
    text = text.lstrip("\ufeff")
    first = next((line for line in text.splitlines() if line.strip()), "")
    reader = csv.reader(io.StringIO(text), delimiter=sniff(first))
    rows: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for record in reader:
            if any(c.strip() for c in record):
                rows.append((start, record))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise CsvError(f"not a CSV file (line {reader.line_num}: {exc})") from None
    if not rows:
        return []
    header = [_fold(c) for c in rows[0][1]]

    def column(names: frozenset[str]) -> int | None:
        return next((i for i, h in enumerate(header) if h in names), None)

    ni: int | None
    fi: int | None
    li: int | None
    found = column(EMAIL_HEADERS)
    if found is None:
        if any(h in _ANY_HEADER for h in header) and not any("@" in c for c in rows[0][1]):
            # A header without an address column: say so rather than "'Name' is not a
            # valid email address" on line 1.
            raise CsvError(f"line {rows[0][0]}: the header row has no email column (name it "
                           "email, e-mail, email address or mail)")
        ei, ni, fi, li = 0, 1, None, None  # no header: email[,name]
    else:
        ei, ni, fi, li = found, column(NAME_HEADERS), column(FIRST_HEADERS), column(LAST_HEADERS)
        rows = rows[1:]

    def cell(r: list[str], i: int | None) -> str:
        return r[i].strip() if i is not None and i < len(r) else ""

    out = []
    for line, r in rows:
        name = cell(r, ni) or " ".join(p for p in (cell(r, fi), cell(r, li)) if p)
        out.append(Person(line, cell(r, ei), name))
    return out
