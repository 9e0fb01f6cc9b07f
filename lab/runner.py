"""What an exercise is (sections of shell commands and packet captures, templates filled from
the lab) and how it runs: each command in bash as a reader would type it, output shown."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import click

from lab.commands import COMMAND_TIMEOUT, REPO, command_env, require_tools, run
from lab.plan import ClientLink, LabDaemon, LabError, LabState

WEB = "web"  # the container every exercise publishes
CAPTURE_READY_TIMEOUT = 10.0
CAPTURE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Command:
    """A shell command of an exercise, a template filled from the lab (``{c.host_ip}``,
    ``{d.port}``, ``{d.web_ip}`` ...). Several lines run in one bash, as one terminal would."""

    text: str
    quiet: bool = False  # run, but show neither it nor its output (waiting for readiness)
    may_fail: bool = False  # a non-zero exit status is part of the lesson
    backend: str | None = None  # only in a lab of this firewall backend


@dataclass(frozen=True)
class Capture:
    """``tcpdump`` (with ``-c N``: it stops by itself) started first and running while
    ``traffic`` runs; its output is shown before the traffic's commands, as in a terminal of
    its own."""

    tcpdump: str
    traffic: tuple[Command, ...]


Step = Command | Capture


@dataclass(frozen=True)
class Section:
    title: str
    steps: tuple[Step, ...]
    role: str | None = None  # the daemon ``{d}`` stands for
    needs_client: bool = False


@dataclass(frozen=True)
class Exercise:
    name: str
    title: str
    sections: tuple[Section, ...]
    tools: tuple[str, ...] = ("curl",)  # on PATH, checked before anything runs


@dataclass
class StepResult:
    commands: list[str]  # the shell lines, filled in
    output: str
    returncode: int


@dataclass
class SectionResult:
    title: str
    steps: list[StepResult] = field(default_factory=list)
    skipped: str = ""


class DaemonView:
    """``{d.…}`` in a template: the daemon's fields, plus its web container's address."""

    def __init__(self, daemon: LabDaemon) -> None:
        self._daemon = daemon

    def __getattr__(self, name: str) -> Any:
        return getattr(self._daemon, name)

    @property
    def pyengine(self) -> str:
        return f"pyengine -H {self._daemon.host}"

    @property
    def iptables_prefix(self) -> str:
        return self._daemon.table.upper()

    @cached_property
    def web_ip(self) -> str:
        result = run([*self._daemon.pyengine(), "inspect", WEB])
        if result.returncode != 0:
            raise LabError(
                f"no {WEB} container in the {self._daemon.role} daemon: "
                "run 'python -m lab exercise publish' first"
            )
        data = json.loads(result.stdout)
        return str(data[0]["NetworkSettings"]["IPAddress"])


# Stands for the client in titles when the client is another machine (``up --no-client``).
_ELSEWHERE = ClientLink("(client)", "(link)", "0.0.0.0/0", "<engine address>", "<client address>")


def _fill(text: str, lab: LabState, daemon: LabDaemon | None) -> str:
    return text.format(
        c=lab.client or _ELSEWHERE,
        d=DaemonView(daemon) if daemon else None,
        lab=lab,
        proxy=DaemonView(lab.daemon("proxy")),
        dnat=DaemonView(lab.daemon("dnat")),
    )


def _shell(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["bash", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        env=command_env(),
        cwd=REPO,
        start_new_session=True,
    )


def _finish(process: subprocess.Popen[str], timeout: float) -> tuple[str, int]:
    try:
        out, _ = process.communicate(timeout=timeout)
        return out, process.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return out + f"\n(stopped after {timeout:.0f} s)\n", -signal.SIGKILL


def run_shell(script: str) -> StepResult:
    """Run ``script`` in bash as an exercise does (PATH, working directory, time limit)."""
    out, rc = _finish(_shell(script), COMMAND_TIMEOUT)
    return StepResult(script.splitlines(), out, rc)


@contextlib.contextmanager
def _tcpdump(command: str) -> Iterator[Callable[[], StepResult]]:
    """Start ``command`` (a tcpdump) and wait until it listens; yield a function that waits
    for it to stop (after its ``-c`` packets) and returns what it printed."""
    process = subprocess.Popen(
        ["bash", "-c", f"exec {command}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=command_env(),
        start_new_session=True,
    )
    stderr_lines: list[str] = []
    listening = threading.Event()

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            stderr_lines.append(line)
            if "listening on" in line:
                listening.set()
        listening.set()  # EOF: it exited, whatever the reason

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()

    def collect() -> StepResult:
        try:
            out, _ = process.communicate(timeout=CAPTURE_TIMEOUT)
            note = ""
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            out, _ = process.communicate()
            note = f"(tcpdump stopped after {CAPTURE_TIMEOUT:.0f} s: fewer packets than -c)\n"
        reader.join(timeout=5)
        rc = process.returncode if not note else 1
        if rc != 0:
            out += "".join(stderr_lines)
        return StepResult([command], out + note, rc)

    try:
        if not listening.wait(CAPTURE_READY_TIMEOUT) or process.poll() is not None:
            process.kill()
            process.wait()
            raise LabError(f"tcpdump did not start: {''.join(stderr_lines).strip()}")
        yield collect
    finally:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_section(lab: LabState, section: Section) -> SectionResult:
    daemon = lab.daemon(section.role) if section.role else None
    title = _fill(section.title, lab, daemon)
    result = SectionResult(title)
    if section.needs_client and lab.client is None:
        result.skipped = "no client namespace in this lab (--no-client): run it on the client"
        return result
    for step in section.steps:
        if isinstance(step, Command) and step.backend not in (None, lab.firewall_backend):
            continue
        if isinstance(step, Command):
            done = run_shell(_fill(step.text, lab, daemon))
            if not step.quiet:
                result.steps.append(done)
            if done.returncode != 0 and not step.may_fail:
                raise ExerciseFailed(result, done)
            continue
        require_tools("tcpdump")
        with _tcpdump(_fill(step.tcpdump, lab, daemon)) as collect:
            traffic = []
            for command in step.traffic:
                done = run_shell(_fill(command.text, lab, daemon))
                traffic.append(done)
                if done.returncode != 0 and not command.may_fail:
                    result.steps += traffic
                    raise ExerciseFailed(result, done)
            captured = collect()
        result.steps.append(captured)
        result.steps += traffic
        if captured.returncode != 0:
            raise ExerciseFailed(result, captured)
    return result


class ExerciseFailed(LabError):
    def __init__(self, partial: SectionResult, step: StepResult) -> None:
        super().__init__(f"{step.commands[0]} exited {step.returncode}")
        self.partial = partial
        self.step = step


def render_step(step: StepResult) -> str:
    lines = [f"$ {line}" for line in step.commands]
    body = step.output.rstrip("\n")
    return "\n".join(lines) + ("\n" + body if body else "") + "\n"


def render_section(section: SectionResult) -> str:
    out = [f"## {section.title}", ""]
    if section.skipped:
        return "\n".join(out + [f"({section.skipped})", ""])
    for step in section.steps:
        out.append(render_step(step))
    return "\n".join(out)


def run_exercise(
    lab: LabState, exercise: Exercise, echo: Callable[[str], None] = click.echo
) -> list[SectionResult]:
    """Run every section, echoing each as it completes; raise ExerciseFailed on a failure."""
    if not lab.ready:
        raise LabError("the lab is not ready ('up' did not finish); run 'down', then 'up'")
    require_tools(*exercise.tools)
    echo(f"# {exercise.name}: {exercise.title}\n")
    results = []
    for section in exercise.sections:
        try:
            done = run_section(lab, section)
        except ExerciseFailed as failed:
            echo(render_section(failed.partial))
            raise
        results.append(done)
        echo(render_section(done))
    return results
