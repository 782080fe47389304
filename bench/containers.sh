#!/usr/bin/env bash
# Container backend benchmark: `aibox start` → ready, start+stop, and
# `aibox run -- true` on podman+runc and podman+runsc, side by side with a
# bare `podman run --rm IMAGE true` (runc and runsc) on the same host.
# Target (issue 3): aibox ≤ 1.5 × bare podman. Results:
# bench/results/containers.{md,json}. Needs root and the base image
# (`aibox image build`); installs hyperfine and runsc when missing.
#
#   RUNS=10 bench/containers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
IMAGE=localhost/aibox/base:bookworm

need=()
command -v hyperfine >/dev/null || need+=(hyperfine)
command -v runsc >/dev/null || need+=(runsc)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release --bin aibox
AIBOX=$PWD/target/release/aibox
podman image exists "$IMAGE" || "$AIBOX" image build
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ws"
printf 'runtime: podman\n' > "$work/config.yaml"
export AIBOX_CONFIG=$work/config.yaml AIBOX_PATHS_DATA_DIR=$work/data AIBOX_PATHS_RUNTIME_DIR=$work/rt
RUNSC="--runtime $(command -v runsc) --runtime-flag network=none --runtime-flag platform=ptrace"
GV="AIBOX_GVISOR_ENABLED=true AIBOX_GVISOR_PLATFORM=ptrace"

# start → ready alone: the previous sandbox is stopped untimed (--prepare).
hyperfine -N --warmup 2 --runs "$RUNS" \
  --prepare "sh -c '$AIBOX stop --name b0 >/dev/null 2>&1 || true'" \
  --export-markdown bench/results/containers-start.md --export-json bench/results/containers-start.json \
  -n "aibox start → ready (podman+runc)" "$AIBOX start -w $work/ws --name b0" \
  -n "aibox start → ready (podman+runsc)" "env $GV $AIBOX start -w $work/ws --name b0"
"$AIBOX" stop --name b0 >/dev/null 2>&1 || true

hyperfine -N --warmup 2 --runs "$RUNS" \
  --export-markdown bench/results/containers.md --export-json bench/results/containers.json \
  -n "aibox start+stop (podman+runc)" "sh -c '$AIBOX start -w $work/ws --name b1 >/dev/null 2>&1 && $AIBOX stop --name b1 2>/dev/null'" \
  -n "aibox run -- true (podman+runc)" "$AIBOX run -w $work/ws --name b2 -- true" \
  -n "podman run --rm IMAGE true (runc)" "podman run --rm --network=none $IMAGE true" \
  -n "aibox start+stop (podman+runsc)" "env $GV sh -c '$AIBOX start -w $work/ws --name b4 >/dev/null 2>&1 && $AIBOX stop --name b4 2>/dev/null'" \
  -n "aibox run -- true (podman+runsc)" "env $GV $AIBOX run -w $work/ws --name b3 -- true" \
  -n "podman run --rm IMAGE true (runsc)" "podman run --rm --network=none $RUNSC $IMAGE true"

python3 - <<'PY'
import json
print("\nmedians:")
for f in ["bench/results/containers-start.json", "bench/results/containers.json"]:
    for r in json.load(open(f))["results"]:
        print(f"  {r['median']*1000:8.1f} ms  {r['command']}")
PY
