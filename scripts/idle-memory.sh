#!/usr/bin/env bash
# Measures what an idle client connection costs each proxy in resident memory: pushrelay (pre-proxy
# role), and nghttpx and HAProxy in the same role when they are installed. For each proxy:
# start it in front of the fake APNs origin, open a warm-up set of connections (so allocator arenas,
# the upstream connection and TLS caches exist), read VmRSS, open --count more TLS + HTTP/2
# connections (each sends one push, then stays idle), read VmRSS again. The figure is the difference
# divided by --count, in KiB, with the proxy's own start-up RSS alongside.
#
# Only 127.0.0.1 is used. Every process this script starts is killed by PID when it exits.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/idle-memory.sh [options]

  --count N        idle connections measured per proxy (default 5000)
  --warmup N       connections opened before the first reading (default 200)
  --threads N      worker threads for each proxy (default 1)
  --no-peers       measure pushrelay only
  --no-build       use the binaries already in target/release
  --out FILE       also write the report to FILE
  -h, --help       show this help

Needs: cargo (unless --no-build), and a file-descriptor limit above count + warm-up for this
shell (ulimit -n). Optional peers: nghttpx (apt-get install nghttp2-proxy), haproxy
(apt-get install haproxy). The script installs nothing.
EOF
}

COUNT=5000
WARMUP=200
THREADS=1
PEERS=1
BUILD=1
OUT=""

SCRIPT=idle-memory.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --count) [[ $# -ge 2 ]] || die "$1 needs a value"; positive "$1" "$2"; COUNT="$2"; shift 2 ;;
    --warmup) [[ $# -ge 2 ]] || die "$1 needs a value"; positive "$1" "$2"; WARMUP="$2"; shift 2 ;;
    --threads) [[ $# -ge 2 ]] || die "$1 needs a value"; positive "$1" "$2"; THREADS="$2"; shift 2 ;;
    --no-peers) PEERS=0; shift ;;
    --no-build) BUILD=0; shift ;;
    --out) [[ $# -ge 2 ]] || die "$1 needs a value"; OUT="$2"; [[ "$OUT" == /* ]] || OUT="$PWD/$OUT"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NEED_FDS=$(((COUNT + WARMUP) * 2 + 200))
if [[ "$(ulimit -n)" != unlimited && "$(ulimit -n)" -lt "$NEED_FDS" ]]; then
  ulimit -n "$NEED_FDS" 2>/dev/null ||
    die "need $NEED_FDS file descriptors (ulimit -n is $(ulimit -n)); raise the limit or lower --count"
fi

if [[ $BUILD -eq 1 ]]; then
  echo "idle-memory.sh: building (release)" >&2
  cargo build --release --locked --bin pushrelay --example fake_apns --example idle_clients >&2
fi
PUSHRELAY="$ROOT/target/release/pushrelay"
FAKE_APNS="$ROOT/target/release/examples/fake_apns"
CLIENTS="$ROOT/target/release/examples/idle_clients"
for bin in "$PUSHRELAY" "$FAKE_APNS" "$CLIENTS"; do
  [[ -x "$bin" ]] || die "$bin is missing (build it, or drop --no-build)"
done

PIDS=()
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pushrelay-idle.XXXXXX")"
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Resident set of a process and its children (nghttpx forks a worker), in KiB.
rss_kib() {
  local pid=$1 total=0 child
  total=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
  for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
    total=$((total + $(rss_kib "$child")))
  done
  echo "$total"
}

"$PUSHRELAY" ca init --dir "$WORK/ca" >/dev/null
"$PUSHRELAY" ca issue --dir "$WORK/ca" --host api.push.apple.com --name front >/dev/null
cat "$WORK/ca/front.pem" "$WORK/ca/front.key" >"$WORK/ca/front-haproxy.pem"
chmod 600 "$WORK/ca/front-haproxy.pem"
"$FAKE_APNS" --ca-dir "$WORK/ca" --port 0 --threads 1 >"$WORK/origin.out" 2>"$WORK/origin.log" &
PIDS+=($!)
ORIGIN_PORT=""
for ((i = 0; i < 100; i++)); do
  ORIGIN_PORT="$(sed -n 's/^PORT=//p' "$WORK/origin.out" 2>/dev/null | head -n1)"
  [[ -n "$ORIGIN_PORT" ]] && break
  sleep 0.1
done
[[ -n "$ORIGIN_PORT" ]] || die "fake_apns printed no PORT= line within 10s"
HOST="api.push.apple.com"
AUTHORITY="$HOST:$ORIGIN_PORT"

# Opens n idle connections to port; leaves the client running (its stdin a FIFO kept open by fd).
# Starts `n` idle clients against `port` and waits for their READY line: sets OPEN (connections
# open) and FAILED. Runs in this shell, not a subshell: the fifo's writer (in HOLDS) must stay
# open, since the clients hang up when their stdin closes.
open_clients() {
  local port=$1 n=$2 tag=$3 i line
  mkfifo "$WORK/$tag.in"
  "$CLIENTS" --connect "127.0.0.1:$port" --ca "$WORK/ca/ca.pem" --authority "$AUTHORITY" \
    --count "$n" <"$WORK/$tag.in" >"$WORK/$tag.out" 2>"$WORK/$tag.err" &
  PIDS+=($!)
  exec {HOLD}>"$WORK/$tag.in"
  HOLDS+=("$HOLD")
  for ((i = 0; i < 1200; i++)); do
    line="$(cat "$WORK/$tag.out")"
    if [[ "$line" == READY* ]]; then
      read -r _ OPEN FAILED <<<"$line"
      return 0
    fi
    sleep 0.1
  done
  die "$tag: clients not ready after 120s; see $WORK/$tag.err"
}

# Sockets `pid` holds open now (its file descriptors).
open_fds() {
  local pid=$1
  find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l
}

ROWS=()
measure() {
  local name=$1 pid=$2 port=$3 base warm after ready failed fds fds_warm
  HOLDS=()
  base=$(rss_kib "$pid")
  open_clients "$port" "$WARMUP" "$name-warm"
  sleep 1
  warm=$(rss_kib "$pid")
  fds_warm=$(open_fds "$pid")
  open_clients "$port" "$COUNT" "$name-idle"
  ready=$OPEN failed=$FAILED
  [[ "$failed" -eq 0 ]] || echo "idle-memory.sh: $name: $failed of $COUNT connections failed" >&2
  sleep 2
  after=$(rss_kib "$pid")
  # The reading counts only if the connections are still open in the proxy (a proxy may close
  # a few of its own meanwhile: idle upstream connections, say).
  fds=$(open_fds "$pid")
  [[ $((fds - fds_warm)) -ge $((ready * 9 / 10)) ]] ||
    die "$name holds $((fds - fds_warm)) more sockets than before, not the $ready idle connections opened: they were closed before the reading"
  local per
  per=$(awk -v a="$after" -v w="$warm" -v n="$ready" 'BEGIN { printf "%.1f", (a - w) / (n > 0 ? n : 1) }')
  ROWS+=("| $name | $ready | $((base)) | $((warm)) | $((after)) | $per |")
  echo "idle-memory.sh: $name: $per KiB per idle connection ($ready open)" >&2
  for fd in "${HOLDS[@]}"; do exec {fd}>&-; done
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

free_port PORT
cat >"$WORK/pushrelay.yaml" <<EOF
listeners:
  - name: idle-pre
    mode: pre-proxy
    bind: "127.0.0.1:$PORT"
    upstream_port: $ORIGIN_PORT
    tls:
      ca_cert: "$WORK/ca/ca.pem"
      ca_key: "$WORK/ca/ca.key"
    allow_sources: ["127.0.0.0/8"]
destinations:
  - "$AUTHORITY"
upstream:
  extra_roots: ["$WORK/ca/ca.pem"]
  connect_to:
    "$AUTHORITY": "127.0.0.1:$ORIGIN_PORT"
limits:
  max_connections: $((COUNT + WARMUP + 100))
log:
  level: warn
EOF
env -u RUST_LOG PUSHRELAY_WORKERS="$THREADS" "$PUSHRELAY" serve --config "$WORK/pushrelay.yaml" \
  >"$WORK/pushrelay.log" 2>&1 &
RELAY_PID=$!
PIDS+=("$RELAY_PID")
wait_port "$RELAY_PID" "$PORT" pushrelay
measure pushrelay "$RELAY_PID" "$PORT"

if [[ $PEERS -eq 1 ]] && command -v nghttpx >/dev/null 2>&1; then
  free_port PORT
  nghttpx --conf=/dev/null --single-process --workers="$THREADS" --frontend="127.0.0.1,$PORT" \
    --backend="127.0.0.1,$ORIGIN_PORT;;proto=h2;tls;sni=$HOST" --cacert="$WORK/ca/ca.pem" \
    --no-via --no-ocsp --log-level=WARN --errorlog-file="$WORK/nghttpx.log" \
    --worker-frontend-connections=0 "$WORK/ca/front.key" "$WORK/ca/front.pem" >>"$WORK/nghttpx.log" 2>&1 &
  NG_PID=$!
  PIDS+=("$NG_PID")
  wait_port "$NG_PID" "$PORT" nghttpx
  measure nghttpx "$NG_PID" "$PORT"
elif [[ $PEERS -eq 1 ]]; then
  echo "idle-memory.sh: nghttpx not found, skipping it (apt-get install nghttp2-proxy)" >&2
fi

if [[ $PEERS -eq 1 ]] && command -v haproxy >/dev/null 2>&1; then
  free_port PORT
  cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread $THREADS
  maxconn $((COUNT + WARMUP + 100))
  log stderr format short local0 warning
defaults
  mode http
  log global
  timeout connect 5s
  timeout client 300s
  timeout server 300s
  timeout http-keep-alive 300s
frontend pre
  bind 127.0.0.1:$PORT ssl crt $WORK/ca/front-haproxy.pem alpn h2,http/1.1
  default_backend origin
backend origin
  server apns 127.0.0.1:$ORIGIN_PORT ssl verify required ca-file $WORK/ca/ca.pem sni str($HOST) alpn h2
EOF
  haproxy -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
  HA_PID=$!
  PIDS+=("$HA_PID")
  wait_port "$HA_PID" "$PORT" haproxy
  measure haproxy "$HA_PID" "$PORT"
elif [[ $PEERS -eq 1 ]]; then
  echo "idle-memory.sh: haproxy not found, skipping it (apt-get install haproxy)" >&2
fi

{
  echo "Idle TLS + HTTP/2 client connections ($COUNT after $WARMUP warm-up, $THREADS worker thread(s), one push each)"
  echo
  echo "| proxy | connections | RSS at start KiB | after warm-up KiB | with idle connections KiB | KiB per idle connection |"
  echo "|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
} | tee "${OUT:-/dev/null}"
