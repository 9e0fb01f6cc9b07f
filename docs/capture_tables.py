"""The generated tables of the docs: API routes, `pyengine` commands, and the options of
``pyengined --help`` and ``pyengine --help``, each read from the click commands and the route
table themselves (so a new flag or command shows up at the next capture, and a page that
lacks it fails the capture check)."""

from __future__ import annotations

import click

# The docker CLI's commands (20.10, `docker --help` and its management commands).
DOCKER_VERBS = (
    "attach", "build", "commit", "cp", "create", "diff", "events", "exec", "export", "history",
    "images", "import", "info", "inspect", "kill", "load", "login", "logout", "logs", "network",
    "pause", "port", "ps", "pull", "push", "rename", "restart", "rm", "rmi", "run", "save",
    "search", "start", "stats", "stop", "system", "tag", "top", "unpause", "update", "version",
    "volume", "wait",
)  # fmt: skip


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _first_line(command: click.Command) -> str:
    return (command.help or "").strip().splitlines()[0] if command.help else ""


def api_routes() -> str:
    from engine.api.app import NOT_IMPLEMENTED, routes

    unsupported = {(m, p): what for m, p, what in NOT_IMPLEMENTED}
    rows = ["| method | path | pyengined |", "|---|---|---|"]
    for method, path, handler in routes(None):  # type: ignore[arg-type]
        what = unsupported.get((method, path))
        if what:
            answer = f"501: {what}"
        else:
            module = getattr(handler, "__module__", "engine.api.app").replace(".", "/")
            answer = f"yes ({module}.py)"
        rows.append(f"| {method} | `{path}` | {answer} |")
    return (
        "Generated from `engine.api.app.routes()`; every path is also served under "
        "`/v1.NN/`.\n\n" + "\n".join(rows) + "\n"
    )


def cli_commands() -> str:
    """Every ``pyengine`` command and subcommand; ``pyengine lab`` hands its arguments to
    ``python -m lab``, whose commands are listed as its subcommands."""
    from client.cli import main as cli
    from lab.cli import main as lab_cli

    groups: dict[str, click.Command] = dict(cli.commands)
    groups["lab"] = lab_cli
    rows = ["| command | what it does |", "|---|---|"]
    for name, command in sorted(groups.items()):
        if isinstance(command, click.Group):
            for sub_name, sub in sorted(command.commands.items()):
                rows.append(f"| `pyengine {name} {sub_name}` | {_cell(_first_line(sub))} |")
            continue
        rows.append(f"| `pyengine {name}` | {_cell(_first_line(command))} |")
    missing = [verb for verb in DOCKER_VERBS if verb not in cli.commands]
    return (
        "Generated from the `pyengine` click group.\n\n"
        + "\n".join(rows)
        + "\n\nDocker commands `pyengine` does not have: "
        + ", ".join(f"`{verb}`" for verb in missing)
        + ".\n"
    )


def options(command: click.Command, program: str) -> str:
    """The options of ``program --help``, one row each, as click prints them."""
    ctx = click.Context(command, info_name=program, **command.context_settings)
    rows = ["| option | what it does |", "|---|---|"]
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:
            continue
        flags, text = record
        rows.append(f"| `{_cell(flags)}` | {_cell(text)} |")
    return f"Generated from `{program} --help`.\n\n" + "\n".join(rows) + "\n"


def pyengined_options() -> str:
    from engine.daemon import main as daemon

    return options(daemon, "pyengined")


def pyengine_options() -> str:
    from client.cli import main as cli

    return options(cli, "pyengine")
