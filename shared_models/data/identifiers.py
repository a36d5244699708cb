"""Spotting direct identifiers before they can enter a model or leave a university.

The contract carries pseudonymous IDs only. Any column whose *name* or *values* look like a
name, an e-mail address, a phone number, a national ID or an exact date of birth is refused.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_NAME_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(rx))
    for kind, rx in (
        ("a person's name", r"^(first|last|given|family|full|middle|student|maiden|sur)_?name$"),
        ("a person's name", r"^(name|surname|forename|names)$"),
        ("an e-mail address", r"(^|_)e_?mail(_|$)|^mail(_address)?$"),
        ("a phone number", r"(^|_)(phone|telephone|mobile|cell|tel)(_|$)"),
        ("a national ID", r"(^|_)(ssn|nin|passport|national_?id|social_security|tax_?id)(_|$)"),
        ("a national ID", r"^(personnummer|bsn|cpr|dni|nif|aadhaar|sin|insurance_number)$"),
        ("an exact birth date", r"(^|_)(dob|birth_?date|date_?of_?birth|birthday)(_|$)"),
        ("a home address", r"(^|_)(street|address|home_address|postcode|zip_?code)(_|$)"),
        ("an IP address", r"(^|_)ip_?address(_|$)"),
    )
)

_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[a-z]{2,}$", re.IGNORECASE)
_PHONE = re.compile(r"^\+?\(?\d[\d\s().-]{7,17}\d$")
_DATE = re.compile(r"^(\d{4}-\d{1,2}-\d{1,2}|\d{1,2}[./]\d{1,2}[./]\d{4})$")
_PERSON_NAME = re.compile(r"^[A-Z][a-z'-]+( [A-Z][a-z'-]+)+$")


def _normalise(column: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", column.strip().lower()).strip("_")


def identifier_kind_by_name(column: str) -> str | None:
    """What direct identifier a column *name* suggests, or None."""
    norm = _normalise(column)
    for kind, pattern in _NAME_PATTERNS:
        if pattern.search(norm):
            return kind
    return None


def identifier_kind_by_values(values: Iterable[str], *, numbers_allowed: bool) -> str | None:
    """What direct identifier the *values* of a column look like, or None.

    A column is flagged when at least one non-empty value in the first few hundred looks like an
    e-mail address, or when most look like phone numbers, person names or exact dates. Numeric
    feature columns pass ``numbers_allowed=True`` so that long counts are not taken for phones.
    """
    sample = [v.strip() for v, _ in zip(values, range(500), strict=False) if v.strip()]
    if not sample:
        return None
    if any(_EMAIL.match(v) for v in sample):
        return "an e-mail address"
    majority = len(sample) // 2 + 1

    def count(rx: re.Pattern[str]) -> int:
        return sum(1 for v in sample if rx.match(v))

    if count(_PERSON_NAME) >= majority:
        return "a person's name"
    if count(_DATE) >= majority:
        return "an exact date (birth date?)"
    if not numbers_allowed and sum(1 for v in sample if _looks_like_phone(v)) >= majority:
        return "a phone number"
    return None


def _looks_like_phone(value: str) -> bool:
    if not _PHONE.match(value):
        return False
    digits = sum(c.isdigit() for c in value)
    separators = sum(c in " -()" for c in value)
    return 9 <= digits <= 15 and (value.startswith("+") or separators >= 2)
