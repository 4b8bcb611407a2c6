#!/usr/bin/env bash
# Prepares a push server to talk to a pre-proxy pushrelay: creates (or reuses) pushrelay's private CA,
# optionally issues a fixed certificate for the APNs hosts, prints the /etc/hosts line, and optionally
# installs the CA into the system trust store. Safe to run again: an existing CA key is never replaced.
set -euo pipefail

readonly APNS_HOSTS=(api.push.apple.com api.sandbox.push.apple.com api.development.push.apple.com)
readonly LEAF_NAME=relay
# A leaf that expires sooner than this (seconds) is issued again.
readonly LEAF_MIN_VALIDITY=$((30 * 24 * 3600))

usage() {
  cat <<EOF
Usage: $(basename "$0") [options]

Creates pushrelay's private CA (DIR/ca.pem, DIR/ca.key mode 0600) with 'pushrelay ca init', or reuses
the CA already in DIR. Prints what the push server needs: the /etc/hosts line and how to trust the CA.
Running it again changes nothing that exists: the CA key is never overwritten.

Options:
  --dir DIR          directory for the CA (and leaf) files (default: certs)
  --pushrelay PATH   the pushrelay binary (default: pushrelay on PATH, else target/release/pushrelay,
                     else target/debug/pushrelay)
  --issue-leaf       also issue DIR/$LEAF_NAME.pem + DIR/$LEAF_NAME.key for the APNs hosts, for a relay
                     configured with tls.cert / tls.key; an existing leaf that still verifies against
                     the CA and is valid for 30 more days is kept
  --relay-ip IP      the relay's address for the /etc/hosts line (default: 127.0.0.1)
  --permit NAME      a new CA may sign only for NAME (a DNS name with every name under it, or an
                     IP address); repeat for several (default: the APNs hosts). The CA carries
                     these as critical name constraints, so a stolen ca.key cannot impersonate any
                     other host to the push servers that trust it
  --install-trust    install DIR/ca.pem into the system trust store (needs root; Debian/Ubuntu
                     update-ca-certificates or RHEL/Fedora update-ca-trust)
  -h, --help         show this help

Examples:
  $(basename "$0") --dir /etc/pushrelay/certs --relay-ip 127.0.0.1
  sudo $(basename "$0") --dir /etc/pushrelay/certs --issue-leaf --install-trust
EOF
}

say() { printf '%s\n' "$*"; }
fail() {
  printf 'bootstrap-ca: %s\n' "$*" >&2
  exit 1
}
usage_error() {
  printf 'bootstrap-ca: %s\nRun with --help for the options.\n' "$*" >&2
  exit 2
}

dir=certs
pushrelay=
issue_leaf=0
relay_ip=127.0.0.1
install_trust=0
permits=()

need_value() {
  [ "$#" -ge 2 ] && [ -n "$2" ] || usage_error "$1 needs a value"
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help)
      usage
      exit 0
      ;;
    --dir)
      need_value "$@"
      dir=$2
      shift 2
      ;;
    --dir=*) dir=${1#*=} && shift ;;
    --pushrelay)
      need_value "$@"
      pushrelay=$2
      shift 2
      ;;
    --pushrelay=*) pushrelay=${1#*=} && shift ;;
    --relay-ip)
      need_value "$@"
      relay_ip=$2
      shift 2
      ;;
    --relay-ip=*) relay_ip=${1#*=} && shift ;;
    --permit)
      need_value "$@"
      permits+=(--permit "$2")
      shift 2
      ;;
    --permit=*) permits+=(--permit "${1#*=}") && shift ;;
    --issue-leaf) issue_leaf=1 && shift ;;
    --install-trust) install_trust=1 && shift ;;
    *) usage_error "unknown option: $1" ;;
  esac
done

[ -n "$dir" ] || usage_error "--dir must not be empty"

# An IPv4 dotted quad or an IPv6 address; /etc/hosts takes nothing else.
ipv4='^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$'
if [[ $relay_ip =~ $ipv4 ]]; then
  for octet in "${BASH_REMATCH[@]:1}"; do
    [ "$((10#$octet))" -le 255 ] || usage_error "--relay-ip $relay_ip is not an IP address"
  done
elif ! [[ $relay_ip =~ ^[0-9A-Fa-f:.]+$ && $relay_ip == *:* ]]; then
  usage_error "--relay-ip $relay_ip is not an IP address (an /etc/hosts line needs an address, not a name)"
fi

# --- the pushrelay binary ---------------------------------------------------------------------------
repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "$pushrelay" ]; then
  if [[ $pushrelay != */* ]]; then
    found=$(command -v -- "$pushrelay" || true)
    [ -n "$found" ] || fail "--pushrelay $pushrelay: no such command on PATH"
    pushrelay=$found
  fi
  [ -f "$pushrelay" ] || fail "--pushrelay $pushrelay: no such file"
  [ -x "$pushrelay" ] || fail "--pushrelay $pushrelay: not executable"
else
  for candidate in "$(command -v pushrelay || true)" \
    target/release/pushrelay "$repo_root/target/release/pushrelay" \
    target/debug/pushrelay "$repo_root/target/debug/pushrelay"; do
    if [ -n "$candidate" ] && [ -f "$candidate" ] && [ -x "$candidate" ]; then
      pushrelay=$candidate
      break
    fi
  done
  [ -n "$pushrelay" ] || fail "cannot find the pushrelay binary: not on PATH, no target/release/pushrelay \
or target/debug/pushrelay. Build it with 'cargo build --release' or pass --pushrelay PATH."
fi

# --- the CA -----------------------------------------------------------------------------------------
ca_pem=$dir/ca.pem
ca_key=$dir/ca.key
if [ -e "$ca_pem" ] && [ -e "$ca_key" ]; then
  say "reusing the existing CA in $dir (ca.pem, ca.key); nothing replaced"
  if [ -n "$(find "$ca_key" -perm /077 2>/dev/null)" ]; then
    printf 'bootstrap-ca: warning: %s is readable by group or others; run: chmod 600 %s\n' \
      "$ca_key" "$ca_key" >&2
  fi
  if command -v openssl >/dev/null &&
    ! openssl x509 -in "$ca_pem" -noout -ext nameConstraints 2>/dev/null | grep -q 'Permitted'; then
    printf 'bootstrap-ca: warning: %s has no name constraints: its key can sign for any host. Move \
the old CA away and run again to create a constrained one (then re-trust it on the push servers).\n' \
      "$ca_pem" >&2
  fi
  [ "${#permits[@]}" -eq 0 ] || say "--permit applies to a new CA only; the existing one is kept as it is"
elif [ -e "$ca_pem" ] || [ -e "$ca_key" ]; then
  present=$ca_pem missing=$ca_key
  [ -e "$ca_key" ] && present=$ca_key missing=$ca_pem
  fail "found $present but not $missing: refusing to create a new CA over half of an old one. \
Restore $missing, or move $present away to start a new CA (every certificate the old CA issued \
stops being trusted)."
else
  "$pushrelay" ca init --dir "$dir" "${permits[@]}" ||
    fail "'$pushrelay ca init --dir $dir' failed (see above)"
fi
dir_abs=$(cd "$dir" && pwd)
ca_abs=$dir_abs/ca.pem

# --- the leaf ---------------------------------------------------------------------------------------
leaf_is_current() {
  local pem=$dir/$LEAF_NAME.pem key=$dir/$LEAF_NAME.key
  [ -e "$pem" ] && [ -e "$key" ] || return 1
  if ! command -v openssl >/dev/null; then
    say "openssl not found: keeping the existing $pem without checking it"
    return 0
  fi
  openssl verify -CAfile "$ca_pem" "$pem" >/dev/null 2>&1 &&
    openssl x509 -in "$pem" -noout -checkend "$LEAF_MIN_VALIDITY" >/dev/null 2>&1
}

if [ "$issue_leaf" = 1 ]; then
  if leaf_is_current; then
    say "keeping $dir/$LEAF_NAME.pem: signed by this CA and valid for 30 more days"
  else
    host_args=()
    for h in "${APNS_HOSTS[@]}"; do host_args+=(--host "$h"); done
    "$pushrelay" ca issue "${host_args[@]}" --dir "$dir" --name "$LEAF_NAME" ||
      fail "'$pushrelay ca issue' failed (see above)"
  fi
fi

# --- the system trust store -------------------------------------------------------------------------
# Installs $ca_abs as $1/$2 and runs $3, unless the same certificate is already there.
install_anchor() {
  local target=$1/$2 refresh=$3
  if [ -f "$target" ] && cmp -s "$ca_abs" "$target"; then
    say "the CA is already in the system trust store ($target)"
    return
  fi
  install -m 0644 "$ca_abs" "$target" || fail "cannot write $target"
  "$refresh" >/dev/null || fail "$refresh failed after installing $target"
  say "installed the CA into the system trust store: $target ($refresh)"
}

if [ "$install_trust" = 1 ]; then
  [ "$(id -u)" = 0 ] || fail "--install-trust writes to the system trust store and needs root: \
run this script with sudo, or leave out --install-trust and use SSL_CERT_FILE (printed below)."
  if command -v update-ca-certificates >/dev/null && [ -d /usr/local/share/ca-certificates ]; then
    install_anchor /usr/local/share/ca-certificates pushrelay-ca.crt update-ca-certificates
  elif command -v update-ca-trust >/dev/null && [ -d /etc/pki/ca-trust/source/anchors ]; then
    install_anchor /etc/pki/ca-trust/source/anchors pushrelay-ca.pem update-ca-trust
  else
    fail "no known system trust store here (looked for update-ca-certificates with \
/usr/local/share/ca-certificates, and update-ca-trust with /etc/pki/ca-trust/source/anchors). \
Add $ca_abs to your system's trust store by hand, or use SSL_CERT_FILE (below)."
  fi
fi

# --- what the push server needs ---------------------------------------------------------------------
system_bundle=/etc/ssl/certs/ca-certificates.crt
[ -f "$system_bundle" ] || [ ! -f /etc/pki/tls/certs/ca-bundle.crt ] ||
  system_bundle=/etc/pki/tls/certs/ca-bundle.crt

say ""
say "CA certificate: $ca_abs"
if [ "$issue_leaf" = 1 ]; then
  say "Leaf for the APNs hosts: $dir_abs/$LEAF_NAME.pem, key $dir_abs/$LEAF_NAME.key (tls.cert / tls.key)"
fi
say ""
say "Add this line to /etc/hosts on the push server, so the APNs hosts resolve to the relay:"
say "$relay_ip ${APNS_HOSTS[*]}"
say ""
if [ "$install_trust" = 1 ]; then
  say "The push server trusts the CA through the system store. For a container or a single process:"
else
  say "The push server must trust the CA: run again as root with --install-trust to add it to the"
  say "system trust store, or, for a container or a single process:"
fi
cat <<EOF
  cat $system_bundle $ca_abs > pushrelay-bundle.pem
  export SSL_CERT_FILE=\$PWD/pushrelay-bundle.pem
SSL_CERT_FILE replaces the default roots of OpenSSL and Go programs: hence system roots plus this CA.
Node.js:  export NODE_EXTRA_CA_CERTS=$ca_abs
Java:     keytool -importcert -cacerts -alias pushrelay-ca -file $ca_abs
EOF
