"""The host side of the VM lab: who runs Vagrant, what the engine VM installs from, and what
must be gone after ``vagrant destroy``.

libvirt's QEMU *session* mode (``qemu:///session``) is what keeps the lab off the host's
networks, but libvirt sends root to the system daemon whatever the URI says (its remote driver
only autostarts a per-user daemon for uid > 0). Run as root, the lab therefore runs Vagrant as
an unprivileged system user of its own, ``pyelab``, whose home holds Vagrant's state
(``VAGRANT_HOME``), the Vagrantfile's copy, the stage and libvirt's session files; run as
anyone else, it runs Vagrant as that user. The VMs' QEMU processes are that user's too.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.box import BOX_NAME
from lab.commands import REPO
from lab.plan import LabError

LAB_USER = "pyelab"
LAB_HOME = Path(os.environ.get("PYENGINE_VMLAB_HOME", "/var/cache/pyengine/vmlab"))
IMAGE_CACHE = Path(os.environ.get("IMAGE_CACHE", "/var/cache/pyengine/images"))
STAGE_IMAGES = ("nginx", "busybox")
VM_PREFIX = "pyelab-"
VAGRANT_TIMEOUT = 900.0


@dataclass(frozen=True)
class VagrantUser:
    """The account Vagrant, libvirt's session daemon and QEMU run as, and its directories."""

    name: str
    uid: int
    gid: int
    home: Path  # the lab user's home; for anyone else, where the lab keeps its markers
    project: Path  # the Vagrantfile's directory (vagrant/ itself, or the lab user's copy)
    stage: Path  # what the engine VM installs from (the Vagrantfile's PYENGINE_LAB_STAGE)

    @property
    def is_lab_user(self) -> bool:
        return self.name == LAB_USER

    @property
    def vagrant_home(self) -> Path:
        default = Path(pwd.getpwuid(self.uid).pw_dir) / ".vagrant.d"
        return Path(self.env().get("VAGRANT_HOME", default))

    def env(self) -> dict[str, str]:
        lab = {
            "VAGRANT_CHECKPOINT_DISABLE": "1",
            "VAGRANT_DEFAULT_PROVIDER": "libvirt",
            "PYENGINE_LAB_STAGE": str(self.stage),
            "PYENGINE_LAB_VM_PREFIX": VM_PREFIX,
        }
        if not self.is_lab_user:
            return {**os.environ, **lab}
        return {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": str(self.home),
            "USER": self.name,
            "LOGNAME": self.name,
            "LC_ALL": "C.UTF-8",
            "XDG_RUNTIME_DIR": str(self.home / "run"),
            "XDG_CONFIG_HOME": str(self.home / ".config"),
            "XDG_CACHE_HOME": str(self.home / ".cache"),
            "XDG_DATA_HOME": str(self.home / ".local/share"),
            "VAGRANT_HOME": str(self.home / "vagrant.d"),
            **lab,
        }

    def argv(self, argv: list[str]) -> list[str]:
        if os.geteuid() == self.uid:
            return argv
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *argv]

    def run(
        self, argv: list[str], timeout: float = VAGRANT_TIMEOUT, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                self.argv(argv),
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                cwd=cwd or self.project,
                check=False,
            )
        except FileNotFoundError:
            raise LabError(f"{argv[0]} is not installed") from None
        except subprocess.TimeoutExpired:
            raise LabError(f"{' '.join(argv)} did not finish within {timeout:.0f} s") from None

    def check(self, argv: list[str], timeout: float = VAGRANT_TIMEOUT) -> str:
        result = self.run(argv, timeout)
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise LabError(f"{' '.join(argv)}: {lines[-1] if lines else result.returncode}")
        return result.stdout

    def chown(self, path: Path) -> None:
        if os.geteuid() == 0 and self.uid != 0:
            subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(path)], check=True)


def vagrant_user() -> VagrantUser:
    """The lab's user (made if missing) when run as root; otherwise the caller, with the
    repository's vagrant/ as the project and build/vmlab-stage as the stage."""
    if os.geteuid() != 0:
        pw = pwd.getpwuid(os.geteuid())
        build = REPO / "build"
        return VagrantUser(
            pw.pw_name, pw.pw_uid, pw.pw_gid, build / "vmlab", REPO / "vagrant",
            build / "vmlab-stage",
        )  # fmt: skip
    try:
        pw = pwd.getpwnam(LAB_USER)
    except KeyError:
        LAB_HOME.parent.mkdir(parents=True, exist_ok=True)
        # In the kvm group where there is one, so that QEMU may use /dev/kvm (udev gives it
        # mode 0660 root:kvm on Debian); TCG otherwise.
        kvm = ["--groups", "kvm"] if _group_exists("kvm") else []
        subprocess.run(
            ["useradd", "--system", "--user-group", *kvm, "--no-create-home", "--home-dir",
             str(LAB_HOME), "--shell", "/usr/sbin/nologin", LAB_USER],
            check=True,
        )  # fmt: skip
        pw = pwd.getpwnam(LAB_USER)
    user = VagrantUser(
        pw.pw_name, pw.pw_uid, pw.pw_gid, LAB_HOME, LAB_HOME / "project", LAB_HOME / "stage"
    )
    if user.home.exists() and user.home.stat().st_uid != user.uid:
        user.chown(user.home)  # left by an earlier pyelab user of another uid
    for sub in (user.home, user.home / "run", user.project):
        sub.mkdir(parents=True, exist_ok=True)
        os.chown(sub, user.uid, user.gid)
    (user.home / "run").chmod(0o700)
    return user


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def install_vagrantfile(user: VagrantUser) -> None:
    """The repository's Vagrantfile, copied where the lab's user can read it (a clone under
    /root is not)."""
    if not user.is_lab_user:
        return  # the caller uses vagrant/Vagrantfile where it is
    target = user.project / "Vagrantfile"
    shutil.copyfile(REPO / "vagrant/Vagrantfile", target)
    user.chown(target)


def add_box(user: VagrantUser, box: Path, echo: Callable[[str], None]) -> None:
    """``vagrant box add`` the built box, unless this very box is the one added already."""
    user.home.mkdir(parents=True, exist_ok=True)
    marker = user.home / "box.added"
    added = user.vagrant_home / "boxes" / BOX_NAME.replace("/", "-VAGRANTSLASH-")
    if added.is_dir() and marker.exists() and marker.read_text() == box.name:
        echo(f"box: {BOX_NAME} already added ({box.name})")
        return
    echo(f"+ vagrant box add --force --name {BOX_NAME} {box}")
    user.check(["vagrant", "box", "add", "--force", "--name", BOX_NAME, str(box)])
    marker.write_text(box.name)


def _requirements() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    build = meta["build-system"]["requires"]
    return ["pip", "wheel", *build, *meta["project"]["dependencies"]]


def stage(user: VagrantUser, echo: Callable[[str], None]) -> Path:
    """What the engine VM installs from, with no network: src/ (the repository's files as git
    tracks them), wheels/ (built here by pip, which reaches PyPI or its mirror) and images/."""
    root = user.stage
    src, wheels, images = root / "src", root / "wheels", root / "images"
    for sub in (root, wheels, images):
        sub.mkdir(parents=True, exist_ok=True)
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=False,
    )
    if files.returncode != 0:
        raise LabError("the stage copies the files git tracks: not a git checkout")
    echo(f"+ rsync the repository's files to {src}")
    subprocess.run(
        ["rsync", "-a", "--delete", "--from0", "--files-from=-", f"{REPO}/", f"{src}/"],
        input=files.stdout,
        check=True,
    )
    requirements = _requirements()
    stamp = wheels / ".requirements"
    wanted = hashlib.sha256("\n".join(requirements).encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != wanted:
        echo(f"+ pip wheel --wheel-dir {wheels} " + " ".join(requirements))
        result = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--wheel-dir", str(wheels), *requirements],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            raise LabError(f"pip wheel: {result.stderr.strip().splitlines()[-1:]}")
        stamp.write_text(wanted)
    for name in STAGE_IMAGES:
        archive = IMAGE_CACHE / f"{name}-oci.tar"
        if not archive.exists():
            raise LabError(f"{archive} is missing: make images")
        target = images / archive.name
        if not target.exists() or target.stat().st_size != archive.stat().st_size:
            shutil.copyfile(archive, target)
    user.chown(root)
    return root


def leftovers(user: VagrantUser) -> list[str]:
    """Whatever of the VM lab outlived ``vagrant destroy``: domains, volumes, QEMU processes,
    the UDP tunnels' sockets."""
    left: list[str] = []
    domains = user.run(["virsh", "-c", "qemu:///session", "list", "--all", "--name"], 60)
    left += [f"domain {d}" for d in domains.stdout.split() if d.startswith(VM_PREFIX)]
    vols = user.run(["virsh", "-c", "qemu:///session", "vol-list", "default"], 60)
    for line in vols.stdout.splitlines()[2:]:
        if line.split() and (
            line.split()[0].startswith(VM_PREFIX) or "bookworm64-lab" in line.split()[0]
        ):
            left.append(f"volume {line.split()[0]}")
    left += [f"process {pid} {cmd}" for pid, cmd in _user_processes(user, "qemu-system")]
    ss = subprocess.run(["ss", "-Huan"], capture_output=True, text=True, check=False).stdout
    left += [f"socket {line.split()[3]}" for line in ss.splitlines() if ":2941" in line]
    return left


def _user_processes(user: VagrantUser, name: str) -> list[tuple[int, str]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != user.uid:
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if name in cmd.split(" ")[0]:
            found.append((int(entry.name), cmd))
    return found


def remove_box_volume(user: VagrantUser) -> None:
    """The box's base image, which vagrant-libvirt uploads into the session's pool once and
    ``vagrant destroy`` keeps: removed so that nothing of the lab stays in libvirt."""
    vols = user.run(["virsh", "-c", "qemu:///session", "vol-list", "default"], 60)
    for line in vols.stdout.splitlines()[2:]:
        if line.split() and "bookworm64-lab" in line.split()[0]:
            user.run(["virsh", "-c", "qemu:///session", "vol-delete", line.split()[0], "default"])


SESSION_DAEMONS = ("libvirtd", "virtqemud", "virtlogd", "virtlockd")


def stop_session_daemon(user: VagrantUser) -> None:
    """libvirt's session daemons (libvirtd and the virtlogd it starts for QEMU's logs), which
    the lab's user's first virsh/Vagrant call started; each would exit after 120 s idle by
    itself. Only the lab's own user's daemons are stopped."""
    if not user.is_lab_user:
        return
    for pid, _ in [p for name in SESSION_DAEMONS for p in _user_processes(user, name)]:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
