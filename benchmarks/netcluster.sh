#!/usr/bin/env bash
# netcluster.sh: an emulated cluster on one Linux machine, for benchmarks that must cross a real,
# bandwidth-limited network. Each host is a network namespace with its own address, joined to the
# others by a bridge; each host's link is rate-limited (tbf) in both directions, so a host sends and
# receives RATE at once, as a full-duplex NIC does. Needs root (network namespaces, veth, tc) and
# iproute2 (`ip`, `tc`).
#
#   sudo benchmarks/netcluster.sh run N RATE -- CMD [ARG...]
#       bring up N hosts at RATE (1gbit, 200mbit, ...), run CMD once in each host, wait for all,
#       tear down; the exit status is the first non-zero one. CMD sees NC_HOST (0..N-1), NC_HOSTS
#       (N), NC_ADDR (its address), NC_MASTER (host 0's address) and NC_IFACE (the interface, for
#       GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME).
#   sudo benchmarks/netcluster.sh up N RATE | down | exec I CMD...   the same steps by hand.
#
# Example, 4 hosts at 1 Gbit/s, one torchrun node each:
#   sudo benchmarks/netcluster.sh run 4 1gbit -- sh -c 'GLOO_SOCKET_IFNAME=$NC_IFACE torchrun \
#       --nnodes $NC_HOSTS --node-rank $NC_HOST --nproc-per-node 1 --master-addr $NC_MASTER \
#       --master-port 29600 benchmarks/network_bench.py --worker'
#
# Addresses are 10.213.0.0/24 in namespaces this script makes and removes; traffic never leaves the
# machine. Every name starts with "nc", so only one netcluster can be up at a time (the same names
# as the shared tools/netcluster: the two exclude each other, as they should).
set -euo pipefail
PREFIX=nc
BR=${PREFIX}-br
NET=10.213.0
IFACE=eth0

die() {
  echo "netcluster.sh: $*" >&2
  exit 2
}

preflight() {
  ((EUID == 0)) || die "needs root to create network namespaces and rate limits; run it with sudo \
(or as root in a container started with --cap-add NET_ADMIN)"
  command -v ip >/dev/null && command -v tc >/dev/null ||
    die "needs iproute2 ('ip' and 'tc'); install it: apt-get install iproute2"
  ip netns list >/dev/null 2>&1 || die "'ip netns' does not work here: the kernel or container \
does not allow network namespaces"
}

hosts_up() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${PREFIX}[0-9]+$" || true; }

down() {
  for ns in $(hosts_up); do ip netns del "$ns" 2>/dev/null || true; done
  local links
  links=$(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | sed 's/@.*//' |
    grep -E "^${PREFIX}-h[0-9]+$" || true)
  for l in $links; do ip link del "$l" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true
  # namespace teardown is asynchronous: wait until the host ends are gone
  for _ in $(seq 1 50); do
    ip -o link show 2>/dev/null | grep -qE " ${PREFIX}-(h[0-9]+|br)[@:]" || return 0
    sleep 0.1
  done
}

up() {
  local n=$1 rate=$2
  [[ $n =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 200)) || die "N (hosts) must be 1..200, got '$n'"
  [[ $rate =~ ^[0-9.]+(k|m|g)?(bit|bps)$ ]] || die "RATE must look like 1gbit or 200mbit, got '$rate'"
  [[ -z $(hosts_up) ]] || die "a netcluster is already up: run '$0 down' first"
  ip link add "$BR" type bridge
  ip link set "$BR" up
  for ((i = 0; i < n; i++)); do
    ip netns add "$PREFIX$i"
    ip link add "$PREFIX-h$i" type veth peer name "$IFACE" netns "$PREFIX$i"
    ip link set "$PREFIX-h$i" master "$BR"
    ip link set "$PREFIX-h$i" up
    ip -n "$PREFIX$i" addr add "$NET.$((i + 1))/24" dev "$IFACE"
    ip -n "$PREFIX$i" link set "$IFACE" up
    ip -n "$PREFIX$i" link set lo up
    # what host i sends (its own interface), and what it receives (the bridge port toward it)
    ip netns exec "$PREFIX$i" tc qdisc add dev "$IFACE" root tbf rate "$rate" burst 512kb latency 100ms
    tc qdisc add dev "$PREFIX-h$i" root tbf rate "$rate" burst 512kb latency 100ms
  done
}

exec_in() {
  local i=$1
  shift
  local n
  n=$(hosts_up | wc -l)
  ((n > 0)) || die "no netcluster is up: run '$0 up N RATE' first"
  [[ $i =~ ^[0-9]+$ ]] && ((i < n)) || die "host I must be 0..$((n - 1)), got '$i'"
  ip netns exec "$PREFIX$i" env NC_HOST="$i" NC_HOSTS="$n" NC_ADDR="$NET.$((i + 1))" \
    NC_MASTER="$NET.1" NC_IFACE="$IFACE" "$@"
}

usage() {
  sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
}

case ${1:-} in
up)
  (($# == 3)) || die "usage: $0 up N RATE"
  preflight
  up "$2" "$3"
  ;;
down)
  preflight
  down
  ;;
exec)
  (($# >= 3)) || die "usage: $0 exec I CMD..."
  preflight
  i=$2
  shift 2
  exec_in "$i" "$@"
  ;;
run)
  (($# >= 5)) && [[ $4 == -- ]] || die "usage: $0 run N RATE -- CMD..."
  preflight
  n=$2 rate=$3
  shift 4
  trap down EXIT
  up "$n" "$rate"
  pids=()
  for ((i = 0; i < n; i++)); do
    exec_in "$i" "$@" &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || { s=$?; ((status == 0)) && status=$s; }; done
  exit $status
  ;;
*) usage ;;
esac
