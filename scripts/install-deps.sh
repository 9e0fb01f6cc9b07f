#!/usr/bin/env bash
# Install the Debian packages pyengine and its tests need. Only missing packages are installed.
# (gcc and python3-dev build the fork server's C loop, proxy/_forkloop.c, at pip install.)
# (dnsmasq-base: the binary alone, no service, for the DNS bench's anchor.)
# (graphviz: `dot`, which renders the pictures of docs/figures/ -- make figures.)
# (podman, containernetworking-plugins: a CNI consumer and the reference plugins that
# pyengine-cni is tested with and measured against; containerd comes with docker.io.)
# Debian's docker.io is an anchor for tests and benchmarks (its docker CLI, docker-proxy and a
# dockerd the tests start themselves); when this script installs it, it is kept dormant: its
# services are not started, and on systemd hosts not enabled, since a running dockerd sets the
# iptables FORWARD policy to DROP for every bridge on the host.
set -euo pipefail

packages=(runc nftables iptables iproute2 mmdebstrap busybox-static conntrack curl socat procps
  python3-venv python3-dev gcc libc6-dev ca-certificates openssl docker-registry skopeo apache2-utils tcpdump wrk iperf3
  dnsmasq-base graphviz podman containernetworking-plugins)
# The VM lab (lab/box.py, vagrant/): Vagrant with vagrant-libvirt, libvirt's QEMU driver for its
# session daemon, QEMU; without recommends, so that neither libvirt's system daemon nor its
# "default" NAT network (libvirt-daemon-config-network) comes in.
vm_packages=(vagrant vagrant-libvirt libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  qemu-system-x86 qemu-utils e2fsprogs)
# docker-compose is installed with the anchor: it recommends docker.io, which would otherwise
# come in (and start) with the packages above.
anchors=(docker.io docker-compose)

missing() {
  for p in "$@"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=600 "$@"
}

need=$(missing "${packages[@]}")
need_vm=$(missing "${vm_packages[@]}")
need_anchor=$(missing "${anchors[@]}")
anchor_opts=()
# docker.io conflicts with Docker's own packages (docker-ce's containerd.io): installing it
# would remove them. Their docker CLI and dockerd serve as the anchor instead.
if [ -n "$need_anchor" ] && { [ -z "$(missing docker-ce)" ] || [ -z "$(missing containerd.io)" ]; }; then
  echo "install-deps: docker-ce/containerd.io installed; not installing Debian's docker.io" >&2
  need_anchor=$(missing docker-compose)
  anchor_opts=(--no-install-recommends)
fi
[ -z "$need$need_vm$need_anchor" ] && exit 0
apt-get update -q
# shellcheck disable=SC2086
[ -n "$need" ] && apt_install $need
# shellcheck disable=SC2086
[ -n "$need_vm" ] && apt_install --no-install-recommends $need_vm

if [ -n "$need_anchor" ]; then
  made_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # policy-rc.d(8): exit 101 = "action forbidden", so invoke-rc.d starts nothing.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    made_policy=yes
  fi
  # shellcheck disable=SC2086
  apt_install "${anchor_opts[@]}" $need_anchor || { [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d; exit 1; }
  [ -n "$made_policy" ] && rm -f /usr/sbin/policy-rc.d
  if [ -z "${anchor_opts[*]}" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable docker.service docker.socket >/dev/null 2>&1 || true
  fi
fi
