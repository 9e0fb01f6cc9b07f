"""Run a non-interactive command inside a running container: ``runc exec`` with the
container's own process settings (user, environment, capabilities, working directory),
stdin empty, stdout and stderr captured together and bounded, killed at a timeout.

What healthchecks run. The command's output is untrusted: at most ``OUTPUT_LIMIT`` bytes are
kept (Docker's maxOutputLen, 4096) while the rest is read and dropped, so a command that
prints forever is bounded by the timeout alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTPUT_LIMIT = 4096
READ_CHUNK = 65536
# After the command is killed, how long its output pipe may stay open (a child it left
# behind may hold it) before the probe stops reading.
DRAIN_AFTER_KILL = 1.0


@dataclass
class ProbeResult:
    exit_code: int  # -1: timed out or could not run
    output: str
    started: float  # Unix seconds
    ended: float
    timed_out: bool = False


def go_duration_text(seconds: float) -> str:
    """Seconds as Go prints a time.Duration: ``500ms``, ``1s``, ``1m30s``, ``1.5s``."""
    ms = round(seconds * 1000)
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    hours, minutes = divmod(minutes, 60)
    text = f"{rest / 1000:g}s"
    if minutes or hours:
        text = f"{minutes}m" + text
    if hours:
        text = f"{hours}h" + text
    return text


def process_spec(bundle_config: dict[str, Any], argv: list[str]) -> dict[str, Any]:
    """The container's ``process`` from its OCI config with ``argv`` and no terminal."""
    process = dict(bundle_config.get("process") or {})
    process.update(args=list(argv), terminal=False)
    process.pop("consoleSize", None)
    return process


async def _read_bounded(stream: asyncio.StreamReader) -> bytes:
    kept = bytearray()
    while chunk := await stream.read(READ_CHUNK):
        room = OUTPUT_LIMIT - len(kept)
        if room > 0:
            kept += chunk[:room]
    return bytes(kept)


def _kill_pid_file(pid_file: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text().strip() or "0")
        if pid > 0:
            os.kill(pid, signal.SIGKILL)


async def run_in_container(
    runc: str,
    state_root: Path,
    container_id: str,
    process: dict[str, Any],
    timeout: float,
    work_dir: Path,
) -> ProbeResult:
    """Run ``process`` in the container; ``work_dir`` (the daemon's, not the container's)
    holds the process file and the pid file for the run."""
    started = time.time()
    with tempfile.TemporaryDirectory(dir=work_dir, prefix="probe-") as tmp:
        spec_path, pid_file = Path(tmp) / "process.json", Path(tmp) / "pid"
        spec_path.write_text(json.dumps(process))
        try:
            proc = await asyncio.create_subprocess_exec(
                runc,
                "--root",
                str(state_root),
                "exec",
                "--process",
                str(spec_path),
                "--pid-file",
                str(pid_file),
                container_id,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            return ProbeResult(-1, f"cannot run the probe: {e}", started, time.time())
        assert proc.stdout is not None
        reader = asyncio.ensure_future(_read_bounded(proc.stdout))
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            _kill_pid_file(pid_file)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        except asyncio.CancelledError:
            _kill_pid_file(pid_file)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            reader.cancel()
            raise
        try:
            output = await asyncio.wait_for(
                asyncio.shield(reader), DRAIN_AFTER_KILL if timed_out else timeout
            )
        except TimeoutError:
            reader.cancel()
            output = b""
    ended = time.time()
    text = output.decode(errors="replace")
    if timed_out:
        return ProbeResult(
            -1,
            f"Health check exceeded timeout ({go_duration_text(timeout)})",
            started,
            ended,
            timed_out=True,
        )
    return ProbeResult(proc.returncode if proc.returncode is not None else -1, text, started, ended)
