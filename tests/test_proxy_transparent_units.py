"""Transparent proxy mode without a daemon: which clients keep their address, the proxy's
command line, the spec's round trip through a live-restore record, the engine's labels."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from common.ports import PortBinding, PortMapping
from engine.lifecycle.base import EngineConfig, InvalidParameter
from engine.lifecycle.proxymode import (
    check_proxy_mode_labels,
    proxy_mode_for,
    transparent_keys,
)
from proxy.options import UsageError, parse_command_line
from proxy.spec import ProxySpec
from proxy.transparent import Prefix, TransparentSource

V4 = TransparentSource(socket.AF_INET, (Prefix.parse("10.199.0.0/24"),))
V6 = TransparentSource(socket.AF_INET6, (Prefix.parse("fd00:199::/64"),))


@pytest.mark.parametrize(
    ("source", "client", "expected"),
    [
        (V4, ("192.0.2.7", 40000), ("192.0.2.7", 40000)),
        (V4, ("::ffff:192.0.2.7", 40000, 0, 0), ("192.0.2.7", 40000)),  # dual-stack listener
        (V4, ("127.0.0.1", 40000), None),  # loopback: the container cannot answer it
        (V4, ("169.254.1.1", 40000), None),
        (V4, ("10.199.0.3", 40000), None),  # on the container's own subnet: over the bridge
        (V4, ("2001:db8::7", 40000, 0, 0), None),  # IPv6 client, IPv4 container
        (V6, ("2001:db8::7", 40000, 0, 0), ("2001:db8::7", 40000)),
        (V6, ("::1", 40000, 0, 0), None),
        (V6, ("fe80::1%eth0", 40000, 0, 2), None),
        (V6, ("fd00:199::5", 40000, 0, 0), None),
    ],
)
def test_which_clients_keep_their_address(
    source: TransparentSource, client: tuple, expected: tuple[str, int] | None
) -> None:
    assert source.source_for(client) == expected


def test_prefix_masks_host_bits() -> None:
    assert str(Prefix.parse("10.199.0.77/20")) == "10.199.0.0/20"
    assert str(Prefix.parse("fd00:199::1/48")) == "fd00:199::/48"
    with pytest.raises(ValueError):
        Prefix.parse("10.0.0.0/33")


def test_command_line_and_record_keep_the_mode() -> None:
    spec = ProxySpec.of(
        PortMapping("tcp", "0.0.0.0", 48000, "10.199.0.2", 80),
        second=PortMapping("tcp", "::", 48000, "fd00:199::2", 80),
        transparent=True,
        transparent_skip=("10.199.0.0/24", "fd00:199::/64"),
    )
    options = parse_command_line(spec.command_line()).options
    assert options is not None
    assert options.transparent
    assert options.transparent_skip == ("10.199.0.0/24", "fd00:199::/64")
    assert ProxySpec.from_json(spec.to_json()) == spec
    # A record written before the mode existed reads as gateway mode.
    old = {k: v for k, v in spec.to_json().items() if not k.startswith("transparent")}
    assert not ProxySpec.from_json(old).transparent


def test_docker_proxy_command_line_is_unchanged() -> None:
    argv = "-proto tcp -host-ip 0.0.0.0 -host-port 8080 -container-ip 172.17.0.2 -container-port 80"
    options = parse_command_line(argv.split()).options
    assert options is not None and not options.transparent


@pytest.mark.parametrize(
    "argv",
    [
        ["-transparent-skip", "10.0.0.0/8"],  # without -transparent
        ["-transparent", "-transparent-skip", "10.0.0.0/99"],
        ["-transparent", "-transparent-skip", "nonsense"],
    ],
)
def test_bad_transparent_flags_are_usage_errors(argv: list[str]) -> None:
    base = ["-container-ip", "10.0.0.2", "-container-port", "80", "-host-ip", "0.0.0.0"]
    with pytest.raises(UsageError):
        parse_command_line([*base, "-host-port", "8080", *argv])


def test_labels_choose_per_container_and_per_port() -> None:
    labels = {"pyengine.proxy-mode": "transparent", "pyengine.proxy-mode.53/udp": "gateway"}
    assert proxy_mode_for(labels, 80, "tcp", "gateway") == "transparent"
    assert proxy_mode_for(labels, 53, "udp", "gateway") == "gateway"
    assert proxy_mode_for({}, 80, "tcp", "transparent") == "transparent"
    cfg = EngineConfig(data_root=Path("/nonexistent"))
    bindings = [PortBinding(80, "tcp"), PortBinding(53, "udp")]
    assert transparent_keys(labels, bindings, cfg) == frozenset({(80, "tcp")})
    cfg.userland_proxy = False
    assert transparent_keys(labels, bindings, cfg) == frozenset()


@pytest.mark.parametrize(
    ("labels", "proxy"),
    [
        ({"pyengine.proxy-mode": "sideways"}, True),
        ({"pyengine.proxy-mode.80/sctp": "transparent"}, True),
        ({"pyengine.proxy-mode": "transparent"}, False),  # kernel DNAT has no proxy to do it
    ],
)
def test_bad_labels_are_refused(labels: dict[str, str], proxy: bool) -> None:
    with pytest.raises(InvalidParameter):
        check_proxy_mode_labels(labels, proxy)
