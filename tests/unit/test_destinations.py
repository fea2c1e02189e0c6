"""Refused IMAP destinations: the pure decision, the setting's syntax and its errors."""

from __future__ import annotations

import ipaddress

import pytest

from trio_idle.core.config import ConfigError, Settings, parse_settings
from trio_idle.core.destinations import (
    DEFAULT_NETWORKS,
    parse_address,
    parse_networks,
    refusal_message,
    refused,
)

BASE_ENV = {
    "ADMIN_SECRET": "adm1n-s3cret-VALUE",
    "ENCRYPTION_KEY": "0123456789abcdef0123456789abcdef-key",
    "DATABASE_URL": "postgresql://app:pw@db.internal:5432/mail",
}

RECOMMENDED = parse_networks(
    "169.254.0.0/16,fe80::/10,fd00:ec2::254/128,127.0.0.0/8,10.0.0.0/8,172.16.0.0/12,"
    "192.168.0.0/16,100.64.0.0/10,::1/128,fc00::/7"
)


@pytest.mark.parametrize(
    ("address", "network"),
    [
        ("169.254.169.254", "169.254.0.0/16"),  # cloud metadata (AWS, GCP, Azure, ...)
        ("169.254.0.1", "169.254.0.0/16"),
        ("::ffff:169.254.169.254", "169.254.0.0/16"),  # IPv4-mapped: reaches the IPv4 host
        ("::ffff:a9fe:a9fe", "169.254.0.0/16"),  # the same, spelt in hex
        ("fe80::1", "fe80::/10"),
        ("fe80::1%eth0", "fe80::/10"),  # a scoped link-local address
        ("fd00:ec2::254", "fd00:ec2::254/128"),  # AWS's IPv6 metadata address
    ],
)
def test_the_defaults_refuse_link_local_and_metadata(address: str, network: str) -> None:
    assert refused(address, DEFAULT_NETWORKS) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "::1",
        "10.0.0.1",
        "192.168.1.10",
        "93.184.215.14",
        "2001:db8::1",
        "::ffff:10.0.0.1",
        "fd00:ec2::253",
        "169.253.255.255",
        "169.255.0.0",
    ],
)
def test_the_defaults_allow_everything_else(address: str) -> None:
    assert refused(address, DEFAULT_NETWORKS) is None


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "::ffff:127.0.0.1",
        "10.1.2.3",
        "172.31.255.255",
        "192.168.0.1",
        "100.64.0.1",
        "fc00::1",
        "fdff::1",
        "::ffff:192.168.0.1",
        "169.254.169.254",
    ],
)
def test_the_recommended_list_refuses_loopback_and_private_ranges(address: str) -> None:
    assert refused(address, RECOMMENDED) is not None


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "2001:db8::1", "172.32.0.1", "::ffff:8.8.8.8"]
)
def test_the_recommended_list_allows_public_addresses(address: str) -> None:
    assert refused(address, RECOMMENDED) is None


def test_the_first_matching_network_is_named() -> None:
    networks = parse_networks("127.0.0.2/32,127.0.0.0/8")
    assert refused("127.0.0.2", networks) == ipaddress.ip_network("127.0.0.2/32")
    assert refused("127.0.0.3", networks) == ipaddress.ip_network("127.0.0.0/8")
    assert refused("127.0.0.2", ()) is None


def test_parse_networks_syntax() -> None:
    assert parse_networks("none") == ()
    assert parse_networks(" NONE ") == ()
    assert parse_networks("") == ()
    assert parse_networks(" 10.0.0.0/8 , ::1 ,") == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert parse_networks("127.0.0.2") == (ipaddress.ip_network("127.0.0.2/32"),)


@pytest.mark.parametrize("text", ["10.0.0.0/33", "imap.example.test", "10.1.2.3/8", "10.0.0.0/8;"])
def test_parse_networks_rejects_what_is_not_a_network(text: str) -> None:
    with pytest.raises(ValueError, match="expected comma-separated networks"):
        parse_networks(text)


def test_parse_address_only_takes_ip_literals() -> None:
    assert parse_address("127.0.0.1") == ipaddress.ip_address("127.0.0.1")
    assert parse_address("[::1]") == ipaddress.ip_address("::1")
    assert parse_address("imap.example.test") is None
    assert parse_address("127.0.0.1.example.test") is None


def test_refusal_messages_name_the_setting() -> None:
    assert refusal_message("imap.example.test", ["169.254.169.254"]) == (
        "imap.example.test resolves to 169.254.169.254, which TRIO_IDLE_REFUSE_NETWORKS refuses"
    )
    assert refusal_message("localhost", ["::1", "127.0.0.1"]) == (
        "localhost resolves to ::1, 127.0.0.1, which TRIO_IDLE_REFUSE_NETWORKS refuses"
    )
    assert refusal_message("169.254.169.254", ["169.254.169.254"]) == (
        "169.254.169.254 is an address TRIO_IDLE_REFUSE_NETWORKS refuses"
    )


def test_setting_default_env_and_flag() -> None:
    assert parse_settings(BASE_ENV).imap.refuse_networks == DEFAULT_NETWORKS
    assert Settings().imap.refuse_networks == DEFAULT_NETWORKS
    s = parse_settings({**BASE_ENV, "TRIO_IDLE_REFUSE_NETWORKS": "127.0.0.2/32"})
    assert s.imap.refuse_networks == (ipaddress.ip_network("127.0.0.2/32"),)
    s = parse_settings(BASE_ENV, {"refuse_networks": "none"})
    assert s.imap.refuse_networks == ()
    s = parse_settings(BASE_ENV, {"refuse_networks": ""})  # an explicit empty flag
    assert s.imap.refuse_networks == ()


def test_a_bad_network_is_a_one_line_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings({**BASE_ENV, "TRIO_IDLE_REFUSE_NETWORKS": "169.254.0.0/16,metadata"})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("TRIO_IDLE_REFUSE_NETWORKS: expected comma-separated networks")
    assert "'metadata'" in message


def test_connect_host_share_setting() -> None:
    assert parse_settings(BASE_ENV).limits.connect_host_share == 0.25
    assert Settings().limits.connect_host_share == 0.25
    s = parse_settings({**BASE_ENV, "TRIO_IDLE_CONNECT_HOST_SHARE": "1"})
    assert s.limits.connect_host_share == 1.0
    for bad in ("0", "1.5", "-0.1", "quarter"):
        with pytest.raises(ConfigError) as info:
            parse_settings({**BASE_ENV, "TRIO_IDLE_CONNECT_HOST_SHARE": bad})
        assert str(info.value) == (
            f"TRIO_IDLE_CONNECT_HOST_SHARE: expected a number above 0 and at most 1, got {bad!r}"
        )
    with pytest.raises(ConfigError, match=r"^--connect-host-share: "):
        parse_settings(BASE_ENV, {"connect_host_share": "2"})
