#!/usr/bin/env bash
# Startup benchmark: one sandboxed `true`, median of N runs, aibox native
# side by side with bubblewrap and podman in the same run on the same host.
# Results: bench/results/startup.{md,json}; copy the table into
# docs/benchmarks.md. Needs root (podman rootful, package installs).
#
#   RUNS=30 bench/startup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-30}
IMAGE=localhost/aibox-bench:bookworm

need=()
command -v hyperfine >/dev/null || need+=(hyperfine)
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v podman >/dev/null || need+=(podman runc uidmap slirp4netns fuse-overlayfs)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
# crun fails on hybrid cgroup hosts; default ulimits must stay below the hard limit.
if [ ! -f /etc/containers/containers.conf ]; then
  mkdir -p /etc/containers
  printf '[engine]\ncgroup_manager = "cgroupfs"\nruntime = "runc"\n[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n' \
    > /etc/containers/containers.conf
fi
if ! podman image exists "$IMAGE"; then
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian
  tar -C "$rootfs" -c . | podman import - "$IMAGE"
  rm -rf "$rootfs"
fi

cargo build --release --bin aibox
AIBOX=$PWD/target/release/aibox
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ws"
: > "$work/config.yaml"
export AIBOX_CONFIG=$work/config.yaml AIBOX_PATHS_DATA_DIR=$work/data AIBOX_PATHS_RUNTIME_DIR=$work/rt

"$AIBOX" start -w "$work/ws" --name bench-exec >/dev/null 2>&1
hyperfine -N --warmup 3 --runs "$RUNS" \
  --export-markdown bench/results/startup.md --export-json bench/results/startup.json \
  -n "aibox run (native, full start+exec+stop)" "$AIBOX run -w $work/ws --name bench-run -- true" \
  -n "aibox exec (into a running sandbox)" "$AIBOX exec --name bench-exec -- true" \
  -n "bwrap --unshare-all (comparable hardening)" \
     "bwrap --ro-bind /usr /usr --symlink usr/bin /bin --symlink usr/lib /lib --symlink usr/lib64 /lib64 --ro-bind /etc /etc --bind $work/ws /workspace --tmpfs /tmp --proc /proc --dev /dev --unshare-all --uid 1000 --gid 1000 --cap-drop ALL --new-session --die-with-parent true" \
  -n "podman run --rm (hardened, runc)" \
     "podman run --rm --network=none --cap-drop=ALL --security-opt no-new-privileges --read-only --user 1000:1000 $IMAGE true"
"$AIBOX" stop --name bench-exec >/dev/null 2>&1

python3 - <<'PY'
import json
d = json.load(open("bench/results/startup.json"))
print("\nmedians:")
for r in d["results"]:
    print(f"  {r['median']*1000:8.1f} ms  {r['command']}")
PY
