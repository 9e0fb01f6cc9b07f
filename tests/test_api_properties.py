"""Generated requests against the real API of a real pyengined: near-valid create, network and
exec bodies and query strings with wrong types, huge and negative numbers, deep nesting, odd
unicode, NULs and empty strings in each field. None may be answered with a 500 (501 names a
Docker feature pyengined lacks; every error is a JSON ``{"message": ...}``), the daemon must
still answer afterwards, and whatever the requests created is removed.

Nothing here starts a container or sends a packet: creates, connects and the queries work on
records; networks get a subnet inside this module's 10.173.0.0/16 or are refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api_helpers import Answer, RawApi, remove_all_and_stop
from tests.conftest import Daemon, assert_nothing_left, start_daemon

pytestmark = pytest.mark.property

BRIDGE, BIP = "pyes3b", "10.173.1.1/24"
NETWORK, NETWORK_SUBNET = "pyes3net", "10.173.2.0/24"

# About 3,000 requests in ~30 s; PYENGINE_PROPERTY_SCALE=10 for a longer search.
SCALE = int(os.environ.get("PYENGINE_PROPERTY_SCALE", "1"))
SETTINGS = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
}

# ---- values ----------------------------------------------------------------------------------

ODD_STRINGS = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "a\x00b",
        "a\n",
        "\n",
        "\r\n",
        "../../etc/passwd",
        "/",
        ".",
        "é",
        "\u202e",
        "\ud800",
        "\U0001f600",
        "9" * 400,
        "-1",
        "0",
        "1e999",
        "NaN",
        "true",
        "null",
        "%s%n",
        "x" * 5000,
    ]
)
TEXT = st.one_of(
    ODD_STRINGS,
    st.text(st.characters(exclude_categories=()), max_size=12),
    st.text("abcxyz019_.-/:=@ ", max_size=12),
)
HUGE_INTS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([-1, 0, 1, 2**31, 2**63 - 1, 2**63, -(2**63) - 1, 10**30, 65535, 65536]),
)
NUMBERS = st.one_of(HUGE_INTS, st.floats(allow_nan=False, allow_infinity=False))
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)),
    max_leaves=8,
)


def nested(depth: int) -> Any:
    value: Any = []
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


DEEP = st.integers(20, 80).map(nested)


def field(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A field's near-valid values, one time in four a value of any type; ``mutated`` also
    puts junk anywhere in a body."""
    return st.one_of(valid, valid, valid, JUNK)


def _slots(value: Any) -> Iterator[tuple[Any, Any]]:
    """Every (container, key) of a JSON value: the places one value can be swapped."""
    stack = [value]
    while stack:
        item = stack.pop()
        keys = list(item) if isinstance(item, dict) else range(len(item))
        for key in keys:
            yield item, key
            if isinstance(item[key], dict | list):
                stack.append(item[key])


def _mutate(args: tuple[Any, list[tuple[int, Any]]]) -> Any:
    body, mutations = args
    for pick, junk in mutations:
        slots = list(_slots(body)) if isinstance(body, dict | list) else []
        if not slots:
            break
        parent, key = slots[pick % len(slots)]
        parent[key] = junk
    return body


def mutated(bodies: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Near-valid bodies, about half of them with one to three values anywhere replaced by
    junk (wrong types, huge numbers, deep nesting, odd strings)."""
    swaps = st.lists(st.tuples(st.integers(0, 1 << 16), st.one_of(JUNK, JUNK, DEEP)), max_size=3)
    return st.tuples(bodies, st.one_of(st.just([]), swaps)).map(_mutate)


def strings(valid: st.SearchStrategy[str] = TEXT) -> st.SearchStrategy[Any]:
    return field(st.lists(st.one_of(valid, TEXT), max_size=4))


PORT_KEYS = st.one_of(
    st.sampled_from(["80/tcp", "80", "53/udp", "0", "65536/tcp", "80/sctp", "-1", "80/TCP"]),
    TEXT,
)
HOST_IPS = st.one_of(
    st.sampled_from(["", "0.0.0.0", "127.0.0.1", "::", "::1", "[::1]", "10.173.1.1", "300.1.1.1"]),
    TEXT,
)
HOST_PORTS = st.one_of(
    st.sampled_from(["", "0", "8080", "-1", "70000", "1-2", "2-1", "8000-8010", "1" * 30]),
    TEXT,
    HUGE_INTS,
)
PORT_BINDINGS = field(
    st.dictionaries(
        PORT_KEYS,
        field(
            st.lists(
                field(
                    st.fixed_dictionaries({}, optional={"HostIp": HOST_IPS, "HostPort": HOST_PORTS})
                ),
                max_size=3,
            )
        ),
        max_size=3,
    )
)
SIZES = st.one_of(st.sampled_from(["10m", "1k", "0", "-1", "1.5g", "9" * 400, "1x", "١٠m"]), TEXT)
LOG_CONFIG = field(
    st.fixed_dictionaries(
        {},
        optional={
            "Type": field(st.sampled_from(["json-file", "", "syslog", "none"])),
            "Config": field(
                st.dictionaries(st.sampled_from(["max-size", "max-file", "compress"]), SIZES)
            ),
        },
    )
)
SECURITY_OPTS = st.sampled_from(
    [
        "seccomp=unconfined",
        "seccomp=builtin",
        "seccomp={}",
        'seccomp={"defaultAction": "SCMP_ACT_ALLOW"}',
        'seccomp={"defaultAction": 1}',
        "seccomp=/etc/passwd",
        "no-new-privileges",
        "no-new-privileges=false",
        "no-new-privileges=maybe",
        "label=disable",
        "apparmor=unconfined",
        "seccomp",
    ]
)
# Settings pyengined refuses with 501 before it looks further: in few bodies, so that most
# reach the checks behind them.
UNSUPPORTED_HOST_CONFIG = st.fixed_dictionaries(
    {},
    optional={
        "Privileged": st.booleans(),
        "CapAdd": strings(),
        "Memory": HUGE_INTS,
        "Init": st.booleans(),
    },
)
UNSUPPORTED_CONFIG = st.fixed_dictionaries(
    {}, optional={"Tty": st.booleans(), "OpenStdin": st.booleans(), "MacAddress": TEXT}
)


NESTED = {"HostConfig", "NetworkingConfig", "LogConfig", "PortBindings", "Labels", "ExposedPorts"}


def sparse(
    fields: dict[str, st.SearchStrategy[Any]],
    required: dict[str, st.SearchStrategy[Any]] | None = None,
    most: int = 3,
) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with up to ``most`` of ``fields``: few enough that a body refused early for one
    field does not hide what the others would do."""
    # The nested objects, where most of the parsing is, come up more often.
    keys = sorted(fields) + [k for k in sorted(fields) if k in NESTED] * 4
    chosen = st.lists(st.sampled_from(keys), max_size=most, unique=True)
    return chosen.flatmap(
        lambda keys: st.fixed_dictionaries({**(required or {}), **{k: fields[k] for k in keys}})
    )


def rarely(
    base: st.SearchStrategy[dict[str, Any]], extra: st.SearchStrategy[dict[str, Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """``base``, with ``extra`` merged into about one body in eight."""

    def merge(args: tuple[dict[str, Any], int, dict[str, Any]]) -> dict[str, Any]:
        body, dice, more = args
        return {**body, **more} if dice == 0 else body

    return st.tuples(base, st.integers(0, 7), extra).map(merge)


HOST_CONFIG = sparse(
    {
        "PortBindings": PORT_BINDINGS,
        "PublishAllPorts": field(st.booleans()),
        "AutoRemove": field(st.booleans()),
        "NetworkMode": field(
            st.sampled_from(["", "bridge", "default", "host", "none", "container:x", NETWORK])
        ),
        "LogConfig": LOG_CONFIG,
        "RestartPolicy": field(
            st.fixed_dictionaries(
                {},
                optional={
                    "Name": field(st.sampled_from(["no", "", "always", "on-failure"])),
                    "MaximumRetryCount": HUGE_INTS,
                },
            )
        ),
        "SecurityOpt": strings(SECURITY_OPTS),
        "PidsLimit": field(st.one_of(st.sampled_from([0, -1, None]), HUGE_INTS)),
        "ConsoleSize": field(st.lists(HUGE_INTS, max_size=3)),
        "Runtime": field(st.sampled_from(["", "runc", "kata"])),
        "IpcMode": field(st.sampled_from(["", "private", "host", "shareable"])),
    }
)
HOST_CONFIG = rarely(HOST_CONFIG, UNSUPPORTED_HOST_CONFIG)
ENDPOINT = st.fixed_dictionaries(
    {},
    optional={
        "Aliases": strings(st.sampled_from(["web", "a.b", "-x", "web\n"])),
        "IPAMConfig": field(
            st.fixed_dictionaries(
                {},
                optional={
                    "IPv4Address": field(st.sampled_from(["10.173.2.9", "10.173.1.9", "1.2.3"])),
                    "IPv6Address": field(st.sampled_from(["fd00::9", "::1", "x"])),
                    "LinkLocalIPs": strings(),
                },
            )
        ),
        "Links": strings(),
        "MacAddress": field(st.sampled_from(["", "02:42:ac:11:00:02", "zz"])),
        "DriverOpts": field(st.dictionaries(TEXT, TEXT, max_size=2)),
    },
)
NETWORK_NAMES = st.one_of(st.sampled_from(["bridge", NETWORK, "host", "none", "nosuch"]), TEXT)
LABELS = field(
    st.dictionaries(
        st.one_of(st.sampled_from(["pyengine.proxy-protocol", "a"]), TEXT),
        st.one_of(st.sampled_from(["v1", "v2", "off", "80/tcp=v1"]), TEXT),
        max_size=3,
    )
)
CREATE_BODY = sparse(
    {
        "Cmd": field(st.one_of(st.lists(TEXT, max_size=3), TEXT)),
        "Entrypoint": field(st.one_of(st.lists(TEXT, max_size=3), TEXT)),
        "Env": strings(st.sampled_from(["A=1", "A", "=1", "PATH=", "A=\x00"])),
        "Labels": LABELS,
        "ExposedPorts": field(st.dictionaries(PORT_KEYS, st.just({}), max_size=3)),
        "StopTimeout": field(HUGE_INTS),
        "StopSignal": field(st.sampled_from(["SIGTERM", "9", "KILL", "SIGNOPE", "0", "99"])),
        "User": field(st.sampled_from(["", "root", "0:0", "nobody", "x:y:z", "65536"])),
        "WorkingDir": field(st.sampled_from(["", "/", "/tmp", "relative", "/../.."])),
        "Hostname": field(st.sampled_from(["", "h", "a" * 300, "-h", "h\n"])),
        "Domainname": field(TEXT),
        "Healthcheck": field(st.fixed_dictionaries({}, optional={"Test": strings()})),
        "HostConfig": field(HOST_CONFIG),
        "NetworkingConfig": field(
            st.fixed_dictionaries(
                {},
                optional={
                    "EndpointsConfig": field(
                        st.dictionaries(NETWORK_NAMES, field(ENDPOINT), max_size=2)
                    )
                },
            )
        ),
    },
    required={
        "Image": st.sampled_from(["busybox", "busybox", "busybox:latest", "nosuch", "", "b\n"])
    },
)
CREATE_BODY = rarely(CREATE_BODY, UNSUPPORTED_CONFIG)


def subnets() -> st.SearchStrategy[str]:
    valid = st.integers(10, 250).map(lambda n: f"10.173.{n}.0/24")
    return st.one_of(
        valid,
        valid,
        st.sampled_from(["10.173.300.0/24", "10.173.5.7/24", "10.173.0.0/33", "x", ""]),
    )


def network_body() -> st.SearchStrategy[dict[str, Any]]:
    """Always with a subnet of this module's range or one that is refused: never a network
    from the daemon's pool, which could overlap another test's."""
    ipam_config = st.fixed_dictionaries(
        {"Subnet": subnets()},
        optional={
            "Gateway": field(st.sampled_from(["10.173.20.1", "10.173.20.0", "1.1.1.1", "::1"])),
            "IPRange": field(st.sampled_from(["10.173.20.128/25", "10.173.0.0/16", "x/1"])),
            "AuxiliaryAddresses": field(st.dictionaries(TEXT, TEXT, max_size=2)),
        },
    )
    options = st.dictionaries(
        st.sampled_from(
            [
                "com.docker.network.bridge.name",
                "com.docker.network.bridge.enable_icc",
                "com.docker.network.bridge.enable_ip_masquerade",
                "com.docker.network.driver.mtu",
                "com.docker.network.bridge.host_binding_ipv4",
                "x",
            ]
        ),
        st.one_of(st.sampled_from(["true", "false", "1500", "0", "-1", "9" * 40]), TEXT),
        max_size=3,
    ).map(
        # A bridge name always carries this module's prefix (or is refused).
        lambda o: {k: ("pyes3x" + v[:6] if k.endswith("bridge.name") else v) for k, v in o.items()}
    )
    return st.fixed_dictionaries(
        {
            "Name": st.one_of(
                st.text("abcxyz019_.-", max_size=8).map(lambda s: "pyes3p" + s),
                st.sampled_from(["", "bridge", "host", "pyes3p\n", "pyes3p\x00"]),
            ),
            "IPAM": st.fixed_dictionaries(
                {"Config": st.lists(ipam_config, min_size=1, max_size=2)},
                optional={
                    "Driver": field(st.sampled_from(["default", "", "dhcp"])),
                    "Options": field(st.dictionaries(TEXT, TEXT, max_size=2)),
                },
            ),
        },
        optional={
            "Driver": field(st.sampled_from(["bridge", "", "overlay", "macvlan"])),
            "Internal": field(st.booleans()),
            "Attachable": field(st.booleans()),
            "CheckDuplicate": field(st.booleans()),
            "Scope": field(st.sampled_from(["local", "", "swarm"])),
            "Options": field(options),
            "Labels": field(st.dictionaries(TEXT, TEXT, max_size=2)),
            "EnableIPv6": st.one_of(st.just(False), st.none(), SCALARS),
            "ConfigFrom": field(st.fixed_dictionaries({}, optional={"Network": TEXT})),
        },
    ).map(_ipv6_only_with_our_subnet)


def _ipv6_only_with_our_subnet(body: dict[str, Any]) -> dict[str, Any]:
    if body.get("EnableIPv6") is True:
        body["IPAM"]["Config"].append({"Subnet": "fd00:173::/64"})
    return body


# ---- the daemon ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, busybox_archive: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path_factory.mktemp(BRIDGE), BRIDGE, BIP, True)
    try:
        d.cli("load", "-i", str(busybox_archive), check=True)
        d.cli("network", "create", "--subnet", NETWORK_SUBNET, NETWORK, check=True)
        yield d
    finally:
        remove_all_and_stop(d)
    assert_nothing_left(d)


@pytest.fixture(scope="module")
def api(daemon: Daemon) -> Iterator[RawApi]:
    api = RawApi(daemon.host, timeout=20)
    yield api
    assert api.ping(), f"the daemon stopped answering:\n{daemon.log()[-3000:]}"
    assert "internal error" not in daemon.log(), daemon.log()[-5000:]


@pytest.fixture(scope="module")
def container(api: RawApi) -> str:
    """A created (never started) container for the per-container calls."""
    answer = api.request("POST", "/containers/create", "name=pyes3-target", {"Image": "busybox"})
    assert answer.status == 201, answer.body
    return answer.json()["Id"]


STATUSES: Counter[tuple[str, int]] = Counter()


def assert_no_server_error(answer: Answer, what: Any) -> None:
    """A 4xx, or 501 for a Docker feature pyengined lacks (named in the message), never a 500."""
    STATUSES[(_caller(), answer.status)] += 1
    assert answer.status < 500 or answer.status == 501, (answer.status, answer.body[:500], what)
    if answer.status == 400 and answer.body.startswith(b"Got more than 8190 bytes"):
        return  # aiohttp's own refusal of a request line past 8 KiB, before any handler
    if answer.status >= 400:
        message = json.loads(answer.body)["message"]
        assert isinstance(message, str) and message, answer.body


# ---- the properties ---------------------------------------------------------------------------


@settings(max_examples=1200 * SCALE, **SETTINGS)
@given(body=mutated(CREATE_BODY), name=st.one_of(st.none(), TEXT))
def test_container_create(api: RawApi, body: dict[str, Any], name: str | None) -> None:
    query = {"name": name} if name is not None else None
    answer = api.request("POST", "/containers/create", query, body)
    assert_no_server_error(answer, (name, body))
    if answer.status == 201:
        removed = api.request("DELETE", f"/containers/{answer.json()['Id']}", {"force": "1"})
        assert removed.status == 204, removed.body


@settings(max_examples=400 * SCALE, **SETTINGS)
@given(body=mutated(network_body()))
def test_network_create(api: RawApi, body: dict[str, Any]) -> None:
    answer = api.request("POST", "/networks/create", body=body)
    assert_no_server_error(answer, body)
    if answer.status == 201:
        removed = api.request("DELETE", f"/networks/{answer.json()['Id']}")
        assert removed.status == 204, removed.body


@settings(max_examples=300 * SCALE, **SETTINGS)
@given(
    action=st.sampled_from(["connect", "disconnect"]),
    network=NETWORK_NAMES,
    body=mutated(
        st.fixed_dictionaries(
            {},
            optional={
                "Container": st.sampled_from(["pyes3-target", "nosuch", ""]),
                "EndpointConfig": ENDPOINT,
                "Force": st.booleans(),
            },
        )
    ),
)
def test_network_connect_disconnect(
    api: RawApi, container: str, action: str, network: str, body: dict[str, Any]
) -> None:
    answer = api.request("POST", f"/networks/{_path(network)}/{action}", body=body)
    assert_no_server_error(answer, (action, network, body))
    if action == "connect" and answer.status == 200:
        # Leave the target as it was: on no network but its first.
        api.request("POST", f"/networks/{_path(network)}/disconnect", body={"Container": container})


@settings(max_examples=100 * SCALE, **SETTINGS)
@given(body=st.one_of(JUNK, DEEP, st.fixed_dictionaries({}, optional={"Cmd": strings()})))
def test_exec_create(api: RawApi, container: str, body: Any) -> None:
    answer = api.request("POST", f"/containers/{container}/exec", body=body)
    assert_no_server_error(answer, body)


FILTERS = st.one_of(
    TEXT,
    JUNK.map(json.dumps),
    DEEP.map(json.dumps),
    st.dictionaries(
        st.sampled_from(["name", "id", "status", "label", "exited", "before", "publish", "x"]),
        st.one_of(st.lists(SCALARS, max_size=2), st.dictionaries(TEXT, SCALARS, max_size=2)),
        max_size=2,
    ).map(json.dumps),
)
QUERIES = st.one_of(
    st.tuples(
        st.just("GET"),
        st.just("/containers/json"),
        st.fixed_dictionaries(
            {}, optional={"filters": FILTERS, "limit": TEXT, "all": TEXT, "size": TEXT}
        ),
    ),
    st.tuples(st.just("GET"), st.just("/networks"), st.fixed_dictionaries({"filters": FILTERS})),
    st.tuples(st.just("GET"), st.just("/images/json"), st.fixed_dictionaries({"filters": FILTERS})),
    st.tuples(
        st.just("GET"),
        st.just("/containers/{}/logs"),
        st.fixed_dictionaries(
            {"stdout": st.just("1")},
            optional={"tail": TEXT, "since": TEXT, "until": TEXT, "timestamps": TEXT},
        ),
    ),
    st.tuples(
        st.just("POST"), st.just("/containers/{}/kill"), st.fixed_dictionaries({"signal": TEXT})
    ),
    st.tuples(st.just("POST"), st.just("/containers/{}/stop"), st.fixed_dictionaries({"t": TEXT})),
    st.tuples(
        st.just("POST"), st.just("/containers/{}/rename"), st.fixed_dictionaries({"name": TEXT})
    ),
    st.tuples(
        st.just("POST"),
        st.just("/containers/{}/wait"),
        st.fixed_dictionaries(
            {"condition": TEXT.filter(lambda c: c not in ("next-exit", "removed"))}
        ),
    ),
    st.tuples(
        st.just("GET"), st.just("/containers/{}/json"), st.fixed_dictionaries({"size": TEXT})
    ),
    st.tuples(st.just("GET"), TEXT.map(lambda r: f"/containers/{_path(r)}/json"), st.just({})),
    st.tuples(st.just("GET"), TEXT.map(lambda r: f"/networks/{_path(r)}"), st.just({})),
    st.tuples(st.just("GET"), TEXT.map(lambda r: f"/images/{_path(r)}/json"), st.just({})),
    st.tuples(
        st.just("POST"), TEXT.map(lambda r: f"/images/busybox/tag?repo={_path(r)}"), st.just({})
    ),
    st.tuples(
        st.just("POST"),
        TEXT.map(lambda t: f"/images/busybox/tag?repo=pyes3img&tag={_path(t)}"),
        st.just({}),
    ),
    st.tuples(st.just("GET"), st.just("/images/json"), st.fixed_dictionaries({"filter": TEXT})),
)


def _path(text: str) -> str:
    return quote(text, safe="", errors="surrogatepass") or "x"


@settings(max_examples=1000 * SCALE, **SETTINGS)
@given(query=QUERIES)
def test_queries(api: RawApi, container: str, query: tuple[str, str, dict[str, str]]) -> None:
    method, path, params = query
    path = path.replace("{}", container)
    answer = api.request(method, path, params)
    assert_no_server_error(answer, query)
    if path.endswith("/rename") and answer.status == 204:
        back = api.request("POST", f"/containers/{container}/rename", {"name": "pyes3-target"})
        assert back.status == 204, back.body
    if "/tag?" in path and answer.status == 201:
        ref = path.split("repo=", 1)[1].replace("&tag=", "%3A")
        removed = api.request("DELETE", f"/images/{ref}")
        assert removed.status == 200, (ref, removed.body)


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


CONFIG_NAME = "0" * 64 + ".json"
IMAGE_CONFIG = {
    "architecture": "amd64",
    "os": "linux",
    "config": {"Cmd": ["true"], "Env": ["PATH=/bin"], "Labels": {"a": "b"}},
    "rootfs": {"type": "layers", "diff_ids": []},
}
DOCKER_MANIFEST = [{"Config": CONFIG_NAME, "RepoTags": ["pyes3img:gen"], "Layers": []}]


def _docker_archive(args: tuple[Any, Any]) -> bytes:
    """The config is named by its digest, as the loader checks; the manifest points to it."""
    manifest, config = args
    config_bytes = json.dumps(config).encode()
    name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest_text = json.dumps(manifest).replace(CONFIG_NAME, name)
    return _tar({"manifest.json": manifest_text.encode(), name: config_bytes})


ARCHIVES = st.one_of(
    st.binary(max_size=2048),
    st.binary(min_size=512, max_size=512).map(lambda b: b + bytes(1024)),
    st.sampled_from([b"", bytes(1024), b"ustar" * 200]),
    # A docker-archive whose manifest and image config are near-valid, with junk anywhere.
    st.tuples(mutated(st.just(DOCKER_MANIFEST)), mutated(st.just(IMAGE_CONFIG))).map(
        _docker_archive
    ),
    st.tuples(mutated(st.just(DOCKER_MANIFEST)), mutated(st.just(IMAGE_CONFIG))).map(
        _docker_archive
    ),
)


@settings(max_examples=150 * SCALE, **SETTINGS)
@given(archive=ARCHIVES)
def test_image_load(api: RawApi, archive: bytes) -> None:
    """Not an image archive, or one with junk in its manifest or config: a 4xx (or, once the
    stream has begun, an error object in it), never a 500. What loads is removed again."""
    answer = api.request("POST", "/images/load", body=archive)
    assert_no_server_error(answer, archive[:2048])
    if answer.status == 200:
        for line in answer.body.splitlines():
            loaded = json.loads(line).get("stream", "")
            ref = loaded.removeprefix("Loaded image: ").removeprefix("Loaded image ID: ").strip()
            if ref:
                api.request("DELETE", f"/images/{_path(ref)}", {"force": "1"})


def _caller() -> str:
    return sys._getframe(2).f_code.co_name.removeprefix("test_")


def test_the_daemon_still_serves(api: RawApi, daemon: Daemon, container: str) -> None:
    """After all of the above: it answers, lists what it had, and created nothing else."""
    print(f"\n{sum(STATUSES.values())} generated requests:", dict(sorted(STATUSES.items())))
    assert api.ping()
    names = [c["Names"][0] for c in api.request("GET", "/containers/json", {"all": "1"}).json()]
    assert names == ["/pyes3-target"]
    nets = sorted(n["Name"] for n in api.request("GET", "/networks").json())
    assert nets == sorted(["bridge", "host", "none", NETWORK])
    images = api.request("GET", "/images/json").json()
    assert [t for i in images for t in i["RepoTags"]] == ["busybox:latest"]
