#!/usr/bin/env bash
# Benchmarks pushrelay against a fake APNs origin on loopback, next to nghttpx and HAProxy in the same
# two roles when they are installed, and prints a markdown report (throughput, p50/p99 latency, the
# proxy's CPU time per request, and the p99 it adds at half of pushrelay's peak).
#
# Only 127.0.0.1 is used. Every process this script starts is killed by PID when it exits.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: scripts/bench.sh [options]

Builds pushrelay and the fake APNs origin (examples/fake_apns.rs) in release mode, starts them on
127.0.0.1 with a throwaway CA, and drives them with h2load. Cases, run interleaved (every case once
per round, the order rotated each round):

  direct            h2load -> fake APNs (HTTP/2 + TLS): the baseline
  direct-h1         h2load --h1 -> fake APNs (HTTP/1.1 + TLS, which Apple does not offer): the
                    half-load baseline for post-proxy, with the same client shape
  pre:  pushrelay   h2load (TLS + HTTP/2, SNI api.push.apple.com) -> pushrelay pre-proxy -> origin
                    (upstream.http2_client: h2, the h2 crate)
  pre:  pushrelay-native
                    the same with upstream.http2_client: native (pushrelay's own codec), a
                    second pushrelay process                                      [unless --no-native]
  pre:  nghttpx     the same through nghttpx (TLS h2 frontend, h2 + TLS backend)      [if installed]
  pre:  haproxy     the same through HAProxy (bind ssl alpn h2, server ssl alpn h2)   [if installed]
  post: pushrelay   h2load --h1 (plain HTTP/1.1) -> pushrelay post-proxy -> origin (HTTP/2 + TLS)
  post: pushrelay-native  the same on the native client                           [unless --no-native]
  post: nghttpx     the same through nghttpx (plain HTTP/1.1 frontend)                [if installed]
  post: haproxy     the same through HAProxy (plain http frontend)                    [if installed]
  chain: pushrelay  h2load (TLS + HTTP/2) -> inside pushrelay (pre-proxy, upstream.relay) --HTTP/1.1
                    over TLS--> DMZ pushrelay (post-proxy, relay secret) -> origin: a relay chain
                    without the proxy in between; CPU counts both relays

The forward-proxy door (h2load cannot CONNECT) is driven by examples/connect_load.rs, which does
what MPNS does with HTTPS_PROXY, in rounds of its own after the h2load rounds:

  door: pre         connect_load -> pushrelay pre-proxy (TLS + HTTP/2 straight away): the baseline
  door: forward     connect_load -> CONNECT -> pushrelay forward-proxy (TLS + HTTP/2 in the tunnel)
  tunnel: full      new tunnels (CONNECT + full TLS handshake + an HTTP/2 PING), one after another
  tunnel: resumed   the same with TLS session resumption (tickets)

Each request is a POST /3/device/<64 hex> with apns-topic and a 300-byte JSON body. After the rounds
at full load, more rounds run every case at half of pushrelay's measured peak in that role
(h2load --rps) to show the p99 each proxy adds over direct at a moderate load. A last round counts
each proxy's system calls per request with perf stat (syscall tracepoints), when perf can.

Instructions per push: each proxy runs once more, alone and with one worker thread, under
valgrind --tool=callgrind; per role, --callgrind-requests pushes (h2load as above) are counted
after a warm-up of a fifth as many, with instrumentation switched on only for them
(callgrind_control -i on). The count is user-space instructions only (no kernel, no waiting),
repeatable to about 1 %, and the same harness for pushrelay, nghttpx and HAProxy.

Options:
  --rounds N        rounds at full load (default 3)
  --requests N      requests per run (default 20000)
  --clients N       h2load connections for HTTP/2 cases (default 10)
  --streams N       concurrent streams per HTTP/2 connection (default 10)
  --h1-clients N    h2load connections for HTTP/1.1 cases; h2load sends one request at a time per
                    HTTP/1.1 connection when posting a body, so the default is clients x streams,
                    the same number of requests in flight (default 100)
  --threads N       worker threads for each proxy (default: nproc)
  --run-timeout S   bound on one h2load run, in seconds (default 120)
  --half-rounds N   rounds at half load (default: as --rounds)
  --no-half-load    skip the half-load rounds
  --no-callgrind    skip the instruction-count round (it needs valgrind: apt-get install valgrind)
  --callgrind-requests N
                    pushes counted per proxy and role under callgrind (default 5000)
  --no-syscalls     skip the syscall-count round (it needs perf with syscall tracepoints; Debian:
                    apt-get install linux-perf, and root or kernel.perf_event_paranoid <= 1)
  --no-peers        benchmark pushrelay only, even if nghttpx / HAProxy are installed
  --no-native       no pushrelay-native cases (upstream.http2_client: native)
  --no-forward      skip the forward-proxy door rounds
  --tunnels N       new tunnels per tunnel run (default 2000)
  --no-chain        skip the relay-chain case
  --jwt             every push also carries "authorization: bearer <JWT>" (a made-up ES256-shaped
                    token, the same for every push), as token-auth APNs clients send
  --no-build        use the binaries already in target/release
  --pushrelay PATH  benchmark this pushrelay binary instead of target/release/pushrelay (to compare
                    builds; fake_apns still comes from target/release)
  --out FILE        also write the report to FILE (nothing is written unless given)
  --keep DIR        keep logs, configs and h2load per-request logs in DIR, a new or empty
                    directory (default: a temporary directory, removed on exit)
  -h, --help        show this help

Needs: h2load (Debian/Ubuntu: apt-get install nghttp2-client), cargo. Optional peers: nghttpx
(apt-get install nghttp2-proxy), haproxy (apt-get install haproxy). The script installs nothing.
EOF
}

ROUNDS=3
REQUESTS=20000
CLIENTS=10
STREAMS=10
H1_CLIENTS=""
THREADS="$(nproc)"
RUN_TIMEOUT=120
HALF_LOAD=1
HALF_ROUNDS=""
SYSCALLS=1
CALLGRIND=1
CG_REQUESTS=5000
PEERS=1
NATIVE=1
FORWARD=1
TUNNELS=2000
CHAIN=1
JWT=0
BUILD=1
PUSHRELAY=""
OUT=""
KEEP=""

SCRIPT=bench.sh
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

need_value() {
  [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) need_value "$@"; positive "$1" "$2"; ROUNDS="$2"; shift 2 ;;
    --requests) need_value "$@"; positive "$1" "$2"; REQUESTS="$2"; shift 2 ;;
    --clients) need_value "$@"; positive "$1" "$2"; CLIENTS="$2"; shift 2 ;;
    --streams) need_value "$@"; positive "$1" "$2"; STREAMS="$2"; shift 2 ;;
    --h1-clients) need_value "$@"; positive "$1" "$2"; H1_CLIENTS="$2"; shift 2 ;;
    --threads) need_value "$@"; positive "$1" "$2"; THREADS="$2"; shift 2 ;;
    --run-timeout) need_value "$@"; positive "$1" "$2"; RUN_TIMEOUT="$2"; shift 2 ;;
    --half-rounds) need_value "$@"; positive "$1" "$2"; HALF_ROUNDS="$2"; shift 2 ;;
    --no-half-load) HALF_LOAD=0; shift ;;
    --no-syscalls) SYSCALLS=0; shift ;;
    --no-callgrind) CALLGRIND=0; shift ;;
    --callgrind-requests) need_value "$@"; positive "$1" "$2"; CG_REQUESTS="$2"; shift 2 ;;
    --no-peers) PEERS=0; shift ;;
    --no-native) NATIVE=0; shift ;;
    --no-forward) FORWARD=0; shift ;;
    --tunnels) need_value "$@"; positive "$1" "$2"; TUNNELS="$2"; shift 2 ;;
    --no-chain) CHAIN=0; shift ;;
    --jwt) JWT=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --pushrelay) need_value "$@"; PUSHRELAY="$2"; shift 2 ;;
    --out) need_value "$@"; OUT="$2"; shift 2 ;;
    --keep) need_value "$@"; KEEP="$2"; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
done
H1_CLIENTS="${H1_CLIENTS:-$((CLIENTS * STREAMS))}"
HALF_ROUNDS="${HALF_ROUNDS:-$ROUNDS}"

# Paths given on the command line are relative to where the script was started.
absolute() {
  [[ -z "$1" || "$1" == /* ]] && echo "$1" || echo "$PWD/$1"
}
OUT="$(absolute "$OUT")"
KEEP="$(absolute "$KEEP")"
PUSHRELAY="$(absolute "$PUSHRELAY")"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# --- tools -----------------------------------------------------------------------------------------

command -v h2load >/dev/null 2>&1 ||
  die "h2load not found: install it (Debian/Ubuntu: apt-get install nghttp2-client)"
if [[ $BUILD -eq 1 ]]; then
  command -v cargo >/dev/null 2>&1 || die "cargo not found (or use --no-build with built binaries)"
fi
HAVE_NGHTTPX=0
HAVE_HAPROXY=0
if [[ $PEERS -eq 1 ]]; then
  if command -v nghttpx >/dev/null 2>&1; then
    HAVE_NGHTTPX=1
  else
    echo "bench.sh: nghttpx not found, skipping it (Debian/Ubuntu: apt-get install nghttp2-proxy)" >&2
  fi
  if command -v haproxy >/dev/null 2>&1; then
    HAVE_HAPROXY=1
  else
    echo "bench.sh: haproxy not found, skipping it (Debian/Ubuntu: apt-get install haproxy)" >&2
  fi
fi

SYS_EVENTS="raw_syscalls:sys_enter"
for e in write writev sendto sendmsg sendmmsg read readv recvfrom recvmsg epoll_wait epoll_pwait futex; do
  SYS_EVENTS+=",syscalls:sys_enter_$e"
done
SYSCALLS_WHY=""
if [[ $SYSCALLS -eq 1 ]]; then
  if ! command -v perf >/dev/null 2>&1; then
    SYSCALLS=0
    SYSCALLS_WHY="perf not found (Debian/Ubuntu: apt-get install linux-perf)"
  elif ! perf stat -x, -e "$SYS_EVENTS" -- true >/dev/null 2>&1; then
    SYSCALLS=0
    SYSCALLS_WHY="perf cannot count syscall tracepoints here (needs root or kernel.perf_event_paranoid <= 1, and tracefs)"
  fi
  [[ -z "$SYSCALLS_WHY" ]] || echo "bench.sh: skipping the syscall round: $SYSCALLS_WHY" >&2
fi

CALLGRIND_WHY=""
if [[ $CALLGRIND -eq 1 ]]; then
  if ! command -v valgrind >/dev/null 2>&1 || ! command -v callgrind_control >/dev/null 2>&1; then
    CALLGRIND=0
    CALLGRIND_WHY="valgrind / callgrind_control not found (Debian/Ubuntu: apt-get install valgrind)"
    echo "bench.sh: skipping the instruction-count round: $CALLGRIND_WHY" >&2
  fi
fi

if [[ $BUILD -eq 1 ]]; then
  echo "bench.sh: building (release)" >&2
  cargo build --release --locked --bin pushrelay --example fake_apns --example connect_load >&2
fi
PUSHRELAY="${PUSHRELAY:-$ROOT/target/release/pushrelay}"
FAKE_APNS="$ROOT/target/release/examples/fake_apns"
CONNECT_LOAD="$ROOT/target/release/examples/connect_load"
[[ $FORWARD -eq 0 || -x "$CONNECT_LOAD" ]] || die "$CONNECT_LOAD is missing (build it, drop --no-build, or --no-forward)"
[[ -x "$PUSHRELAY" ]] || die "$PUSHRELAY is missing (build it, or drop --no-build)"
[[ -x "$FAKE_APNS" ]] || die "$FAKE_APNS is missing (build it, or drop --no-build)"

# --- work dir and clean-up -------------------------------------------------------------------------

PIDS=()
if [[ -n "$KEEP" ]]; then
  if [[ -e "$KEEP" && -n "$(ls -A "$KEEP" 2>/dev/null)" ]]; then
    die "--keep $KEEP: the directory is not empty"
  fi
  mkdir -p "$KEEP"
  WORK="$(cd "$KEEP" && pwd)"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/pushrelay-bench.XXXXXX")"
fi

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  if [[ -z "$KEEP" ]]; then
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# CPU clock ticks used so far by a process and its descendants: "user system".
cpu_ticks() {
  local pid=$1 usr=0 sys=0 u s child
  [[ -r /proc/$pid/stat ]] || { echo "0 0"; return; }
  # Fields after "pid (comm) ": utime and stime are the 12th and 13th.
  read -r u s < <(awk '{ sub(/^.*\) /, ""); print $12, $13 }' "/proc/$pid/stat" 2>/dev/null || echo "0 0")
  usr=$((usr + ${u:-0}))
  sys=$((sys + ${s:-0}))
  # shellcheck disable=SC2013 # the children files hold space-separated PIDs
  for child in $(cat /proc/"$pid"/task/*/children 2>/dev/null); do
    read -r u s < <(cpu_ticks "$child")
    usr=$((usr + u))
    sys=$((sys + s))
  done
  echo "$usr $sys"
}

CLK_TCK="$(getconf CLK_TCK)"

# --- PKI, origin, relays ---------------------------------------------------------------------------

echo "bench.sh: work directory $WORK" >&2
"$PUSHRELAY" ca init --dir "$WORK/ca" >/dev/null
"$PUSHRELAY" ca issue --dir "$WORK/ca" --host api.push.apple.com --name front >/dev/null
cat "$WORK/ca/front.pem" "$WORK/ca/front.key" >"$WORK/ca/front-haproxy.pem"
chmod 600 "$WORK/ca/front-haproxy.pem"

"$FAKE_APNS" --ca-dir "$WORK/ca" --port 0 >"$WORK/origin.out" 2>"$WORK/origin.log" &
ORIGIN_PID=$!
PIDS+=("$ORIGIN_PID")
ORIGIN_PORT=""
for ((i = 0; i < 100; i++)); do
  ORIGIN_PORT="$(sed -n 's/^PORT=//p' "$WORK/origin.out" 2>/dev/null | head -n1)"
  [[ -n "$ORIGIN_PORT" ]] && break
  kill -0 "$ORIGIN_PID" 2>/dev/null || die "fake_apns exited; see $WORK/origin.log"
  sleep 0.1
done
[[ -n "$ORIGIN_PORT" ]] || die "fake_apns printed no PORT= line within 10s"
HOST="api.push.apple.com"
AUTHORITY="$HOST:$ORIGIN_PORT"

# Each start_* function starts one proxy in the background (behind an optional wrapper command,
# e.g. valgrind) and leaves its PID in STARTED_PID; the caller waits for its ports.
STARTED_PID=""

# start_pushrelay NAME THREADS HTTP2_CLIENT PRE POST FWD [WRAPPER...]
start_pushrelay() {
  local name=$1 threads=$2 client=$3 pre=$4 post=$5 fwd=$6
  shift 6
  cat >"$WORK/$name.yaml" <<EOF
listeners:
  - name: bench-pre
    mode: pre-proxy
    bind: "127.0.0.1:$pre"
    upstream_port: $ORIGIN_PORT
    tls:
      ca_cert: "$WORK/ca/ca.pem"
      ca_key: "$WORK/ca/ca.key"
    allow_sources: ["127.0.0.0/8"]
  - name: bench-post
    mode: post-proxy
    bind: "127.0.0.1:$post"
    upstream_port: $ORIGIN_PORT
    allow_sources: ["127.0.0.0/8"]
  - name: bench-fwd
    mode: forward-proxy
    bind: "127.0.0.1:$fwd"
    tls:
      ca_cert: "$WORK/ca/ca.pem"
      ca_key: "$WORK/ca/ca.key"
    allow_sources: ["127.0.0.0/8"]
destinations:
  - "$AUTHORITY"
upstream:
  http2_client: $client
  extra_roots: ["$WORK/ca/ca.pem"]
  connect_to:
    "$AUTHORITY": "127.0.0.1:$ORIGIN_PORT"
log:
  level: warn
EOF
  # RUST_LOG would win over log.level; per-request info lines would dominate the measurement.
  env -u RUST_LOG PUSHRELAY_WORKERS="$threads" "$@" "$PUSHRELAY" serve --config "$WORK/$name.yaml" \
    >"$WORK/$name.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

# start_nghttpx NAME THREADS PRE POST [WRAPPER...]
start_nghttpx() {
  local name=$1 threads=$2 pre=$3 post=$4
  shift 4
  "$@" nghttpx --conf=/dev/null --single-process --workers="$threads" \
    --frontend="127.0.0.1,$pre" --frontend="127.0.0.1,$post;no-tls" \
    --backend="127.0.0.1,$ORIGIN_PORT;;proto=h2;tls;sni=$HOST" --cacert="$WORK/ca/ca.pem" \
    --no-via --no-ocsp --log-level=WARN --errorlog-file="$WORK/$name.log" \
    "$WORK/ca/front.key" "$WORK/ca/front.pem" >>"$WORK/$name.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

# start_haproxy NAME THREADS PRE POST [WRAPPER...]
start_haproxy() {
  local name=$1 threads=$2 pre=$3 post=$4
  shift 4
  cat >"$WORK/$name.cfg" <<EOF
global
  nbthread $threads
  maxconn 4096
  log stderr format short local0 warning

defaults
  mode http
  log global
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always

frontend pre
  bind 127.0.0.1:$pre ssl crt $WORK/ca/front-haproxy.pem alpn h2,http/1.1
  default_backend apns

frontend post
  bind 127.0.0.1:$post
  # HTTP/2 answers have no reason phrase, and HAProxy sends none over HTTP/1.1 ("HTTP/1.1 200 "),
  # which h2load counts as status 0; pushrelay and nghttpx send "200 OK".
  http-response set-status 200 reason OK if { status 200 }
  default_backend apns

backend apns
  server origin 127.0.0.1:$ORIGIN_PORT ssl verify required ca-file $WORK/ca/ca.pem sni str($HOST) alpn h2
EOF
  "$@" haproxy -db -f "$WORK/$name.cfg" >"$WORK/$name.log" 2>&1 &
  STARTED_PID=$!
  PIDS+=("$STARTED_PID")
}

# start_proxy PROXY NAME THREADS PRE POST [WRAPPER...]: any proxy of PROXIES.
start_proxy() {
  local proxy=$1 name=$2 threads=$3 pre=$4 post=$5 fwd
  shift 5
  case "$proxy" in
    pushrelay) free_port fwd; start_pushrelay "$name" "$threads" h2 "$pre" "$post" "$fwd" "$@" ;;
    pushrelay-native) free_port fwd; start_pushrelay "$name" "$threads" native "$pre" "$post" "$fwd" "$@" ;;
    nghttpx) start_nghttpx "$name" "$threads" "$pre" "$post" "$@" ;;
    haproxy) start_haproxy "$name" "$threads" "$pre" "$post" "$@" ;;
    *) die "unknown proxy $proxy" ;;
  esac
}

free_port RELAY_PRE
free_port RELAY_POST
free_port RELAY_FWD
start_pushrelay pushrelay "$THREADS" h2 "$RELAY_PRE" "$RELAY_POST" "$RELAY_FWD"
RELAY_PID=$STARTED_PID
wait_port "$RELAY_PID" "$RELAY_PRE" pushrelay
wait_port "$RELAY_PID" "$RELAY_POST" pushrelay
wait_port "$RELAY_PID" "$RELAY_FWD" pushrelay

# The relay chain: a DMZ relay (post-proxy over TLS, a certificate for localhost from a CA of its
# own, the shared secret) in front of the origin, and an inside relay whose upstream.relay it is.
if [[ $CHAIN -eq 1 ]]; then
  "$PUSHRELAY" ca init --dir "$WORK/dmz-ca" --permit localhost >/dev/null
  "$PUSHRELAY" ca issue --dir "$WORK/dmz-ca" --host localhost --name dmz >/dev/null
  head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$WORK/relay.secret"
  chmod 600 "$WORK/relay.secret"
  free_port CHAIN_DMZ
  free_port CHAIN_PRE
  cat >"$WORK/dmz.yaml" <<EOF
listeners:
  - name: bench-dmz
    mode: post-proxy
    bind: "127.0.0.1:$CHAIN_DMZ"
    upstream_port: $ORIGIN_PORT
    tls: {cert: "$WORK/dmz-ca/dmz.pem", key: "$WORK/dmz-ca/dmz.key"}
    relay_secret_file: "$WORK/relay.secret"
    allow_sources: ["127.0.0.0/8"]
destinations:
  - "$AUTHORITY"
upstream:
  extra_roots: ["$WORK/ca/ca.pem"]
  connect_to:
    "$AUTHORITY": "127.0.0.1:$ORIGIN_PORT"
log:
  level: warn
EOF
  cat >"$WORK/inside.yaml" <<EOF
listeners:
  - name: bench-inside
    mode: pre-proxy
    bind: "127.0.0.1:$CHAIN_PRE"
    upstream_port: $ORIGIN_PORT
    tls:
      ca_cert: "$WORK/ca/ca.pem"
      ca_key: "$WORK/ca/ca.key"
    allow_sources: ["127.0.0.0/8"]
destinations:
  - "$AUTHORITY"
upstream:
  extra_roots: ["$WORK/dmz-ca/ca.pem"]
  relay:
    url: "https://localhost:$CHAIN_DMZ"
    secret_file: "$WORK/relay.secret"
    max_connections: 256
log:
  level: warn
EOF
  env -u RUST_LOG PUSHRELAY_WORKERS="$THREADS" "$PUSHRELAY" serve --config "$WORK/dmz.yaml" \
    >"$WORK/dmz.log" 2>&1 &
  DMZ_PID=$!
  PIDS+=("$DMZ_PID")
  env -u RUST_LOG PUSHRELAY_WORKERS="$THREADS" "$PUSHRELAY" serve --config "$WORK/inside.yaml" \
    >"$WORK/inside.log" 2>&1 &
  INSIDE_PID=$!
  PIDS+=("$INSIDE_PID")
  wait_port "$DMZ_PID" "$CHAIN_DMZ" dmz
  wait_port "$INSIDE_PID" "$CHAIN_PRE" inside
fi

declare -A PROXY_PID=([pushrelay]="$RELAY_PID")
declare -A PRE_PORT=([pushrelay]="$RELAY_PRE")
declare -A POST_PORT=([pushrelay]="$RELAY_POST")
PROXIES=(pushrelay)

HAVE_PUSHRELAY_NATIVE=$NATIVE
for peer in pushrelay-native nghttpx haproxy; do
  have="HAVE_${peer^^}"
  have="${have//-/_}"
  [[ ${!have} -eq 1 ]] || continue
  free_port pre
  free_port post
  start_proxy "$peer" "$peer" "$THREADS" "$pre" "$post"
  wait_port "$STARTED_PID" "$pre" "$peer"
  wait_port "$STARTED_PID" "$post" "$peer"
  PROXY_PID[$peer]="$STARTED_PID"
  PRE_PORT[$peer]="$pre"
  POST_PORT[$peer]="$post"
  PROXIES+=("$peer")
done

# --- runs ------------------------------------------------------------------------------------------

TOKEN="5f3c2a1e9b8d7c6f5e4d3c2b1a0f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a29"
PAYLOAD="$WORK/payload.json"
# A 300-byte APNs payload.
body='{"aps":{"alert":{"title":"Benchmark","body":"A push of three hundred bytes"},"sound":"default","badge":1},"id":"'
pad=$((300 - ${#body} - 2))
printf '%s%s"}' "$body" "$(head -c "$pad" /dev/zero | tr '\0' 'x')" >"$PAYLOAD"
[[ $(wc -c <"$PAYLOAD") -eq 300 ]] || die "payload is not 300 bytes"
PATH_Q="/3/device/$TOKEN"
AUTH=()
if [[ $JWT -eq 1 ]]; then
  b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
  jwt="$(printf '{"alg":"ES256","kid":"BENCHKEY01"}' | b64url).$(printf '{"iss":"BENCHTEAM1","iat":1764570000}' | b64url).$(head -c 64 /dev/zero | tr '\0' 's' | b64url)"
  AUTH=(-H "authorization: bearer $jwt")
fi

CASES=(direct)
for p in "${PROXIES[@]}"; do CASES+=("pre:$p"); done
for p in "${PROXIES[@]}"; do CASES+=("post:$p"); done
[[ $CHAIN -eq 1 ]] && CASES+=("chain:pushrelay")

# h2load arguments for a case (without -n / --rps / --log-file).
case_args() {
  local c=$1 role=${1%%:*} proxy=${1#*:}
  case "$role" in
    direct)
      echo "-c $CLIENTS -m $STREAMS --connect-to=127.0.0.1:$ORIGIN_PORT https://$AUTHORITY$PATH_Q" ;;
    direct-h1)
      echo "--h1 -c $H1_CLIENTS --connect-to=127.0.0.1:$ORIGIN_PORT https://$AUTHORITY$PATH_Q" ;;
    pre)
      echo "-c $CLIENTS -m $STREAMS --connect-to=127.0.0.1:${PORT_OVERRIDE:-${PRE_PORT[$proxy]}} https://$AUTHORITY$PATH_Q" ;;
    chain)
      echo "-c $CLIENTS -m $STREAMS --connect-to=127.0.0.1:$CHAIN_PRE https://$AUTHORITY$PATH_Q" ;;
    post)
      # The Host header names the destination, as a legacy proxy would send it.
      echo "--h1 -c $H1_CLIENTS --connect-to=127.0.0.1:${PORT_OVERRIDE:-${POST_PORT[$proxy]}} http://$AUTHORITY$PATH_Q" ;;
    *) die "unknown case $c" ;;
  esac
}

case_clients() {
  [[ ${1%%:*} == post || $1 == direct-h1 ]] && echo "$H1_CLIENTS" || echo "$CLIENTS"
}

# The processes whose CPU a case costs (the chain: both relays).
case_pid() {
  [[ -n "${PID_OVERRIDE:-}" ]] && { echo "$PID_OVERRIDE"; return; }
  case "$1" in
    direct*) echo "$ORIGIN_PID" ;;
    chain:*) echo "$INSIDE_PID $DMZ_PID" ;;
    *) echo "${PROXY_PID[${1#*:}]}" ;;
  esac
}

# cpu_ticks summed over several PIDs: "user system".
cpu_ticks_of() {
  local usr=0 sys=0 u s p
  for p in "$@"; do
    read -r u s < <(cpu_ticks "$p")
    usr=$((usr + u))
    sys=$((sys + s))
  done
  echo "$usr $sys"
}

# Microseconds per answer from tick deltas: per_req TICKS ANSWERS.
per_req() {
  awk -v d="$1" -v n="${2:-0}" -v hz="$CLK_TCK" \
    'BEGIN { if (n > 0) printf "%.1f", d * 1e6 / hz / n; else print "NA" }'
}

# The half-load baseline for a role: the origin with the same client shape.
baseline_of() {
  [[ $1 == post ]] && echo direct-h1 || echo direct
}

# Results, one line per run: case round reqps p50_us p99_us cpu_us_per_req ok failed
# usr_us_per_req sys_us_per_req
RESULTS="$WORK/results.tsv"
: >"$RESULTS"

# run_case CASE ROUND [RPS_TOTAL]
run_case() {
  local c=$1 round=$2 rps=${3:-} pid log out u0 s0 u1 s1 ok failed reqps p50 p99 cpu usr sys extra=() perf_pid=""
  pid="$(case_pid "$c")"
  log="$WORK/h2load.${c/:/-}.$round.tsv"
  out="$WORK/h2load.${c/:/-}.$round.out"
  if [[ -n "$rps" ]]; then
    extra=(--rps="$(((rps + $(case_clients "$c") - 1) / $(case_clients "$c")))")
  fi
  if [[ -n "${SYS_ROUND:-}" ]]; then
    perf stat -x, -o "$WORK/perf-stat.${c/:/-}.txt" -e "$SYS_EVENTS" -p "${pid// /,}" >/dev/null 2>&1 &
    perf_pid=$!
    PIDS+=("$perf_pid")
    sleep 0.5
  fi
  # shellcheck disable=SC2086 # one or more PIDs
  read -r u0 s0 < <(cpu_ticks_of $pid)
  # shellcheck disable=SC2046 # case_args is split on purpose
  if ! timeout "$RUN_TIMEOUT" h2load -t 1 -n "$REQUESTS" "${extra[@]}" -d "$PAYLOAD" \
    -H 'apns-topic: com.example.bench' -H 'apns-push-type: alert' ${AUTH[@]+"${AUTH[@]}"} \
    --log-file="$log" $(case_args "$c") >"$out" 2>&1; then
    echo "bench.sh: h2load failed or timed out for $c (round $round); see $out" >&2
  fi
  # shellcheck disable=SC2086 # one or more PIDs
  read -r u1 s1 < <(cpu_ticks_of $pid)
  if [[ -n "$perf_pid" ]]; then
    kill -INT "$perf_pid" 2>/dev/null || true
    wait "$perf_pid" 2>/dev/null || true
  fi
  reqps="$(sed -n 's/^finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$out" | head -n1)"
  ok="$(sed -n 's/^status codes: \([0-9]*\) 2xx.*/\1/p' "$out" | head -n1)"
  failed="$(sed -n 's/^requests: .* \([0-9]*\) failed.*/\1/p' "$out" | head -n1)"
  read -r p50 p99 < <(awk -F'\t' '$2 == 200 { print $3 }' "$log" 2>/dev/null | sort -n |
    awk '{ v[NR] = $1 } END {
      if (NR == 0) { print "NA NA"; exit }
      i50 = int(NR * 0.50 + 0.999999); i99 = int(NR * 0.99 + 0.999999)
      print v[i50], v[i99] }')
  cpu="$(per_req $((u1 + s1 - u0 - s0)) "$ok")"
  usr="$(per_req $((u1 - u0)) "$ok")"
  sys="$(per_req $((s1 - s0)) "$ok")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$round" "${reqps:-NA}" "$p50" "$p99" "$cpu" \
    "${ok:-0}" "${failed:-NA}" "$usr" "$sys" >>"$RESULTS"
  printf 'bench.sh: %-16s round %-5s %10s req/s  p50 %6s us  p99 %6s us  cpu %6s us/req (usr %s sys %s)  2xx %s\n' \
    "$c" "$round" "${reqps:-NA}" "$p50" "$p99" "$cpu" "$usr" "$sys" "${ok:-0}" >&2
}

echo "bench.sh: warming up (connections, TLS sessions, pools)" >&2
SAVED_REQUESTS=$REQUESTS
REQUESTS=2000
for c in "${CASES[@]}"; do run_case "$c" warmup; done
[[ $HALF_LOAD -eq 1 ]] && run_case direct-h1 warmup
REQUESTS=$SAVED_REQUESTS

n=${#CASES[@]}
for ((r = 1; r <= ROUNDS; r++)); do
  for ((k = 0; k < n; k++)); do
    run_case "${CASES[$(((k + r - 1) % n))]}" "$r"
  done
done

# Median and range of a column (3 = req/s, 4 = p50, 5 = p99, 6 = cpu) over the runs of a case whose
# round matches $3 (default: the full-load rounds).
column() {
  awk -F'\t' -v c="$1" -v col="$2" -v r="${3:-^[0-9]+\$}" \
    '$1 == c && $2 ~ r && $col != "NA" { print $col }' "$RESULTS"
}
median() {
  column "$@" | sort -g | awk '{ v[NR] = $1 } END {
      if (NR == 0) { print "NA"; exit }
      if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
spread() {
  column "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END {
      if (NR == 0) print "NA"; else printf "%.0f–%.0f", lo, hi }'
}
failures() {
  awk -F'\t' -v c="$1" -v want="$REQUESTS" '$1 == c && $2 ~ /^[0-9]+$/ && $7 != want { bad++ }
    END { print bad + 0 }' "$RESULTS"
}
ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (a == "NA" || b == "NA" || a == "" || b == "" || b == 0) print "–"; else printf "%.2f", a / b }'
}
ms() {
  awk -v v="$1" 'BEGIN { if (v == "NA" || v == "") print "NA"; else printf "%.2f", v / 1000 }'
}

if [[ $HALF_LOAD -eq 1 ]]; then
  declare -A HALF_RATE=()
  for role in pre post chain; do
    peak="$(median "$role:pushrelay" 3)"
    if [[ "$peak" == NA ]]; then
      continue
    fi
    HALF_RATE[$role]="$(awk -v p="$peak" 'BEGIN { printf "%d", p / 2 }')"
  done
  for ((r = 1; r <= HALF_ROUNDS; r++)); do
    for role in pre post chain; do
      rate="${HALF_RATE[$role]:-}"
      [[ -n "$rate" ]] || continue
      half_cases=("$(baseline_of "$role")")
      if [[ $role == chain ]]; then
        # The chain against pre-proxy straight to the origin, at the same offered rate.
        half_cases+=("chain:pushrelay" "pre:pushrelay")
      else
        for p in "${PROXIES[@]}"; do half_cases+=("$role:$p"); done
      fi
      m=${#half_cases[@]}
      for ((k = 0; k < m; k++)); do
        run_case "${half_cases[$(((k + r - 1) % m))]}" "h-$role-$r" "$rate"
      done
    done
  done
fi

# One more round with perf stat counting the serving process's system calls.
if [[ $SYSCALLS -eq 1 ]]; then
  SYS_ROUND=1
  for c in "${CASES[@]}"; do run_case "$c" sys; done
  SYS_ROUND=""
fi

# --- instructions per push (callgrind) -------------------------------------------------------------

# Results, one line per proxy and role: proxy role instructions pushes
CG_RESULTS="$WORK/callgrind.tsv"
: >"$CG_RESULTS"

# The instruction total of the newest callgrind dump of $1 (files $1.N, or $1 itself).
callgrind_total() {
  local f
  f="$(ls -1v "$1".* "$1" 2>/dev/null | tail -n1)"
  [[ -n "$f" ]] || { echo NA; return; }
  awk '/^(summary|totals):/ { v = $2 } END { print (v == "" ? "NA" : v) }' "$f"
}

callgrind_round() {
  local proxy pre post pid role out n total
  for proxy in "${PROXIES[@]}"; do
    free_port pre
    free_port post
    out="$WORK/callgrind.$proxy.out"
    start_proxy "$proxy" "cg-$proxy" 1 "$pre" "$post" \
      valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out"
    pid=$STARTED_PID
    wait_port "$pid" "$pre" "cg-$proxy" 600
    wait_port "$pid" "$post" "cg-$proxy" 600
    for role in pre post; do
      PID_OVERRIDE="$pid"
      PORT_OVERRIDE=$([[ $role == pre ]] && echo "$pre" || echo "$post")
      REQUESTS=$(((CG_REQUESTS + 4) / 5))
      run_case "$role:$proxy" "cgw"
      callgrind_control -z "$pid" >/dev/null 2>&1 || true
      callgrind_control -i on "$pid" >/dev/null 2>&1 ||
        echo "bench.sh: callgrind_control -i on failed for $proxy" >&2
      REQUESTS=$CG_REQUESTS
      run_case "$role:$proxy" "cg"
      callgrind_control -i off "$pid" >/dev/null 2>&1 || true
      callgrind_control -d "$pid" >/dev/null 2>&1 ||
        echo "bench.sh: callgrind_control -d failed for $proxy" >&2
      n="$(awk -F'\t' -v c="$role:$proxy" '$1 == c && $2 == "cg" { v = $7 } END { print v + 0 }' "$RESULTS")"
      total="$(callgrind_total "$out")"
      printf '%s\t%s\t%s\t%s\n' "$proxy" "$role" "$total" "$n" >>"$CG_RESULTS"
      echo "bench.sh: callgrind $proxy $role: $total instructions for $n pushes" >&2
      PID_OVERRIDE=""
      PORT_OVERRIDE=""
      REQUESTS=$SAVED_REQUESTS
      # Each dump holds what ran since the one before: the next role starts from zero.
    done
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
}

[[ $CALLGRIND -eq 1 ]] && callgrind_round

# Instructions per push for a proxy and role.
instructions() {
  awk -F'\t' -v p="$1" -v r="$2" '$1 == p && $2 == r {
      if ($3 == "NA" || $4 == 0) print "NA"; else printf "%.1f", $3 / $4 / 1000 }' "$CG_RESULTS"
}

# --- forward-proxy door (connect_load) -------------------------------------------------------------

# Results, one line per run: case round per_s cpu_us_per_unit ok failed resumed
DOOR_RESULTS="$WORK/door.tsv"
: >"$DOOR_RESULTS"

# connect_load arguments for a door case.
door_args() {
  case "$1" in
    door:pre) echo "pushes --relay 127.0.0.1:$RELAY_PRE --requests $REQUESTS --connections $CLIENTS --streams $STREAMS" ;;
    door:forward) echo "pushes --relay 127.0.0.1:$RELAY_FWD --connect $AUTHORITY --requests $REQUESTS --connections $CLIENTS --streams $STREAMS" ;;
    tunnel:full) echo "tunnels --relay 127.0.0.1:$RELAY_FWD --connect $AUTHORITY --requests $TUNNELS --connections 4" ;;
    tunnel:resumed) echo "tunnels --relay 127.0.0.1:$RELAY_FWD --connect $AUTHORITY --requests $TUNNELS --connections 4 --resume" ;;
    *) die "unknown door case $1" ;;
  esac
}

# run_door CASE ROUND: pushrelay's CPU per push (or per tunnel) over one connect_load run.
run_door() {
  local c=$1 round=$2 out u0 s0 u1 s1 ok failed per_s resumed cpu
  out="$WORK/connect_load.${c/:/-}.$round.out"
  read -r u0 s0 < <(cpu_ticks "$RELAY_PID")
  # shellcheck disable=SC2046 # door_args is split on purpose
  if ! "$CONNECT_LOAD" $(door_args "$c") --ca "$WORK/ca/ca.pem" --payload "$PAYLOAD" \
    --timeout "$RUN_TIMEOUT" >"$out" 2>&1; then
    echo "bench.sh: connect_load failed for $c (round $round); see $out" >&2
  fi
  read -r u1 s1 < <(cpu_ticks "$RELAY_PID")
  ok="$(sed -n 's/.*ok=\([0-9]*\).*/\1/p' "$out" | head -n1)"
  failed="$(sed -n 's/.*failed=\([0-9]*\).*/\1/p' "$out" | head -n1)"
  per_s="$(sed -n 's/.*per_s=\([0-9]*\).*/\1/p' "$out" | head -n1)"
  resumed="$(sed -n 's/.*resumed=\([0-9]*\).*/\1/p' "$out" | head -n1)"
  cpu="$(per_req $((u1 + s1 - u0 - s0)) "$ok")"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$c" "$round" "${per_s:-NA}" "$cpu" "${ok:-0}" \
    "${failed:-NA}" "${resumed:-0}" >>"$DOOR_RESULTS"
  printf 'bench.sh: %-16s round %-5s %10s /s  cpu %8s us each  ok %s  resumed %s\n' \
    "$c" "$round" "${per_s:-NA}" "$cpu" "${ok:-0}" "${resumed:-0}" >&2
}

DOOR_CASES=(door:pre door:forward tunnel:full tunnel:resumed)
if [[ $FORWARD -eq 1 ]]; then
  run_door door:pre warmup
  run_door door:forward warmup
  for ((r = 1; r <= ROUNDS; r++)); do
    for ((k = 0; k < ${#DOOR_CASES[@]}; k++)); do
      run_door "${DOOR_CASES[$(((k + r - 1) % ${#DOOR_CASES[@]}))]}" "$r"
    done
  done
fi

door_median() {
  awk -F'\t' -v c="$1" -v col="$2" '$1 == c && $2 ~ /^[0-9]+$/ && $col != "NA" { print $col }' \
    "$DOOR_RESULTS" | sort -g | awk '{ v[NR] = $1 } END {
      if (NR == 0) { print "NA"; exit }
      if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Syscalls per 2xx answer for a case: total, writes, reads, epoll waits, futex.
syscalls_per_request() {
  local c=$1 ok
  ok="$(awk -F'\t' -v c="$c" '$1 == c && $2 == "sys" { print $7 }' "$RESULTS" | head -n1)"
  awk -F, -v n="${ok:-0}" '
    { gsub(/^syscalls:sys_enter_/, "", $3); count[$3] = $1 + 0 }
    END {
      if (n == 0) { print "NA\tNA\tNA\tNA\tNA"; exit }
      w = count["write"] + count["writev"] + count["sendto"] + count["sendmsg"] + count["sendmmsg"]
      r = count["read"] + count["readv"] + count["recvfrom"] + count["recvmsg"]
      e = count["epoll_wait"] + count["epoll_pwait"]
      printf "%.2f\t%.2f\t%.2f\t%.2f\t%.2f\n", count["raw_syscalls:sys_enter"] / n, w / n, r / n, e / n, count["futex"] / n
    }' "$WORK/perf-stat.${c/:/-}.txt" 2>/dev/null || printf 'NA\tNA\tNA\tNA\tNA\n'
}

# --- report ----------------------------------------------------------------------------------------

cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)"
version_of() {
  case "$1" in
    pushrelay*) "$PUSHRELAY" --version 2>/dev/null | head -n1 ;;
    h2load) h2load --version 2>/dev/null | head -n1 ;;
    nghttpx) nghttpx --version 2>/dev/null | head -n1 ;;
    haproxy) haproxy -v 2>/dev/null | head -n1 | sed 's/ - https.*//' ;;
  esac
}

role_name() {
  case "$1" in
    direct) echo "direct (baseline)" ;;
    pre) echo "pre-proxy (TLS h2 in)" ;;
    chain) echo "relay chain (inside + DMZ relay, HTTP/1.1 between)" ;;
    post) echo "post-proxy (HTTP/1.1 in)" ;;
  esac
}

report() {
  echo "### Run of $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- machine: $(nproc) CPUs, ${cpu_model:-unknown CPU}, kernel $(uname -r)"
  local built
  if [[ "$PUSHRELAY" == "$ROOT/target/release/pushrelay" ]]; then
    built="git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
    git -C "$ROOT" diff --quiet HEAD -- src 2>/dev/null || built+=", src/ modified"
  else
    built="binary $PUSHRELAY"
  fi
  echo "- tools: $(version_of pushrelay) ($built)," \
    "$(version_of h2load)$([[ $HAVE_NGHTTPX -eq 1 ]] && echo ", $(version_of nghttpx)")$([[ $HAVE_HAPROXY -eq 1 ]] && echo ", $(version_of haproxy)")"
  echo "- load: h2load -t 1, $REQUESTS POSTs of 300 bytes per run$([[ $JWT -eq 1 ]] && echo ", each with a bearer JWT"); HTTP/2 cases -c $CLIENTS -m $STREAMS," \
    "HTTP/1.1 cases --h1 -c $H1_CLIENTS (one request in flight per connection); $ROUNDS interleaved" \
    "rounds after a warm-up of 2000 requests per case"
  echo "- proxies: $THREADS worker threads each (pushrelay workers, nghttpx --workers," \
    "HAProxy nbthread); pushrelay log.level warn; origin: examples/fake_apns.rs (TLS + HTTP/2, 200 + apns-id)"
  echo "- CPU/request: the proxy's utime+stime delta (/proc/PID/stat, CLK_TCK $CLK_TCK) over a run ÷ 2xx answers," \
    "also given as user and system time apart (medians of each, so they need not add up exactly);" \
    "for direct it is the origin's own cost"
  echo
  echo "#### Full load (median of $ROUNDS rounds; req/s range and each round's CPU in brackets)"
  echo
  echo "| case | req/s | p50 ms | p99 ms | CPU µs/req | user µs/req | system µs/req | pushrelay CPU ÷ this | pushrelay-native CPU ÷ this | failed runs |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
  local c role proxy own native
  for c in "${CASES[@]}"; do
    role=${c%%:*}
    proxy=${c#*:}
    if [[ $c == direct ]]; then
      label="$(role_name direct)"
      own="–"
      native="–"
    else
      label="$(role_name "$role"): $proxy"
      own="$(ratio "$(median "$role:pushrelay" 6)" "$(median "$c" 6)")"
      native="$(ratio "$(median "$role:pushrelay-native" 6)" "$(median "$c" 6)")"
    fi
    printf '| %s | %.0f [%s] | %s | %s | %s [%s] | %s | %s | %s | %s | %s |\n' "$label" \
      "$(median "$c" 3 | sed 's/NA/0/')" "$(spread "$c" 3)" \
      "$(ms "$(median "$c" 4)")" "$(ms "$(median "$c" 5)")" \
      "$(median "$c" 6)" "$(awk -F'\t' -v c="$c" '$1 == c && $2 ~ /^[0-9]+$/ { printf "%s%s", s, $6; s = ", " }' "$RESULTS")" \
      "$(median "$c" 9)" "$(median "$c" 10)" \
      "$own" "$native" "$(failures "$c")/$ROUNDS"
  done
  if [[ $HALF_LOAD -eq 1 ]]; then
    echo
    echo "#### Half of pushrelay's peak (h2load --rps; median of $HALF_ROUNDS interleaved rounds)"
    echo
    echo "| case | offered req/s | achieved req/s | p50 ms | p99 ms [range] | p99 added over direct ms | CPU µs/req |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    local rate d99 rx label p99 base
    local members
    for role in pre post chain; do
      rate="${HALF_RATE[$role]:-}"
      [[ -n "$rate" ]] || continue
      rx="^h-$role-"
      base="$(baseline_of "$role")"
      d99="$(median "$base" 5 "$rx")"
      if [[ $role == chain ]]; then
        members=("$base" "chain:pushrelay" "pre:pushrelay")
      else
        members=("$base" "${PROXIES[@]/#/$role:}")
      fi
      for c in "${members[@]}"; do
        if [[ $c == direct ]]; then
          label="direct (baseline for $role)"
        elif [[ $role == chain && $c == pre:pushrelay ]]; then
          label="pre-proxy: pushrelay (the same load, for the chain)"
        elif [[ $c == direct-h1 ]]; then
          label="direct over HTTP/1.1 (baseline for $role)"
        else
          label="$(role_name "$role"): ${c#*:}"
        fi
        p99="$(median "$c" 5 "$rx")"
        printf '| %s | %s | %.0f | %s | %s [%s] | %s | %s |\n' "$label" "$rate" \
          "$(median "$c" 3 "$rx" | sed 's/NA/0/')" "$(ms "$(median "$c" 4 "$rx")")" "$(ms "$p99")" \
          "$(spread "$c" 5 "$rx" | awk -F'–' '{ if ($1 == "NA") print "NA"; else printf "%.2f–%.2f", $1 / 1000, $2 / 1000 }')" \
          "$(if [[ $c == direct* ]]; then echo "–"; else awk -v a="$p99" -v b="$d99" 'BEGIN { if (a == "NA" || b == "NA") print "NA"; else printf "%+.2f", (a - b) / 1000 }'; fi)" \
          "$(median "$c" 6 "$rx")"
      done
    done
    echo
    echo "h2load --rps is per connection: the offered rate is split evenly over the case's connections."
    echo "The post-proxy rows compare with the origin answering the same h2load --h1 load over HTTP/1.1 + TLS."
  fi
  if [[ $CHAIN -eq 1 ]]; then
    local cc pc
    cc="$(median chain:pushrelay 6)"
    pc="$(median pre:pushrelay 6)"
    echo
    echo "Relay chain against pre-proxy straight to the origin (full load): CPU per push" \
      "$cc µs (both relays) vs $pc µs, ×$(ratio "$cc" "$pc");" \
      "p50 +$(awk -v a="$(median chain:pushrelay 4)" -v b="$(median pre:pushrelay 4)" 'BEGIN { if (a == "NA" || b == "NA") print "NA"; else printf "%.2f", (a - b) / 1000 }') ms," \
      "p99 +$(awk -v a="$(median chain:pushrelay 5)" -v b="$(median pre:pushrelay 5)" 'BEGIN { if (a == "NA" || b == "NA") print "NA"; else printf "%.2f", (a - b) / 1000 }') ms."
  fi
  echo
  if [[ $SYSCALLS -eq 1 ]]; then
    echo "#### System calls per request (one full-load round under perf stat; direct = the origin)"
    echo
    echo "| case | all | writes (write, writev, send*) | reads (read, readv, recv*) | epoll_wait | futex |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: |"
    local t w r e f
    for c in "${CASES[@]}"; do
      IFS=$'\t' read -r t w r e f < <(syscalls_per_request "$c")
      if [[ $c == direct ]]; then
        label="$(role_name direct)"
      else
        label="$(role_name "${c%%:*}"): ${c#*:}"
      fi
      printf '| %s | %s | %s | %s | %s | %s |\n' "$label" "$t" "$w" "$r" "$e" "$f"
    done
  else
    echo "No syscall counts: ${SYSCALLS_WHY:-skipped with --no-syscalls}."
  fi
  echo
  if [[ $CALLGRIND -eq 1 ]]; then
    echo "#### Instructions per push (callgrind, thousands; one worker thread, $CG_REQUESTS pushes per role after $(((CG_REQUESTS + 4) / 5)))"
    echo
    echo "| proxy | pre-proxy k instr/push | pushrelay ÷ this | pushrelay-native ÷ this | post-proxy k instr/push | pushrelay ÷ this | pushrelay-native ÷ this |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    local p ipre ipost
    for p in "${PROXIES[@]}"; do
      ipre="$(instructions "$p" pre)"
      ipost="$(instructions "$p" post)"
      printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$p" "${ipre:-NA}" \
        "$(ratio "$(instructions pushrelay pre)" "$ipre")" \
        "$(ratio "$(instructions pushrelay-native pre)" "$ipre")" "${ipost:-NA}" \
        "$(ratio "$(instructions pushrelay post)" "$ipost")" \
        "$(ratio "$(instructions pushrelay-native post)" "$ipost")"
    done
  else
    echo "No instruction counts: ${CALLGRIND_WHY:-skipped with --no-callgrind}."
  fi
  if [[ $FORWARD -eq 1 ]]; then
    echo
    echo "#### Forward-proxy door (examples/connect_load.rs; median of $ROUNDS interleaved rounds)"
    echo
    echo "Pushes: $REQUESTS per run over $CLIENTS connections × $STREAMS streams, the same client for both"
    echo "doors. Tunnels: $TUNNELS new tunnels per run from 4 tasks, each CONNECT + TLS + an HTTP/2 PING"
    echo "round trip, then closed. CPU is pushrelay's utime+stime over the run ÷ pushes (or tunnels)."
    echo
    echo "| case | per second | pushrelay CPU µs each | ÷ door: pre | failed (all rounds) |"
    echo "| --- | ---: | ---: | ---: | ---: |"
    local base_cpu full_cpu label
    base_cpu="$(door_median door:pre 4)"
    full_cpu="$(door_median tunnel:full 4)"
    for c in "${DOOR_CASES[@]}"; do
      case "$c" in
        door:pre) label="push via pre-proxy (baseline)" ;;
        door:forward) label="push via forward-proxy (CONNECT tunnel)" ;;
        tunnel:full) label="new tunnel, full TLS handshake" ;;
        tunnel:resumed) label="new tunnel, resumed TLS session" ;;
      esac
      printf '| %s | %s | %s | %s | %s |\n' "$label" "$(door_median "$c" 3)" "$(door_median "$c" 4)" \
        "$(if [[ $c == door:* ]]; then ratio "$(door_median "$c" 4)" "$base_cpu"; else echo "–"; fi)" \
        "$(awk -F'\t' -v c="$c" '$1 == c && $2 ~ /^[0-9]+$/ { s += $6 } END { print s + 0 }' "$DOOR_RESULTS")"
    done
    echo
    echo "A resumed tunnel costs $(ratio "$(door_median tunnel:resumed 4)" "$full_cpu") of a full one."
  fi
  if [[ $PEERS -eq 1 && ($HAVE_NGHTTPX -eq 0 || $HAVE_HAPROXY -eq 0) ]]; then
    echo
    [[ $HAVE_NGHTTPX -eq 0 ]] && echo "nghttpx was not installed: no nghttpx rows (apt-get install nghttp2-proxy)."
    [[ $HAVE_HAPROXY -eq 0 ]] && echo "HAProxy was not installed: no HAProxy rows (apt-get install haproxy)."
  fi
  return 0
}

REPORT="$(report)"
printf '%s\n' "$REPORT"
if [[ -n "$OUT" ]]; then
  mkdir -p "$(dirname "$OUT")"
  printf '%s\n' "$REPORT" >"$OUT"
  echo "bench.sh: report written to $OUT" >&2
fi
