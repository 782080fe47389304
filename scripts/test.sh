#!/usr/bin/env bash
# The whole aibox test suite: formatting, lints, unit tests, and the
# integration suite that builds real sandboxes and attacks them (as root and,
# through an unprivileged account, rootless).
#
# Installs what the tests need with apt when it is missing (as root), then
# runs everything. Usage: scripts/test.sh [extra nextest args]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { [ "$(id -u)" = 0 ]; }

missing=()
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v script  >/dev/null 2>&1 || missing+=(bsdutils)
command -v useradd >/dev/null 2>&1 || missing+=(passwd)
command -v cc      >/dev/null 2>&1 || missing+=(gcc)
# The egress tests use real clients inside the sandbox.
command -v curl    >/dev/null 2>&1 || missing+=(curl)
# The exec gate is attacked from Python and Node subprocesses; Claude Code
# (npm) gets its hook config tested.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# (A virtualenv for moto, the S3 server of suite::archive.)
python3 -c 'import ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v node    >/dev/null 2>&1 || missing+=(nodejs)
command -v npm     >/dev/null 2>&1 || missing+=(npm)
command -v apparmor_parser >/dev/null 2>&1 || [ -x /usr/sbin/apparmor_parser ] || missing+=(apparmor)
# Container engine tests: podman with runc, and mmdebstrap to build images.
command -v podman      >/dev/null 2>&1 || missing+=(podman runc uidmap slirp4netns fuse-overlayfs)
command -v mmdebstrap  >/dev/null 2>&1 || missing+=(mmdebstrap)
# Credential injection is tested against a real git server: git's
# smart-HTTP backend behind nginx (TLS, basic auth) through fcgiwrap.
command -v git      >/dev/null 2>&1 || missing+=(git)
command -v nginx    >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v fcgiwrap >/dev/null 2>&1 || [ -x /usr/sbin/fcgiwrap ] || missing+=(fcgiwrap)
# The OS keyring backend is tested against GNOME Keyring's Secret
# Service on a private session bus.
command -v dbus-daemon >/dev/null 2>&1 || missing+=(dbus-daemon)
command -v gnome-keyring-daemon >/dev/null 2>&1 || missing+=(gnome-keyring)
# Vault mode is tested against rusty_vault, built from crates.io below.
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
# Exported Prometheus alert rules are checked with promtool.
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
# Exported session recordings are played with the distribution's asciinema.
command -v asciinema >/dev/null 2>&1 || missing+=(asciinema)
# The syslog sink is tested against a real rsyslog (UDP, TCP, TLS).
command -v rsyslogd >/dev/null 2>&1 || [ -x /usr/sbin/rsyslogd ] || missing+=(rsyslog)
[ -f /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so ] || missing+=(rsyslog-gnutls)
# gVisor and docker backends.
command -v runsc       >/dev/null 2>&1 || missing+=(runsc)
command -v dockerd     >/dev/null 2>&1 || missing+=(docker.io)
if [ ${#missing[@]} -gt 0 ]; then
  if as_root; then
    echo "installing: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  else
    echo "missing packages: ${missing[*]} (run: sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi

# podman on this kind of host: crun fails on hybrid cgroups, there is no
# systemd session for the systemd cgroup manager, and the default ulimits
# exceed the hard nofile limit. Only written when the host has no config.
if as_root && [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  cat > /etc/containers/containers.conf <<'CONF'
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
CONF
fi

# Claude Code, the real agent of suite::agent (pinned; no install scripts:
# the platform package carries the binary).
CLAUDE_DIR=/usr/local/lib/aibox-test/claude-code
if as_root && [ ! -x "$CLAUDE_DIR/node_modules/@anthropic-ai/claude-code-linux-x64/claude" ]; then
  npm install --ignore-scripts --no-audit --no-fund --loglevel=error \
    --prefix "$CLAUDE_DIR" @anthropic-ai/claude-code@2.1.332
fi

# An S3 API with object lock for suite::archive: moto's server (pinned).
# It stands in for S3 and MinIO, neither of which installs from the
# package registries here; it enforces object lock retention as S3 does.
MOTO_DIR=/usr/local/lib/aibox-test/moto
if as_root && [ ! -x "$MOTO_DIR/bin/moto_server" ]; then
  echo "== installing moto (S3 API for the archive tests)"
  python3 -m venv "$MOTO_DIR"
  "$MOTO_DIR/bin/pip" install --quiet --disable-pip-version-check 'moto[server]==5.2.5'
fi

# rusty_vault (Vault's REST API, in Rust) for suite::vault. Building it
# takes a few minutes; pinned, and only when missing.
if ! command -v rvault >/dev/null 2>&1; then
  echo "== building rusty_vault (for the Vault tests)"
  if as_root; then
    cargo install --locked --quiet rusty_vault --version 0.2.1 --root /usr/local
  else
    cargo install --locked --quiet rusty_vault --version 0.2.1
  fi
fi

# The rootless half of the suite runs as this ordinary account when we are root.
if as_root && ! id aibox-test >/dev/null 2>&1; then
  useradd -m -s /bin/sh aibox-test
fi
# Rootless podman needs subordinate ids for it.
if as_root; then
  for f in /etc/subuid /etc/subgid; do
    grep -q '^aibox-test:' "$f" 2>/dev/null || echo "aibox-test:165536:65536" >> "$f"
  done
fi

# Its rootless podman state lives in /tmp/podman-run-<uid>, which outlives a
# reboot while the pause process does not; podman then refuses every command
# ("invalid internal status"). Reset it so a restarted machine tests cleanly.
if as_root && command -v podman >/dev/null 2>&1; then
  (cd / && setpriv --reuid aibox-test --regid aibox-test --init-groups --reset-env \
     podman system migrate >/dev/null 2>&1) || true
fi

# The docker backend's tests need a running engine; start one for the
# suite (and stop it afterwards) unless one already answers.
started_dockerd=""
stop_dockerd() {
  if [ -n "$started_dockerd" ] && [ -f /run/aibox-test-dockerd.pid ]; then
    kill "$(cat /run/aibox-test-dockerd.pid)" 2>/dev/null || true
  fi
}
trap stop_dockerd EXIT
if as_root && ! docker info >/dev/null 2>&1; then
  echo "== starting dockerd"
  dockerd --iptables=false --bridge=none --pidfile /run/aibox-test-dockerd.pid \
    >/tmp/aibox-test-dockerd.log 2>&1 &
  started_dockerd=1
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
  docker info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 /tmp/aibox-test-dockerd.log; exit 1; }
fi

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  echo "(cargo-nextest not found; using cargo test)"
  cargo test --workspace --locked --no-fail-fast "$@"
fi
echo "== all tests passed"
