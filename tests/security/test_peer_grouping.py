"""What counts as one peer (review 2, M5): an IPv4 address, or the IPv6 network of the first
``ipv6_peer_prefix`` bits - one top-level setting for the DICOM port's per-peer limits
(tests/security/test_dimse_limits.py, with real IPv6 addresses) and the login counts
(here: LoginGuard with an injected clock)."""

from __future__ import annotations

import pytest

from radguard.gateway.config import ConfigError, load_config
from radguard.gateway.httpguard import LockReason, LoginGuard
from radguard.gateway.ratelimit import peer_key


def test_peer_key_groups_ipv6_by_the_prefix_it_is_given():
    address = "2001:db8:7:42::15"
    assert peer_key(address) == "2001:db8:7:42::/64"  # the default: a host's /64
    assert peer_key(address, 128) == address
    assert peer_key(address, 48) == "2001:db8:7::/48"
    assert peer_key("fe80::1%eth0", 128) == "fe80::1"
    for prefix in (48, 64, 128):  # IPv4, mapped or not, is always the address itself
        assert peer_key("10.1.2.3", prefix) == peer_key("::ffff:10.1.2.3", prefix) == "10.1.2.3"
    assert peer_key("not an address", 128) == "not an address"


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_login_counts_per_address_when_a_64_is_a_vlan():
    """With the default /64, 20 typos anywhere on an IPv6 VLAN made every workstation on it
    wait; with ``ipv6_prefix`` 128 each address has its own count, and the grouping still
    applies where configured."""
    vlan = [f"2001:db8:7:42::{n:x}" for n in range(1, 21)]
    for prefix, neighbour_waits in ((64, True), (128, False)):
        guard = LoginGuard(5, 20, 60.0, 900.0, clock=_Clock(), ipv6_prefix=prefix)
        for n, client in enumerate(vlan):  # one typo each from twenty workstations
            guard.failed(f"user{n}", client)
        wait, reason = guard.wait("radiologist", "2001:db8:7:42::99")
        assert (wait > 0) is neighbour_waits, prefix
        assert (reason is LockReason.CLIENT) is neighbour_waits


def test_the_prefix_is_one_validated_top_level_setting(tmp_path):
    path = tmp_path / "radguard.toml"
    path.write_text("ipv6_peer_prefix = 128\n")
    assert load_config(path).ipv6_peer_prefix == 128
    assert load_config().ipv6_peer_prefix == 64
    for bad in ("20", "129", "'64'", "true", "64.5"):
        path.write_text(f"ipv6_peer_prefix = {bad}\n")
        with pytest.raises(ConfigError, match="ipv6_peer_prefix .*: a whole number from 32 to 128"):
            load_config(path)
    path.write_text("[dicom]\nipv6_peer_prefix = 128\n")  # top level, not [dicom]
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config(path)
