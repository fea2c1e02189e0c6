"""Which IMAP destinations the daemon refuses to connect to (``TRIO_IDLE_REFUSE_NETWORKS``).

End users type their own IMAP host, so a row can point the daemon at anything its network
reaches: the cloud metadata service (169.254.169.254), a database on localhost, an admin
panel on the LAN. The decision is made on the resolved address that is actually connected
to (see :func:`trio_idle.imap.connect.connect`), never on the name, so a name that resolves
to an allowed address for a check and to a refused one for the connect (DNS rebinding) gets
nowhere. Everything here is pure.
"""

from __future__ import annotations

import ipaddress
from typing import Final, TypeAlias

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Link-local (which holds the metadata services of most clouds at 169.254.169.254) and
#: AWS's IPv6 metadata address.
DEFAULT_REFUSE_NETWORKS: Final = "169.254.0.0/16,fe80::/10,fd00:ec2::254/128"

#: The setting's variable, named in every refusal so an operator knows what to change.
SETTING: Final = "TRIO_IDLE_REFUSE_NETWORKS"


def parse_networks(text: str) -> tuple[Network, ...]:
    """``"169.254.0.0/16, fe80::/10"`` → networks; ``""`` or ``"none"`` → refuse nothing.

    A bare address is one host (``/32``, ``/128``). Host bits set below the prefix
    (``10.1.2.3/8``) are an error rather than silently widened: the operator meant something.
    Raises ``ValueError`` naming the offending entry.
    """
    value = text.strip()
    if value.lower() in ("", "none"):
        return ()
    networks: list[Network] = []
    for part in value.split(","):
        entry = part.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError as exc:
            raise ValueError(
                f"expected comma-separated networks like 169.254.0.0/16,fe80::/10 "
                f"(or none), got {entry!r}: {exc}"
            ) from None
    return tuple(networks)


#: :data:`DEFAULT_REFUSE_NETWORKS`, parsed
DEFAULT_NETWORKS: Final = parse_networks(DEFAULT_REFUSE_NETWORKS)


def parse_address(text: str) -> Address | None:
    """An IP literal (``"127.0.0.1"``, ``"::1"``, ``"fe80::1%eth0"``, ``"[::1]"``), else None."""
    literal = text.strip()
    if literal.startswith("[") and literal.endswith("]"):
        literal = literal[1:-1]
    try:
        return ipaddress.ip_address(literal)
    except ValueError:
        return None


def refused(address: Address | str, networks: tuple[Network, ...]) -> Network | None:
    """The first of ``networks`` that holds ``address``, or None if it may be connected to.

    An IPv4-mapped IPv6 address (``::ffff:169.254.169.254``) reaches the IPv4 host, so it
    is checked as that IPv4 address too; a scope (``fe80::1%eth0``) does not matter.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    candidates: list[Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            candidates = [ipaddress.IPv6Address(ip.packed)]
        if ip.ipv4_mapped is not None:
            candidates.append(ip.ipv4_mapped)
    for network in networks:
        for candidate in candidates:
            if candidate.version == network.version and candidate in network:
                return network
    return None


def refusal_message(host: str, addresses: list[str]) -> str:
    """The one line a row gets when every address of its host is refused."""
    if parse_address(host) is not None:
        return f"{host} is an address {SETTING} refuses"
    return f"{host} resolves to {', '.join(addresses)}, which {SETTING} refuses"
