"""Settings declared once, grouped by concern: the declaration is the only source of a
setting's variable, flag, default and help, and every group and the table agree."""

from __future__ import annotations

import attrs
import pytest

from trio_idle.core.config import (
    GROUPS,
    OPTIONS,
    ConfigError,
    Settings,
    TimerSettings,
    parse_settings,
    process_secrets,
    setting,
)
from trio_idle.core.secret import Secret
from trio_idle.core.values import parse_duration

ADMIN = "gr0up-admin-S3CRET"
KEY = "0123456789abcdef0123456789abcdef-grp"
DB_PASSWORD = "gr0up-db-pa55"
BASE_ENV = {
    "ADMIN_SECRET": ADMIN,
    "ENCRYPTION_KEY": KEY,
    "DATABASE_URL": f"postgresql://app:{DB_PASSWORD}@127.0.0.1:5432/mail",
}


def test_an_invalid_default_fails_where_the_setting_is_declared() -> None:
    with pytest.raises(ValueError, match="positive duration"):

        @attrs.frozen
        class Broken:
            tick: float = setting("X_TICK", "--x-tick", parse_duration, "soon", "a tick")


def test_the_default_a_group_holds_is_its_default_text_parsed() -> None:
    defaults = Settings()
    for option in OPTIONS:
        if option.default is not None:
            assert option.value_in(defaults) == option.parse(option.default), option.env


def test_parsing_nothing_but_the_required_values_gives_the_group_defaults() -> None:
    parsed = parse_settings(BASE_ENV)
    defaults = Settings()
    for name in GROUPS:
        if name not in ("connections", "webhook"):  # they hold the required secrets
            assert getattr(parsed, name) == getattr(defaults, name), name
    assert attrs.evolve(parsed.webhook, admin_secret=Secret("")) == defaults.webhook


def test_variables_and_flags_name_one_setting_each() -> None:
    envs = [o.env for o in OPTIONS]
    flags = [o.flag for o in OPTIONS if o.flag]
    assert len(set(envs)) == len(envs)
    assert len(set(flags)) == len(flags)


def test_every_secret_is_env_only_and_every_secret_typed_field_is_secret() -> None:
    for option in OPTIONS:
        field = attrs.fields_dict(GROUPS[option.group])[option.field]
        holds_secret = "Secret" in str(field.type)
        assert option.secret is holds_secret, option.env
        if option.secret:
            assert option.flag is None, f"{option.env} would be visible in ps"


def test_an_override_by_field_name_lands_in_its_group() -> None:
    s = parse_settings(BASE_ENV, {"tick_interval": "45s", "catchup_rate": "3"})
    assert s.timers == TimerSettings(tick_interval=45.0)
    assert s.limits.catchup_rate == 3.0


def test_a_problem_in_each_of_two_groups_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(
            {**BASE_ENV, "TRIO_IDLE_TICK_INTERVAL": "soon", "TRIO_IDLE_READY_SHARE": "2"}
        )
    names = [line.split(":")[0] for line in info.value.lines()]
    assert names == ["TRIO_IDLE_TICK_INTERVAL", "TRIO_IDLE_READY_SHARE"]


def test_process_secrets_finds_the_secrets_of_every_group() -> None:
    token = "st4tus-T0KEN-0123456789"
    s = parse_settings(
        {
            **BASE_ENV,
            "TRIO_IDLE_SIGNING_SECRET": "s1gning-GRP",
            "TRIO_IDLE_STATUS_TOKEN": token,
            "TRIO_IDLE_PING_URL": "https://hc-ping.test/p1ng-uuid-GRP",
            "BACKEND_URL": "http://svc:b4ckend-pw@127.0.0.1:3016",
            "TRIO_IDLE_GOOGLE_CLIENT_ID": "app.apps.googleusercontent.test",
            "TRIO_IDLE_GOOGLE_CLIENT_SECRET": "g00gle-client-S3CRET",
            "TRIO_IDLE_MICROSOFT_CLIENT_ID": "00000000-app",
            "TRIO_IDLE_MICROSOFT_CLIENT_SECRET": "m1crosoft-client-S3CRET",
            "TRIO_IDLE_LISTEN_URL": "postgresql://listen:l1sten-pw-GRP@127.0.0.1:5432/db",
        }
    )
    found = process_secrets(s)
    for secret in (
        ADMIN,
        KEY,
        DB_PASSWORD,
        "s1gning-GRP",
        token,
        "b4ckend-pw",
        "g00gle-client-S3CRET",
        "m1crosoft-client-S3CRET",
        "l1sten-pw-GRP",
    ):
        assert secret in found
    assert any("p1ng-uuid-GRP" in text for text in found)
