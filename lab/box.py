"""The VM lab's Vagrant box, built offline from Debian packages only: ``python -m lab box``.

mmdebstrap installs bookworm (kernel, systemd, openssh-server, sudo, qemu-guest-agent and every
tool the lab's provisioning and exercises use, so a VM needs no network at all), the tree is
made into a Vagrant base box (the ``vagrant`` user with passwordless sudo and Vagrant's public
insecure key), written into an ext4 image with ``mkfs.ext4 -d`` (no loop mount) and converted
to qcow2. The box boots its kernel directly (``libvirt.kernel/initrd/cmd_line`` in the box's
own Vagrantfile): no partition table, no bootloader.

The ``.box`` is cached under ``/var/cache/pyengine/boxes`` by a hash of everything that goes
into it, so a second build is a file lookup; ``SOURCE_DATE_EPOCH`` and the fixed package list
make two builds from the same mirror state agree.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lab.plan import LabError

BOX_NAME = "pyengine/bookworm64-lab"
BOX_CACHE = Path(os.environ.get("PYENGINE_BOX_CACHE", "/var/cache/pyengine/boxes"))
BUILDER_VERSION = "2"
SOURCE_DATE_EPOCH = "1700000000"
DISK_SIZE_GB = 8
ROOT_LABEL = "pyelab-root"
# The kernel's command line: the box's only disk is the root file system itself.
CMDLINE = "root=/dev/vda rw console=ttyS0 quiet"

PACKAGES = tuple(
    # a bootable, manageable machine
    "systemd-sysv udev dbus linux-image-amd64 initramfs-tools openssh-server sudo "
    "qemu-guest-agent iproute2 iputils-ping kmod procps less ca-certificates netbase "
    # pyengine's own needs: a venv, the fork server's C loop, runc and the firewall tools
    "python3 python3-venv python3-dev gcc libc6-dev make runc nftables iptables rsync "
    # the exercises' tools (docs/lab.md)
    "curl tcpdump conntrack apache2-utils iperf3 socat netcat-openbsd".split()
)

_DPKG_OPTS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)

# systemd-networkd on every NIC: DHCP answers on the management NIC (QEMU user-mode
# networking); the LAN NIC gets an IPv4 link-local address until provisioning configures it,
# so that the guest agent reports an address for it (vagrant-libvirt asks the agent for the
# first NIC of the domain, and only then uses the SSH host and port of the Vagrantfile).
NETWORKD_DEFAULT = "[Match]\nName=en* eth*\n\n[Network]\nDHCP=ipv4\nLinkLocalAddressing=ipv4\n"
# Host keys are made at the first boot, so that two VMs of one box do not share them.
SSH_KEYS_DROPIN = (
    "[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\n"
    "ExecStartPre=/usr/sbin/sshd -t\n"
)
BOX_VAGRANTFILE = f"""\
# The pyengine lab's base box: direct kernel boot of the kernel and initrd beside this file.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.kernel = File.join(File.dirname(__FILE__), "vmlinuz")
    libvirt.initrd = File.join(File.dirname(__FILE__), "initrd.img")
    libvirt.cmd_line = "{CMDLINE}"
    libvirt.disk_bus = "virtio"
  end
end
"""


@dataclass(frozen=True)
class BoxInputs:
    """Everything a box is made of; its hash names the cached ``.box``."""

    suite: str
    mirror: str  # a deb822 sources file or a mirror URL, as mmdebstrap takes it
    packages: tuple[str, ...]
    vagrant_pubkey: str

    def key(self) -> str:
        material = json.dumps(
            {
                "version": BUILDER_VERSION,
                "suite": self.suite,
                "mirror": Path(self.mirror).read_text() if os.path.isfile(self.mirror) else "",
                "packages": sorted(self.packages),
                "pubkey": self.vagrant_pubkey,
                "networkd": NETWORKD_DEFAULT,
                "ssh": SSH_KEYS_DROPIN,
                "vagrantfile": BOX_VAGRANTFILE,
                "epoch": SOURCE_DATE_EPOCH,
                "disk": DISK_SIZE_GB,
            },
            sort_keys=True,
        )
        return hashlib.sha256(material.encode()).hexdigest()[:16]


def vagrant_public_key() -> str:
    """Vagrant's insecure public key, from the installed vagrant package (it is public)."""
    found = sorted(glob.glob("/usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub"))
    found += sorted(glob.glob("/opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub"))
    if not found:
        raise LabError("vagrant's keys/vagrant.pub not found: apt-get install vagrant")
    return Path(found[-1]).read_text().strip() + "\n"


def default_inputs() -> BoxInputs:
    sources = "/etc/apt/sources.list.d/debian.sources"
    mirror = sources if os.path.isfile(sources) else "http://deb.debian.org/debian"
    return BoxInputs("bookworm", mirror, PACKAGES, vagrant_public_key())


def _run(argv: list[str], timeout: float, echo: Callable[[str], None]) -> None:
    echo("+ " + " ".join(argv))
    # E2FSPROGS_FAKE_TIME: mkfs.ext4's own timestamps (superblock, root and lost+found).
    env = dict(
        os.environ,
        SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH,
        E2FSPROGS_FAKE_TIME=SOURCE_DATE_EPOCH,
        LC_ALL="C.UTF-8",
    )
    try:
        result = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{argv[0]} did not finish within {timeout:.0f} s") from None
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        raise LabError(f"{argv[0]} failed: {lines[-1] if lines else result.returncode}")


def _customize(tree: Path, pubkey: str, echo: Callable[[str], None]) -> None:
    """Make the tree a Vagrant base box (https://developer.hashicorp.com/vagrant/docs/boxes/base)."""
    (tree / "etc/hostname").write_text("pyelab\n")
    (tree / "etc/fstab").write_text("/dev/vda / ext4 defaults,errors=remount-ro 0 1\n")
    _run(["chroot", str(tree), "useradd", "-m", "-s", "/bin/bash", "-U", "vagrant"], 60, echo)
    _run(["chroot", str(tree), "passwd", "-l", "vagrant"], 60, echo)
    ssh_dir = tree / "home/vagrant/.ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").write_text(pubkey)
    (ssh_dir / "authorized_keys").chmod(0o600)
    _run(["chroot", str(tree), "chown", "-R", "vagrant:vagrant", "/home/vagrant/.ssh"], 60, echo)
    sudoers = tree / "etc/sudoers.d/vagrant"
    sudoers.write_text("vagrant ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    (tree / "etc/systemd/network/50-pyelab.network").write_text(NETWORKD_DEFAULT)
    _run(["chroot", str(tree), "systemctl", "enable", "systemd-networkd"], 60, echo)
    # Nothing waits for the LAN NIC's DHCP, which never answers.
    _run(["chroot", str(tree), "systemctl", "mask", "systemd-networkd-wait-online"], 60, echo)
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    dropin = tree / "etc/systemd/system/ssh.service.d"
    dropin.mkdir(parents=True, exist_ok=True)
    (dropin / "host-keys.conf").write_text(SSH_KEYS_DROPIN)
    (tree / "etc/machine-id").write_text("")  # each VM makes its own at first boot


def _kernel_files(tree: Path) -> tuple[Path, Path]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    initrds = sorted((tree / "boot").glob("initrd.img-*"))
    if not kernels or not initrds:
        raise LabError("the box's tree has no /boot/vmlinuz-* and initrd.img-*")
    return kernels[-1], initrds[-1]


def build_box(inputs: BoxInputs, out: Path, echo: Callable[[str], None]) -> None:
    """Build the ``.box`` at ``out`` (written beside it, then renamed into place)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pyelab-box-", dir=out.parent) as scratch:
        work = Path(scratch)
        tree, pack = work / "tree", work / "pack"
        pack.mkdir()
        _run(
            [
                "mmdebstrap",
                "--variant=minbase",
                "--include=" + ",".join(inputs.packages),
                "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                *(f"--dpkgopt={opt}" for opt in _DPKG_OPTS),
                inputs.suite,
                str(tree),
                inputs.mirror,
            ],
            900,
            echo,
        )
        _customize(tree, inputs.vagrant_pubkey, echo)
        # Files the build itself wrote carry its time: clamped, as dpkg's are by the packages.
        _run(
            ["find", str(tree), "-xdev", "-newermt", f"@{SOURCE_DATE_EPOCH}", "-exec",
             "touch", "--no-dereference", f"--date=@{SOURCE_DATE_EPOCH}", "{}", "+"],
            300,
            echo,
        )  # fmt: skip
        kernel, initrd = _kernel_files(tree)
        shutil.copyfile(kernel, pack / "vmlinuz")
        shutil.copyfile(initrd, pack / "initrd.img")
        raw = work / "root.raw"
        _run(
            ["mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-U", _uuid_from(inputs.key(), "uuid"),
             "-E", f"hash_seed={_uuid_from(inputs.key(), 'seed')}", "-d", str(tree), str(raw),
             f"{DISK_SIZE_GB}G"],
            300,
            echo,
        )  # fmt: skip
        shutil.rmtree(tree)
        _run(["qemu-img", "convert", "-O", "qcow2", str(raw), str(pack / "box.img")], 300, echo)
        raw.unlink()
        metadata = {"provider": "libvirt", "format": "qcow2", "virtual_size": DISK_SIZE_GB}
        (pack / "metadata.json").write_text(json.dumps(metadata) + "\n")
        (pack / "Vagrantfile").write_text(BOX_VAGRANTFILE)
        partial = work / "box.tar"
        names = ["metadata.json", "Vagrantfile", "vmlinuz", "initrd.img", "box.img"]
        _run(
            ["tar", "-C", str(pack), "--sort=name", f"--mtime=@{SOURCE_DATE_EPOCH}",
             "--owner=0", "--group=0", "--numeric-owner", "-cf", str(partial), *names],
            300,
            echo,
        )  # fmt: skip
        os.replace(partial, out)


def _uuid_from(key: str, purpose: str) -> str:
    h = hashlib.sha256(f"{purpose}:{key}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def cached_box(echo: Callable[[str], None], inputs: BoxInputs | None = None) -> Path:
    """The box for ``inputs`` (the default package list), built if it is not cached yet."""
    inputs = inputs or default_inputs()
    out = BOX_CACHE / f"pyelab-bookworm64-{inputs.key()}.box"
    if out.exists():
        echo(f"box: cached {out}")
        return out
    if os.geteuid() != 0:
        raise LabError(f"{out.name} is not built yet; building it needs root: sudo make lab-box")
    for stale in BOX_CACHE.glob("pyelab-bookworm64-*.box"):
        stale.unlink()  # one box at a time: each is ~1 GB
    build_box(inputs, out, echo)
    echo(f"box: built {out} ({out.stat().st_size // 2**20} MiB)")
    return out
