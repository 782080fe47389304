#!/usr/bin/env bash
# Exec gate benchmark, in one run:
#   - decision latency of the policy decider, cold and cached
#     (crates/aibox-policy/examples/decide_bench.rs);
#   - exec overhead: 1,000 fork+exec+wait of /bin/true (bench/execloop.c),
#     timed one by one, on the host, in aibox native sandboxes with and
#     without the gate (sandbox.exec_gate: false, no policy files), and in
#     bubblewrap (the peer: the sandbox Claude Code's own runtime uses),
#     whose processes exec ungated.
# Results: bench/results/gate.{md,json}. Run as root.
#
#   ROUNDS=5 bench/gate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
N=${N:-1000}
command -v bwrap >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }
command -v cc >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc; }
cargo build --release --bin aibox
cargo build --release -p aibox-policy --example decide_bench
AIBOX=$PWD/target/release/aibox

work=$(mktemp -d)
chmod 755 "$work"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/ws" "$work/data" "$work/rt"
cc -O2 -o "$work/ws/execloop" bench/execloop.c
cat > "$work/config.yaml" <<CONF
runtime: native
network: {enabled: false}
CONF
export AIBOX_CONFIG=$work/config.yaml AIBOX_PATHS_DATA_DIR=$work/data AIBOX_PATHS_RUNTIME_DIR=$work/rt

decide=$(target/release/examples/decide_bench 5000)
rows=()
for r in $(seq "$ROUNDS"); do
  host=$("$work/ws/execloop" "$N")
  gated=$("$AIBOX" run -w "$work/ws" -- /workspace/execloop "$N")
  ungated=$(AIBOX_SANDBOX_EXEC_GATE=false "$AIBOX" run -w "$work/ws" -- /workspace/execloop "$N")
  bwrap=$(bwrap --ro-bind / / --dev /dev --proc /proc --tmpfs /tmp --bind "$work/ws" /tmp/ws \
    --unshare-all --die-with-parent --new-session /tmp/ws/execloop "$N")
  rows+=("{\"round\":$r,\"host\":\"$host\",\"aibox_gated\":\"$gated\",\"aibox_ungated\":\"$ungated\",\"bwrap\":\"$bwrap\"}")
done
mkdir -p bench/results
printf '{"commit":"%s","n":%s,"decide":%s,"exec":[%s]}\n' "$(git rev-parse --short HEAD)" "$N" "$decide" \
  "$(IFS=,; echo "${rows[*]}")" > bench/results/gate.json
python3 - bench/results/gate.json > bench/results/gate.md <<'PY'
import json, statistics, sys
d = json.load(open(sys.argv[1]))
print(f"commit {d['commit']}, {d['n']} execs per run, {len(d['exec'])} runs (median of the runs' values)\n")
k = d["decide"]
print("| decision | median µs | p99 µs |\n|---|---|---|")
print(f"| cold (new input: YAML rules + Rego) | {k['cold_median_us']:.1f} | {k['cold_p99_us']:.1f} |")
print(f"| cached | {k['cached_median_us']:.2f} | {k['cached_p99_us']:.2f} |\n")
print("| fork+exec+wait of /bin/true | median µs | p99 µs | mean µs |\n|---|---|---|---|")
cols = {}
for name in ["host", "bwrap", "aibox_ungated", "aibox_gated"]:
    v = [list(map(float, r[name].split())) for r in d["exec"]]
    cols[name] = [statistics.median(x[i] for x in v) for i in range(3)]
    print(f"| {name} | {cols[name][0]:.0f} | {cols[name][1]:.0f} | {cols[name][2]:.0f} |")
o = cols["aibox_gated"][0] - cols["aibox_ungated"][0]
print(f"\ngate overhead (median, gated − ungated): {o:.0f} µs per exec")
PY
cat bench/results/gate.md
