#!/usr/bin/env bash
# Egress proxy benchmark: aibox's proxy (serving a real native sandbox)
# side by side with Squid (Debian's package) in the same run, both
# forwarding to the same local nginx:
#   - plain HTTP through the proxy (wrk, keep-alive, absolute-form GETs);
#   - CONNECT tunnels to nginx over TLS (connect_load: one tunnel, one TLS
#     handshake, one GET per exchange).
# At 1, 16 and 256 connections: requests/s, p99 latency, and the proxy's
# resident memory after each load. Results: bench/results/proxy.{md,json}.
# Needs root (package installs, Squid, nginx).
#
#   SECONDS_PER_RUN=10 bench/proxy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${SECONDS_PER_RUN:-10}
LEVELS=${LEVELS:-"1 16 256"}

need=()
command -v squid >/dev/null || need+=(squid)
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
command -v openssl >/dev/null || need+=(openssl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release --bin aibox
cargo build --release --example connect_load -p aibox-net
AIBOX=$PWD/target/release/aibox
LOAD=$PWD/target/release/examples/connect_load

work=$(mktemp -d)
chmod 755 "$work"
cleanup() {
  "$AIBOX" stop --name bench-proxy >/dev/null 2>&1 || true
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  [ -f "$work/squid.pid" ] && kill "$(cat "$work/squid.pid")" 2>/dev/null || true
  sleep 1
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/ws" "$work/www"
head -c 1024 /dev/urandom | base64 > "$work/www/index.html"

# A CA and a certificate for tls.test.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=aibox bench CA" \
  -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=tls.test" -keyout "$work/tls.key" \
  -out "$work/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:tls.test\n' > "$work/san.ext"
openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 2 -extfile "$work/san.ext" -out "$work/tls.pem" 2>/dev/null
cp "$work/ca.pem" "$work/ws/ca.pem"

# The upstream: nginx, plain HTTP on 18080 and TLS on 18443.
cat > "$work/nginx.conf" <<EOF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:18080 backlog=4096;
    listen 127.0.0.1:18443 ssl backlog=4096;
    ssl_certificate $work/tls.pem;
    ssl_certificate_key $work/tls.key;
    root $work/www;
  }
}
EOF
nginx -c "$work/nginx.conf"

# Squid: the same allowlist, no cache, access log on (aibox writes an
# audit event per connection too).
printf '127.0.0.1 svc.test tls.test\n' > "$work/hosts"
cat > "$work/squid.conf" <<EOF
http_port 127.0.0.1:13128
pid_filename $work/squid.pid
cache_log $work/squid-cache.log
access_log stdio:$work/squid-access.log
coredump_dir $work
cache deny all
hosts_file $work/hosts
max_filedescriptors 16384
acl Safe_ports port 18080 18443
acl SSL_ports port 18443
acl allowed dstdomain svc.test tls.test
http_access deny !Safe_ports
http_access deny CONNECT !SSL_ports
http_access allow allowed
http_access deny all
EOF
chown -R proxy:proxy "$work" 2>/dev/null || true
chmod -R a+rX "$work"
squid -f "$work/squid.conf" -N -d 0 &
for _ in $(seq 50); do
  [ -s "$work/squid.pid" ] && curl -s -o /dev/null -x http://127.0.0.1:13128 http://svc.test:18080/ && break
  sleep 0.2
done

# aibox: a native sandbox whose allowlist names the same two hosts.
cat > "$work/config.yaml" <<EOF
runtime: native
resources:
  nofile: 16384
network:
  allowed_domains: ["svc.test:18080", "tls.test:18443", "127.0.0.1:18080", "127.0.0.1:18443"]
  resolve: {svc.test: 127.0.0.1, tls.test: 127.0.0.1}
EOF
export AIBOX_CONFIG=$work/config.yaml AIBOX_PATHS_DATA_DIR=$work/data AIBOX_PATHS_RUNTIME_DIR=$work/rt
cp "$LOAD" "$work/ws/connect_load"
cat > "$work/ws/proxy.lua" <<'EOF'
wrk.path = "http://svc.test:18080/index.html"
wrk.headers["Host"] = "svc.test:18080"
EOF
"$AIBOX" start -w "$work/ws" --name bench-proxy >/dev/null
sup=$("$AIBOX" status --name bench-proxy --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["supervisor_pid"])')

rss_kib() { # total VmRSS of the given pids
  local t=0
  for p in "$@"; do t=$((t + $(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done
  echo "$t"
}
squid_pids() { pgrep -x squid | tr '\n' ' '; }

# wrk output → "rps p99_ms"
wrk_parse() {
  python3 -c '
import re, sys
t = sys.stdin.read()
rps = re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)
m = re.search(r"99%\s+([\d.]+)(us|ms|s)", t)
v = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
errs = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
sock = re.search(r"Socket errors: (.*)", t)
print(rps, round(v, 2), errs.group(1) if errs else 0, "|" + (sock.group(1) if sock else "") + "|")
'
}

results=()
for c in $LEVELS; do
  threads=$(( c < 2 ? 1 : 2 ))
  echo "== plain HTTP, $c connections"
  s=$(wrk -t"$threads" -c"$c" -d"${DUR}s" --latency -s "$work/ws/proxy.lua" http://127.0.0.1:13128/ | wrk_parse)
  results+=("http squid $c $s $(rss_kib $(squid_pids))")
  a=$("$AIBOX" exec --name bench-proxy -- wrk -t"$threads" -c"$c" -d"${DUR}s" --latency -s /workspace/proxy.lua http://127.0.0.1:3128/ | wrk_parse)
  results+=("http aibox $c $a $(rss_kib "$sup")")
  echo "== CONNECT + TLS + GET, $c connections"
  s=$("$LOAD" 127.0.0.1:13128 tls.test:18443 "$work/ca.pem" "$c" "$DUR")
  results+=("connect squid $c $s $(rss_kib $(squid_pids))")
  a=$("$AIBOX" exec --name bench-proxy -- /workspace/connect_load 127.0.0.1:3128 tls.test:18443 /workspace/ca.pem "$c" "$DUR")
  results+=("connect aibox $c $a $(rss_kib "$sup")")
done

printf '%s\n' "${results[@]}" > bench/results/proxy.raw
python3 bench/proxy_report.py bench/results/proxy.raw
