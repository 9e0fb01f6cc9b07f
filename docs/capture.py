"""Regenerate every captured listing in docs/*.md from the running project.

    sudo .venv/bin/python docs/capture.py                  # every doc with captures
    sudo .venv/bin/python docs/capture.py docs/lab.md      # only these

A listing sits between ``<!-- capture: NAME -->`` and ``<!-- /capture -->``; all of it is
replaced by what the recipe NAME below produces now. Recipes run commands against the
namespace lab (lab/) brought up with its defaults, so the docs show the names a reader
gets: lab directory /var/lib/pyengine-lab, bridges pyelab-proxy and pyelab-dnat, ports 8081 and
8082. The lab is brought up with the nftables backend, the nftables recipes run, it is brought
down, then the same with the iptables backend. A lab already up in that directory is refused
(``python -m lab down`` first). Nothing but the marked blocks changes in a doc.

Everything shown is real output of this machine at capture time: addresses, ids, counters
and timings differ from run to run, and the prose around the listings says only what holds
for every run.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import click

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path[:0] = [str(REPO), str(DOCS)]

import capture_tables  # noqa: E402
from capture_check import MARKER, drift  # noqa: E402

from lab.exercises import EXERCISES  # noqa: E402
from lab.lifecycle import down, status_text, up  # noqa: E402
from lab.plan import DEFAULT_DIR, LabDaemon, LabOptions, LabState  # noqa: E402
from lab.runner import (  # noqa: E402
    StepResult,
    render_section,
    render_step,
    run_exercise,
    run_shell,
)

BACKENDS = ("nftables", "iptables")
HELD_PORT = 8083  # a port this script holds itself, to show what a conflict looks like


@dataclass
class Capture:
    """The lab the recipes run against, and what was captured while bringing it up/down."""

    lab: LabState
    up_output: str = ""
    exercises: dict[str, str] = field(default_factory=dict)

    def daemon(self, role: str) -> LabDaemon:
        return self.lab.daemon(role)

    def pyengine(self, role: str) -> str:
        return f"pyengine -H {self.daemon(role).host}"

    def web(self, role: str) -> dict[str, str]:
        """The web container of ``role``: id, address, namespace and host veth (the names
        netd derives from the id, netd/naming.py)."""
        inspect = json.loads(must(f"{self.pyengine(role)} inspect web").output)[0]
        cid = inspect["Id"]
        return {
            "id": cid,
            "ip": inspect["NetworkSettings"]["IPAddress"],
            "netns": f"pyengine-{cid[:12]}",
            "veth": f"pye{cid[:10]}",
        }


Recipe = Callable[[Capture], str]
RECIPES: dict[str, tuple[str, Recipe]] = {}  # name -> (backend it needs, recipe)


def recipe(name: str, backend: str = "nftables") -> Callable[[Recipe], Recipe]:
    def register(fn: Recipe) -> Recipe:
        RECIPES[name] = (backend, fn)
        return fn

    return register


def text_block(body: str) -> str:
    return "```text\n" + body.rstrip("\n") + "\n```\n"


def shell(*scripts: str, status: bool = False, errors: bool = False) -> str:
    """Each script run as in a terminal, shown as ``$ command`` and its output; with
    ``status``, followed by ``echo $?`` and the exit status. A script that fails stops the
    capture, unless failing is what the listing shows (``errors``, ``status``)."""
    parts = []
    for script in scripts:
        done = run_shell(script)
        if done.returncode != 0 and not (errors or status):
            raise click.ClickException(f"{script}: exit {done.returncode}: {done.output.strip()}")
        text = render_step(done)
        if status:
            text += f"$ echo $?\n{done.returncode}\n"
        parts.append(text)
    return text_block("\n".join(parts))


def must(script: str) -> StepResult:
    done = run_shell(script)
    if done.returncode != 0:
        raise click.ClickException(f"{script}: exit {done.returncode}: {done.output.strip()}")
    return done


# -- docs/lab.md ------------------------------------------------------------------------------


@recipe("lab-up")
def lab_up(cap: Capture) -> str:
    return text_block("$ python -m lab up\n" + cap.up_output)


def _exercise_recipe(name: str) -> Recipe:
    def render(cap: Capture) -> str:
        return text_block(f"$ python -m lab exercise {name}\n" + cap.exercises[name])

    render.exercise = name  # type: ignore[attr-defined]
    return render


for _name in EXERCISES:
    recipe(f"lab-exercise-{_name}")(_exercise_recipe(_name))
recipe("lab-exercise-counters-iptables", "iptables")(_exercise_recipe("counters"))


# -- docs/networking.md -----------------------------------------------------------------------


@recipe("net-host-side")
def net_host_side(cap: Capture) -> str:
    p, d = cap.daemon("proxy"), cap.daemon("dnat")
    pw, dw = cap.web("proxy"), cap.web("dnat")
    return shell(
        f"ip -br addr show dev {p.bridge}; ip -br addr show dev {d.bridge}",
        f"ip route show dev {p.bridge}",
        f"bridge -d link show dev {pw['veth']} | head -n 2",
        f"bridge -d link show dev {dw['veth']} | head -n 2",
        "sysctl net.ipv4.ip_forward "
        f"net.ipv4.conf.{p.bridge}.route_localnet net.ipv4.conf.{d.bridge}.route_localnet",
    )


@recipe("net-container-side")
def net_container_side(cap: Capture) -> str:
    w = cap.web("dnat")
    return shell(
        f"ip -n {w['netns']} -br link",
        f"ip -n {w['netns']} -br addr",
        f"ip -n {w['netns']} route",
    )


@recipe("net-nft-dnat")
def net_nft_dnat(cap: Capture) -> str:
    return shell(f"nft list table inet {cap.daemon('dnat').table}")


@recipe("net-nft-diff")
def net_nft_diff(cap: Capture) -> str:
    p, d = cap.daemon("proxy"), cap.daemon("dnat")

    def normalised(x: LabDaemon) -> str:
        # nft -s: stateless, without the counters the exercises changed
        subnet = x.subnet.rsplit(".", 2)[0].replace(".", "\\.")
        return (
            f"<(nft -s list table inet {x.table} | sed 's/{x.table}/TABLE/; "
            f"s/{x.bridge}/BRIDGE/g; s/{subnet}\\.[0-9]*\\./SUBNET./g; s/ {x.port} / PORT /')"
        )

    return shell(f"diff {normalised(d)} {normalised(p)}", errors=True)  # diff exits 1


@recipe("net-iptables-dnat", "iptables")
def net_iptables_dnat(cap: Capture) -> str:
    d = cap.daemon("dnat")
    return shell(f"python -m netd status --data-root {d.data_root} | sed -n '/^Firewall/,$p'")


@recipe("net-iptables-proxy", "iptables")
def net_iptables_proxy(cap: Capture) -> str:
    p = cap.daemon("proxy")
    prefix = p.table.upper()
    return shell(f"iptables-save | grep -E '^\\*|{prefix}' | grep -v '^:'")


@recipe("net-proxy-socket")
def net_proxy_socket(cap: Capture) -> str:
    p = cap.daemon("proxy")
    return shell(f"ss -tlnp '( sport = :{p.port} )'")


# -- docs/architecture.md ---------------------------------------------------------------------


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return sorted(found)


@recipe("arch-processes")
def arch_processes(cap: Capture) -> str:
    p = cap.daemon("proxy")
    pids = ",".join(str(pid) for pid in _descendants(p.pid))
    return shell(
        # paths relative to the checkout (the working directory), wherever it was cloned
        f'ps -o pid,ppid,sid,args --forest -p {pids} | sed "s|$PWD/||g" | cut -c1-120',
        f"ps -o pid,comm -p {pids}",
    )


@recipe("arch-socket")
def arch_socket(cap: Capture) -> str:
    p = cap.daemon("proxy")
    return shell(
        f"ls -l {p.socket_path}",
        f"curl -sS --unix-socket {p.socket_path} http://localhost/v1.41/version; echo",
    )


@recipe("arch-runc")
def arch_runc(cap: Capture) -> str:
    p = cap.daemon("proxy")
    w = cap.web("proxy")
    container = p.data_root / "containers" / w["id"]
    return shell(
        f"runc --root {p.data_root / 'runc'} list",
        f"ls {container} {container / 'bundle'}",
    )


# -- docs/api.md ------------------------------------------------------------------------------


@recipe("api-routes")
def api_routes(_cap: Capture) -> str:
    return capture_tables.api_routes()


@recipe("api-cli")
def api_cli(_cap: Capture) -> str:
    return capture_tables.cli_commands()


@recipe("api-pyengine-options")
def api_pyengine_options(_cap: Capture) -> str:
    return capture_tables.pyengine_options()


@recipe("api-pyengined-options")
def api_pyengined_options(_cap: Capture) -> str:
    return capture_tables.pyengined_options()


# What the Docker CLI does against pyengined: each command, and the part of its output shown
# (the first lines; the last one for build, whose first lines are the CLI's own warnings).
DOCKER_CLI_CHECKS = (
    ("version --format '{{.Server.APIVersion}}'", "head -n 3"),
    ("info --format '{{.ServerVersion}} {{.Driver}}'", "head -n 3"),
    ("ps", "head -n 3"),
    ("images", "head -n 3"),
    ("port web", "head -n 3"),
    ("inspect --format '{{.NetworkSettings.IPAddress}}' web", "head -n 3"),
    ("run --rm busybox echo hello", "head -n 3"),
    ("network ls", "head -n 3"),
    ("exec web true", "head -n 3"),
    ("top web", "head -n 3"),
    ("pause web", "head -n 3"),
    ("stats --no-stream web", "head -n 3"),
    ("build -q - < /dev/null", "tail -n 1"),
    ("run --rm --memory 64m busybox true", "head -n 3"),
)


@recipe("api-docker-cli")
def api_docker_cli(cap: Capture) -> str:
    docker = "/usr/bin/docker"
    if not Path(docker).exists():
        return text_block("(Debian's docker.io is not installed on the capturing machine)")
    p = cap.daemon("proxy")
    config = Path(p.root) / "docker-config"
    config.mkdir(exist_ok=True)
    lines = [f"$ export DOCKER_HOST={p.host} DOCKER_CONFIG={config}"]
    env = f"DOCKER_HOST={p.host} DOCKER_CONFIG={config}"
    for check, part in DOCKER_CLI_CHECKS:
        done = run_shell(f"{env} timeout 30 docker {check} 2>&1 | {part}")
        lines.append(f"$ docker {check}")
        lines.append(done.output.rstrip("\n") or "(no output)")
    return text_block("\n".join(lines))


@recipe("api-errors")
def api_errors(cap: Capture) -> str:
    sock = cap.daemon("proxy").socket_path
    return shell(
        f"curl -sS -i --unix-socket {sock} http://localhost/v1.41/containers/web/top; echo",
        f"curl -sS --unix-socket {sock} http://localhost/v1.99/version; echo",
        f"curl -sS --unix-socket {sock} http://localhost/v1.41/containers/nosuch/json; echo",
    )


# -- docs/troubleshooting.md ------------------------------------------------------------------


@contextlib.contextmanager
def held_port(port: int) -> Iterator[None]:
    """Some other program listening on ``port``: a Python child of this script (ss shows it
    as ``python3`` whoever runs the capture)."""
    listen = (
        "import socket, sys, time\n"
        "s = socket.socket()\n"
        "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
        f"s.bind(('0.0.0.0', {port})); s.listen(1)\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [Path(sys.executable).with_name("python3"), "-c", listen],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert holder.stdout is not None
        if holder.stdout.readline() != b"ready\n":
            raise click.ClickException(f"could not hold port {port} for the capture")
        yield
    finally:
        holder.kill()
        holder.wait()


def _remove_created(cap: Capture, role: str) -> None:
    """Failed runs leave containers in "created" (as Docker does): remove all but web."""
    web = cap.web(role)["id"]
    ids = [
        i for i in must(f"{cap.pyengine(role)} ps -a -q").output.split() if not web.startswith(i)
    ]
    if ids:
        run_shell(f"{cap.pyengine(role)} rm -f {' '.join(ids)}")


@recipe("trouble-daemon")
def trouble_daemon(_cap: Capture) -> str:
    return shell("pyengine -H unix:///run/pyengine-nowhere.sock ps", status=True)


@recipe("trouble-port-in-use")
def trouble_port_in_use(cap: Capture) -> str:
    d = cap.pyengine("dnat")
    with held_port(HELD_PORT):
        text = shell(
            f"{d} run -d --name web2 -p {HELD_PORT}:80 nginx",
            f"ss -tlnp '( sport = :{HELD_PORT} )'",
            f"{d} run -d --name web3 -p {cap.daemon('proxy').port}:80 nginx",
            f"{d} ps -a",
            errors=True,
        )
    _remove_created(cap, "dnat")
    return text


@recipe("trouble-run-errors")
def trouble_run_errors(cap: Capture) -> str:
    d = cap.pyengine("dnat")
    text = shell(
        f"{d} run -d alpine",
        f"{d} run -d --name web nginx",
        f"{d} run -d -p 70000:80 nginx",
        f"{d} run -d -p 8084:80/sctp nginx",
        f"{d} run -d -p '[::1]:8084:80' nginx",
        f"{d} rm web",
        f"{d} logs nosuch",
        f"{d} pull 127.0.0.1:9/library/nginx",
        errors=True,
    )
    _remove_created(cap, "dnat")
    return text


@recipe("trouble-daemon-errors")
def trouble_daemon_errors(_cap: Capture) -> str:
    scratch = "/tmp/pyelab-scratch"
    text = shell(
        "setpriv --reuid=65534 --regid=65534 --clear-groups "
        f"pyengined -H unix://{scratch}.sock --data-root {scratch}",
        f"pyengined -H unix://{scratch}.sock --data-root {scratch} --userland-proxy=maybe",
        f"pyengined -H unix://{scratch}.sock --data-root {scratch} --bip 10.201.9.0/24 2>&1 "
        "| tail -n 1",
        errors=True,
    )
    subprocess.run(["rm", "-rf", scratch], check=False)
    return text


@recipe("trouble-lab")
def trouble_lab(_cap: Capture) -> str:
    return shell("python -m lab up", status=True)


# -- running it ---------------------------------------------------------------------------------


def _capture_phase(backend: str, wanted: dict[str, Recipe], with_down: bool) -> dict[str, str]:
    """Bring the lab up with ``backend``, run the exercises the recipes show (``publish``
    always: the other recipes look at its containers), run the recipes, bring it down."""
    directory = DEFAULT_DIR
    echoed: list[str] = []
    click.echo(f"capture: bringing the lab up ({backend})", err=True)
    lab = up(LabOptions(directory=directory, firewall_backend=backend), echo=echoed.append)
    results: dict[str, str] = {}
    try:
        cap = Capture(lab, "\n".join(echoed) + "\n\n" + status_text(lab))
        shown = {getattr(fn, "exercise", "") for fn in wanted.values()}
        for name, exercise in EXERCISES.items():
            if name != "publish" and name not in shown:
                continue
            click.echo(f"capture: exercise {name}", err=True)
            sections = run_exercise(lab, exercise, echo=lambda _line: None)
            body = "\n".join(render_section(s) for s in sections)
            cap.exercises[name] = f"# {name}: {exercise.title}\n\n{body}"
        for name, fn in wanted.items():
            click.echo(f"capture: {name}", err=True)
            results[name] = fn(cap)
    finally:
        down_lines: list[str] = []
        left = down(directory, echo=down_lines.append)
        if left:
            raise click.ClickException("the lab left: " + ", ".join(left))
    if with_down:
        listing = ["$ python -m lab down", *down_lines, "lab removed"]
        results["lab-down"] = text_block("\n".join(listing))
    return results


def _docs(paths: tuple[Path, ...]) -> list[Path]:
    if paths:
        return [p.resolve() for p in paths]
    return sorted(p for p in DOCS.glob("*.md") if MARKER.search(p.read_text()))


def collect(docs: list[Path]) -> dict[str, str]:
    """Run the recipes the marked blocks of ``docs`` name; their listings by name."""
    names = {m["name"] for p in docs for m in MARKER.finditer(p.read_text())}
    known = set(RECIPES) | {"lab-down"}
    unknown = sorted(names - known)
    if unknown:
        raise click.ClickException(f"no recipe for: {', '.join(unknown)}")
    results: dict[str, str] = {}
    for backend in BACKENDS:
        wanted = {n: fn for n, (b, fn) in sorted(RECIPES.items()) if b == backend and n in names}
        with_down = backend == BACKENDS[0] and "lab-down" in names
        if wanted or with_down:
            results.update(_capture_phase(backend, wanted, with_down))
    # Paths inside this checkout as the reader's own clone has them: relative to it.
    return {name: text.replace(f"{REPO}/", "") for name, text in results.items()}


def prepare() -> None:
    """Root, and this Python's entry points (pyengine, pyengined) first on PATH."""
    if os.geteuid() != 0:
        raise click.ClickException("capturing needs root (the lab and the daemons)")
    os.environ["PATH"] = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"


@click.command()
@click.option(
    "--check",
    is_flag=True,
    help="Write nothing: compare each listing with this run (normalised) and exit 1 on drift.",
)
@click.argument("paths", nargs=-1, type=click.Path(exists=True, dir_okay=False, path_type=Path))
def main(check: bool, paths: tuple[Path, ...]) -> None:
    """Regenerate the captured listings of PATHS (default: every doc that has some)."""
    prepare()
    docs = _docs(paths)
    results = collect(docs)
    drifted = []
    for path in docs:
        text = path.read_text()
        if check:
            drifted += drift(str(path.relative_to(REPO)), text, results)
            continue
        new = MARKER.sub(lambda m: m["open"] + results[m["name"]] + m["close"], text)
        if new != text:
            path.write_text(new)
            click.echo(f"capture: wrote {path.relative_to(REPO)}", err=True)
    for found in drifted:
        click.echo(found.diff)
    if drifted:
        names = ", ".join(f"{d.page} [{d.name}]" for d in drifted)
        raise click.ClickException(f"captures drifted: {names} (docs/capture.py rewrites them)")


if __name__ == "__main__":
    main()
