"""The provider preset table: complete, consistent, and the two lookups built on it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from trio_idle.accounts.connections import parse_host
from trio_idle.accounts.providers import (
    ACCOUNT_LOCKED,
    APP_PASSWORD,
    APP_PASSWORD_REQUIRED,
    AUTH_METHODS,
    GENERIC,
    GENERIC_PRESET,
    GENERIC_TEXTS,
    IMAP_DISABLED,
    INVALID_CREDENTIALS,
    OAUTH2,
    PASSWORD,
    PRESETS,
    REASONS,
    SECURITIES,
    TOO_MANY_CONNECTIONS,
    WEB_LOGIN_REQUIRED,
    classify_server_text,
    preset_for,
    preset_named,
    provider_timers,
)
from trio_idle.core.config import TimerSettings

DOC = Path(__file__).resolve().parents[2] / "docs" / "providers.md"
REQUIRED = {"gmail", "microsoft", "icloud", "yahoo", "gmx", "webde", "tonline"}


def test_the_issue_s_providers_are_all_there() -> None:
    assert {p.name for p in PRESETS} == REQUIRED
    assert GENERIC not in {p.name for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_is_complete_and_well_formed(preset: object) -> None:
    from trio_idle.accounts.providers import Preset

    assert isinstance(preset, Preset)
    assert preset.title and preset.host
    assert parse_host(preset.host) == preset.host  # a valid, lowercase host name
    assert preset.hosts[0] == preset.host
    assert all(parse_host(h) == h for h in preset.hosts)
    assert 0 < preset.port < 65536 and preset.security in SECURITIES
    assert preset.security != "plain", "no provider preset may send passwords in clear"
    assert preset.auth and set(preset.auth) <= set(AUTH_METHODS)
    assert len(set(preset.auth)) == len(preset.auth)
    if preset.app_password_required:
        assert PASSWORD not in preset.auth and (
            APP_PASSWORD in preset.auth or OAUTH2 in preset.auth
        )
    assert preset.domains and all(d == d.lower() and "." in d for d in preset.domains)
    assert preset.max_connections is None or preset.max_connections > 0
    # renewal and tick overrides only ever make sense below what the provider tolerates
    if preset.idle_limit is not None:
        assert preset.idle_renew is None or preset.idle_renew < preset.idle_limit
        assert preset.tick is None or preset.tick < preset.idle_limit
    for known in preset.texts:
        assert known.fragment and known.fragment == known.fragment.lower()
        assert known.reason in REASONS


def test_domains_and_hosts_belong_to_exactly_one_preset() -> None:
    domains = [d for p in PRESETS for d in p.domains]
    hosts = [h for p in PRESETS for h in p.hosts]
    assert len(domains) == len(set(domains))
    assert len(hosts) == len(set(hosts))


def test_documented_facts_are_in_the_table() -> None:
    gmail = preset_named("gmail")
    assert (gmail.host, gmail.port, gmail.security) == ("imap.gmail.com", 993, "tls")
    assert gmail.max_connections == 15 and gmail.app_password_required
    assert preset_named("microsoft").auth == (OAUTH2,)  # no passwords on Exchange Online
    assert preset_named("icloud").app_password_required
    # GMX drops idle connections early: the preset renews sooner than the global 25 min
    gmx = preset_named("gmx")
    assert gmx.idle_renew is not None and gmx.idle_renew < 25 * 60


def test_generic_preset_is_the_fallback_and_changes_nothing() -> None:
    assert preset_named(None) is GENERIC_PRESET
    assert preset_named("no-such-provider") is GENERIC_PRESET
    assert GENERIC_PRESET.host is None
    assert (GENERIC_PRESET.idle_renew, GENERIC_PRESET.tick) == (None, None)


@pytest.mark.parametrize(
    ("email", "host", "expected"),
    [
        ("someone@gmail.com", None, "gmail"),
        ("someone@GoogleMail.com", "", "gmail"),
        ("boss@company.example", "imap.gmail.com", "gmail"),  # Workspace, own domain
        ("boss@company.example", "IMAP.GMAIL.COM.", "gmail"),
        ("x@hotmail.com", None, "microsoft"),
        ("x@tenant.example", "outlook.office365.com", "microsoft"),
        ("x@me.com", None, "icloud"),
        ("x@aol.com", None, "yahoo"),
        ("x@gmx.de", None, "gmx"),
        ("x@web.de", "imap.web.de", "webde"),
        ("x@t-online.de", None, "tonline"),
        ("x@example.org", None, GENERIC),
        ("x@example.org", "imap.example.org", GENERIC),
        # a given host decides: a gmail.com address on some other server is not Gmail
        ("x@gmail.com", "127.0.0.1", GENERIC),
        ("not-an-address", None, GENERIC),
        ("", None, GENERIC),
        ("x@", None, GENERIC),
    ],
)
def test_preset_for(email: str, host: str | None, expected: str) -> None:
    assert preset_for(email, host).name == expected


@pytest.mark.parametrize(
    ("provider", "text", "reason"),
    [
        (
            "gmail",
            "NO [ALERT] Application-specific password required: "
            "https://support.google.com/accounts/answer/185833 (Failure)",
            APP_PASSWORD_REQUIRED,
        ),
        (
            "gmail",
            "NO [ALERT] Please log in via your web browser: "
            "https://support.google.com/mail/accounts/answer/78754 (Failure)",
            WEB_LOGIN_REQUIRED,
        ),
        ("gmail", "NO [ALERT] Your account is not enabled for IMAP use.", IMAP_DISABLED),
        ("gmail", "NO [ALERT] IMAP access is disabled for your domain.", IMAP_DISABLED),
        ("gmail", "NO [ALERT] Too many simultaneous connections. (Failure)", TOO_MANY_CONNECTIONS),
        ("gmail", "NO [AUTHENTICATIONFAILED] Invalid credentials (Failure)", INVALID_CREDENTIALS),
        ("microsoft", "NO AUTHENTICATE failed.", INVALID_CREDENTIALS),
        ("microsoft", "BAD User is authenticated but not connected.", INVALID_CREDENTIALS),
        ("yahoo", "NO [AUTHENTICATIONFAILED] LOGIN Invalid credentials", INVALID_CREDENTIALS),
        ("gmx", "NO authentication failed", INVALID_CREDENTIALS),
        # generic: RFC 5530 codes and Dovecot's per-user connection limit, for any preset
        (GENERIC, "NO [AUTHENTICATIONFAILED] Authentication failed.", INVALID_CREDENTIALS),
        (
            "icloud",
            "NO [UNAVAILABLE] Maximum number of connections from user+IP exceeded "
            "(mail_max_userip_connections=10)",
            TOO_MANY_CONNECTIONS,
        ),
    ],
)
def test_server_texts_map_to_their_reasons(provider: str, text: str, reason: str) -> None:
    assert classify_server_text(preset_named(provider), text) == reason
    assert classify_server_text(preset_named(provider), text.upper()) == reason


def test_a_provider_s_own_texts_win_over_the_generic_ones() -> None:
    # Gmail's app-password refusal is more specific than any generic reading of it
    text = "NO [AUTHENTICATIONFAILED] [ALERT] Application-specific password required"
    assert classify_server_text(preset_named("gmail"), text) == APP_PASSWORD_REQUIRED
    assert classify_server_text(GENERIC_PRESET, text) == INVALID_CREDENTIALS


def test_unknown_texts_and_other_providers_texts_are_not_classified() -> None:
    assert classify_server_text(GENERIC_PRESET, "NO [SERVERBUG] oops") is None
    assert classify_server_text(GENERIC_PRESET, "") is None
    # Gmail's wording means nothing coming from some other server
    assert classify_server_text(GENERIC_PRESET, "Please log in via your web browser") is None


def test_every_reason_code_is_known_to_the_table_vocabulary() -> None:
    used = {t.reason for p in PRESETS for t in p.texts} | {t.reason for t in GENERIC_TEXTS}
    assert used <= set(REASONS)
    assert ACCOUNT_LOCKED in REASONS  # no sourced text yet, still a code the classifier has


# -- per-provider timers -----------------------------------------------------------------


def timers(renew: float = 1500.0, tick: float = 120.0) -> TimerSettings:
    return TimerSettings(idle_renew_interval=renew, tick_interval=tick)


def test_a_preset_s_sooner_renewal_wins_over_the_global_default() -> None:
    gmx = preset_named("gmx")
    assert gmx.idle_renew is not None
    applied = provider_timers(timers(), "gmx")
    assert applied.idle_renew_interval == gmx.idle_renew
    assert applied.tick_interval == 120.0  # no tick override for GMX
    assert applied.command_timeout == timers().command_timeout  # nothing else changes


def test_an_operator_s_even_shorter_setting_still_holds() -> None:
    assert provider_timers(timers(renew=60.0), "gmx").idle_renew_interval == 60.0


@pytest.mark.parametrize("provider", [None, GENERIC, "gmail", "unknown"])
def test_providers_without_overrides_keep_the_timers_object(provider: str | None) -> None:
    base = timers()
    assert provider_timers(base, provider) is base


# -- the doc ------------------------------------------------------------------------------


def test_docs_providers_has_a_sourced_section_per_preset() -> None:
    text = DOC.read_text(encoding="utf-8")
    sections = re.split(r"^## ", text, flags=re.MULTILINE)
    for preset in PRESETS:
        matching = [s for s in sections if f"`{preset.name}`" in s.split("\n", 1)[0]]
        assert len(matching) == 1, f"docs/providers.md: no section for {preset.name}"
        section = matching[0]
        assert preset.host is not None and f"`{preset.host}`" in section
        assert "https://" in section, f"{preset.name}: no public source"
        for known in preset.texts:
            assert known.fragment in section.lower(), f"{preset.name}: {known.fragment!r}"
    assert "https://mail.google.com/" in text
    assert "https://outlook.office.com/IMAP.AccessAsUser.All offline_access" in text
