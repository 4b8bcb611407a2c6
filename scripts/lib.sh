# Helpers shared by scripts/bench.sh and scripts/idle-memory.sh; sourced, not run. The script
# that sources it sets SCRIPT (its name, for messages) first, and WORK (its scratch directory,
# where each server's log is) before it starts servers.

die() {
  echo "$SCRIPT: $*" >&2
  exit 2
}

positive() {
  [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, not '$2'"
}

# Puts in the variable named $1 a port nothing listens on, outside the kernel's ephemeral range
# (load generators' client ports), and never one handed out before. Called as `free_port VAR`,
# not in a $(...) subshell, so that TAKEN remembers what it gave.
declare -A TAKEN=()
free_port() {
  local -n into=$1
  local port i
  for ((i = 0; i < 200; i++)); do
    port=$((20000 + RANDOM % 12000))
    [[ -n "${TAKEN[$port]:-}" ]] && continue
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      TAKEN[$port]=1
      # shellcheck disable=SC2034 # a nameref: the caller's variable
      into=$port
      return 0
    fi
  done
  die "no free port found on 127.0.0.1"
}

# Waits (bounded: $4 tenths of a second, 100 by default) until something accepts on
# 127.0.0.1:$2; $1 is the PID that should be serving it, $3 what it is (its log: $WORK/$3.log).
wait_port() {
  local pid=$1 port=$2 what=$3 tries=${4:-100} i
  for ((i = 0; i < tries; i++)); do
    kill -0 "$pid" 2>/dev/null || die "$what exited at start-up; see $WORK/$what.log"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      return 0
    fi
    sleep 0.1
  done
  die "$what does not listen on 127.0.0.1:$port after $((tries / 10))s; see $WORK/$what.log"
}
