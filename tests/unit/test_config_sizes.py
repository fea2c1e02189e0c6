"""Sizes in settings (TRIO_IDLE_MAX_LINE, TRIO_IDLE_MAX_LITERAL): parse_size and its errors."""

from __future__ import annotations

import pytest

from trio_idle.core.config import ConfigError, parse_settings
from trio_idle.core.values import parse_size

BASE_ENV = {
    "ADMIN_SECRET": "adm1n-s3cret-VALUE",
    "ENCRYPTION_KEY": "0123456789abcdef0123456789abcdef-key",
    "DATABASE_URL": "postgresql://app:pw@db.internal:5432/mail",
}


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1048576),
        ("1", 1),
        ("512k", 512 * 1024),
        ("512K", 512 * 1024),
        ("64KiB", 64 * 1024),
        ("64kib", 64 * 1024),
        ("64KB", 64 * 1024),
        ("1M", 1024 * 1024),
        ("1MiB", 1024 * 1024),
        ("1MB", 1024 * 1024),
        (" 2 MiB ", 2 * 1024 * 1024),
        ("1G", 1024**3),
        ("1GiB", 1024**3),
        ("100b", 100),
        ("100B", 100),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "0", "0k", "-1", "1.5M", "1 T", "M", "1Mi", "1 MiBs", "ten", "1e6", "1KiBB"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_defaults_are_one_mib_each() -> None:
    s = parse_settings(BASE_ENV)
    assert (s.imap.max_line, s.imap.max_literal) == (1024 * 1024, 1024 * 1024)


def test_env_and_flag_set_the_limits() -> None:
    s = parse_settings(
        {**BASE_ENV, "TRIO_IDLE_MAX_LINE": "64KiB", "TRIO_IDLE_MAX_LITERAL": "8M"},
        {"max_line": "128k"},
    )
    assert (s.imap.max_line, s.imap.max_literal) == (128 * 1024, 8 * 1024 * 1024)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            "lots",
            "TRIO_IDLE_MAX_LINE: expected a size like 1048576, 512k, 64KiB or 1MiB, got 'lots'",
        ),
        ("100", "TRIO_IDLE_MAX_LINE: expected at least 1KiB, got '100'"),
        ("0", "TRIO_IDLE_MAX_LINE: expected a positive size, got '0'"),
    ],
)
def test_a_bad_limit_is_a_one_line_error_naming_the_variable(value: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({**BASE_ENV, "TRIO_IDLE_MAX_LINE": value})
    assert str(info.value) == expected


def test_a_bad_flag_value_names_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"^--max-literal: expected a size"):
        parse_settings(BASE_ENV, {"max_literal": "1.5M"})
