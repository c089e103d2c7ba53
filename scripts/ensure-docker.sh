#!/usr/bin/env bash
# Make sure a Docker engine answers, and that mmdebstrap (which builds the job base image) is here.
#
# On Debian/Ubuntu as root this installs what is missing (docker.io, mmdebstrap) and starts
# dockerd in the background with --iptables=false: our machines have no iptables NAT to offer,
# and job containers run without a network anyway. Elsewhere it says what to install.
set -euo pipefail

LOG=${MODELYO_DOCKERD_LOG:-/var/log/modelyo-dockerd.log}
POLICY_RC=${MODELYO_POLICY_RC:-/usr/sbin/policy-rc.d}
WAIT_SECONDS=60

say() { printf 'ensure-docker: %s\n' "$*" >&2; }

engine_answers() {
    # `docker --version` proves nothing (a client can exist without an engine); `docker info` does.
    command -v docker >/dev/null 2>&1 && timeout 20 docker info >/dev/null 2>&1
}

can_apt() { [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; }

APT_UPDATED=0
apt_install() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        apt-get update -q >&2
        APT_UPDATED=1
    fi
    say "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
}

install_docker() {
    if [ -d /run/systemd/system ]; then
        apt_install docker.io  # systemd starts docker.service: a machine's usual engine
        return
    fi
    # Without systemd the package's init script would start dockerd with iptables rules this
    # machine may not support; a policy-rc.d keeps it quiet, and dockerd is started below.
    if [ -e "$POLICY_RC" ]; then
        apt_install docker.io
        return
    fi
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
    chmod +x "$POLICY_RC"
    trap 'rm -f "$POLICY_RC"' EXIT
    apt_install docker.io
    rm -f "$POLICY_RC"
    trap - EXIT
}

# mmdebstrap first and on its own: the engine may already run while mmdebstrap is missing.
if ! command -v mmdebstrap >/dev/null 2>&1; then
    if can_apt; then
        # The keyring checks what mmdebstrap downloads (on Ubuntu it is not there by default).
        apt_install mmdebstrap debian-archive-keyring
    else
        say "warning: mmdebstrap is missing; building the job base image needs it" \
            "(Debian/Ubuntu: sudo apt-get install mmdebstrap)"
    fi
fi

if engine_answers; then
    exit 0
fi

if ! can_apt; then
    cat >&2 <<'MSG'
ensure-docker: no Docker engine answers (`docker info` failed).
  Install and start one, then rerun:
    - Linux: Docker Engine (https://docs.docker.com/engine/install/) or your distribution's
      docker.io package, then start it (e.g. `sudo systemctl start docker`) and let your user
      reach it (`sudo usermod -aG docker $USER`, then log in again);
    - macOS / Windows: Docker Desktop, started.
  `docker info` must answer for the user running make.
MSG
    exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
    install_docker
fi

if engine_answers; then
    exit 0  # the package's service manager started it
fi

if pidof dockerd >/dev/null 2>&1; then
    say "dockerd is already starting; waiting for it"
else
    say "starting dockerd --iptables=false (log: $LOG)"
    # setsid + nohup: the engine outlives this script and the make that ran it.
    setsid nohup dockerd --iptables=false >>"$LOG" 2>&1 </dev/null &
fi

for ((i = 0; i < WAIT_SECONDS; i++)); do
    if engine_answers; then
        say "Docker engine is up after ${i} s"
        exit 0
    fi
    sleep 1
done

say "dockerd did not answer within ${WAIT_SECONDS} s; last lines of $LOG:"
tail -n 30 "$LOG" >&2 || true
exit 1
