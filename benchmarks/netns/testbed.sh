#!/usr/bin/env bash
# A real shaped network on one machine: N network namespaces ("devices") joined by veth pairs to
# a bridge, each device's uplink shaped with tbf, a one-way delay added on each device's INPUT hook
# by benchmarks/netns/delay.py (NFQUEUE; for kernels without netem). Runs one command per device
# as one torchrun-style rank (RANK, WORLD_SIZE, MASTER_ADDR, ... in its environment), waits for
# all of them, records the wire counters, and tears everything down on exit, Ctrl-C included.
#
#   benchmarks/netns/testbed.sh --devices 2 --rate 10mbit --delay-ms 20 --out /tmp/tb -- \
#       .venv/bin/astra run --model smollm2-135m --methods astra --tokens 1024 --new-tokens 1 \
#       --bandwidth inf --latency 0 --json /tmp/tb/run.json
#
# Topology (names use --prefix, default "astranb"):
#
#   [ns astranb-d0] eth0 10.78.0.10 --veth-- p0 ┐
#   [ns astranb-d1] eth0 10.78.0.11 --veth-- p1 ┼ br0  [ns astranb-br]
#   ...                                         ┘
#
#   uplink of device i  = egress of its eth0: tbf rate R burst B limit L  (--rate inf: none)
#   one-way delay       = INPUT of device i: iptables NFQUEUE -> delay.py holds each packet D ms
#                         (data and ACKs alike, so the round trip is 2 D)
#   downlinks (bridge -> device) are not shaped: the link model's assumption (astra/net/link.py).
#
# Every rank gets ASTRA_SECRET_FILE (a fresh 32-hex-character token, mode 600, deleted on exit),
# GLOO_SOCKET_IFNAME=eth0, OMP_NUM_THREADS (default 1) and LOCAL_RANK=0. Rank i's output goes to
# OUT/rank<i>.log; OUT/testbed.json records the set-up, each rank's exit code, the bytes and
# packets each eth0 sent and each delay daemon's summary. Exit status: 0 when every rank exited 0.
set -uo pipefail

if [ "$(id -u)" != 0 ]; then
  echo "skipped: needs root (network namespaces, tc, iptables)"
  exit 0
fi

HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
PY="${ASTRA_PY:-$ROOT/.venv/bin/python}"

DEVICES=2
RATE=inf
DELAY_MS=0
BURST=""
LIMIT=""
OUT=""
PREFIX=astranb
PORT=29555
THREADS=1
TIMEOUT_S=900
RT_PRIO=10
CC=""
usage() {
  sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
  cat <<EOF
options: --devices N (2)  --rate RATE|inf (inf)  --delay-ms D (0)  --burst BYTES (rate*1ms, at
least 2 frames)  --limit BYTES (4 MB: a deep queue, no tail drops)  --out DIR (required)
--prefix NAME (astranb)  --port P (29555)  --threads T (OMP_NUM_THREADS, 1)
--timeout S (900)  --rt-prio P (delay daemons' SCHED_FIFO priority, 10; 0 = off)
--cc NAME (TCP congestion control in every device namespace, e.g. cubic; default: inherited)
-- CMD...
EOF
}
while [ $# -gt 0 ]; do
  case "$1" in
    --devices) DEVICES="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --delay-ms) DELAY_MS="$2"; shift 2 ;;
    --burst) BURST="$2"; shift 2 ;;
    --limit) LIMIT="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --prefix) PREFIX="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --threads) THREADS="$2"; shift 2 ;;
    --timeout) TIMEOUT_S="$2"; shift 2 ;;
    --rt-prio) RT_PRIO="$2"; shift 2 ;;
    --cc) CC="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "testbed.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -z "$OUT" ] || [ $# -eq 0 ]; then
  echo "testbed.sh: --out DIR and a command after -- are required (see --help)" >&2
  exit 2
fi
if ! [[ "$DEVICES" =~ ^[0-9]+$ ]] || [ "$DEVICES" -lt 1 ] || [ "$DEVICES" -gt 200 ]; then
  echo "testbed.sh: --devices must be 1..200" >&2; exit 2
fi
for tool in ip tc iptables; do
  command -v "$tool" >/dev/null || { echo "testbed.sh: $tool missing; run benchmarks/netns/setup.sh" >&2; exit 2; }
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

BR="$PREFIX-br"
ns() { echo "$PREFIX-d$1"; }
addr() { echo "10.78.0.$((10 + $1))"; }
for i in $(seq 0 $((DEVICES - 1))) br; do
  name=$([ "$i" = br ] && echo "$BR" || ns "$i")
  if ip netns list | grep -qw "^$name"; then
    echo "testbed.sh: namespace $name exists (another testbed running, or a stale one: ip netns del $name)" >&2
    exit 2
  fi
done

RANK_PIDS=()
DAEMON_PIDS=()
SECRET_DIR=""
cleanup() {
  trap - EXIT INT TERM
  for pid in "${RANK_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${DAEMON_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${RANK_PIDS[@]}" "${DAEMON_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
  done
  for i in $(seq 0 $((DEVICES - 1))) br; do
    name=$([ "$i" = br ] && echo "$BR" || ns "$i")
    ip netns list | grep -qw "^$name" || continue
    # anything of ours still inside (a rank's child) would keep the namespace alive
    for pid in $(ip netns pids "$name" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    ip netns del "$name" 2>/dev/null  # takes its veth end, qdiscs and iptables rules with it
  done
  [ -n "$SECRET_DIR" ] && rm -rf "$SECRET_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- network ---------------------------------------------------------------------------------
set -e
ip netns add "$BR"
ip -n "$BR" link set lo up
ip -n "$BR" link add br0 type bridge forward_delay 0 stp_state 0
ip -n "$BR" link set br0 up
for i in $(seq 0 $((DEVICES - 1))); do
  n=$(ns "$i")
  ip netns add "$n"
  ip -n "$n" link set lo up
  [ -z "$CC" ] || ip netns exec "$n" sysctl -q -w net.ipv4.tcp_congestion_control="$CC"
  ip link add "${PREFIX}v$i" netns "$n" type veth peer name "p$i" netns "$BR"
  ip -n "$n" link set "${PREFIX}v$i" name eth0
  ip -n "$n" addr add "$(addr "$i")/24" dev eth0
  ip -n "$n" link set eth0 up
  ip -n "$BR" link set "p$i" master br0
  ip -n "$BR" link set "p$i" up
done

# rate: tbf on each device's uplink (egress of its eth0)
if [ "$RATE" != inf ]; then
  # tc understands the rate string; the burst default needs it in bit/s
  rate_bps=$("$PY" - "$RATE" <<'EOF'
import re, sys
m = re.fullmatch(r"([0-9.]+)\s*([kmg]?)(bit|bps)", sys.argv[1].lower())
if not m:
    sys.exit(f"testbed.sh: --rate {sys.argv[1]!r}: use e.g. 10mbit, 100mbit, 1gbit or inf")
print(int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)]))
EOF
  )
  # burst: one millisecond of the rate, at least two full frames (tbf needs >= one MTU-sized
  # packet, and a larger bucket lets a quiet link send its first burst-worth at line rate)
  [ -n "$BURST" ] || BURST=$(( rate_bps / 8 / 1000 > 3028 ? rate_bps / 8 / 1000 : 3028 ))
  [ -n "$LIMIT" ] || LIMIT=4194304
  for i in $(seq 0 $((DEVICES - 1))); do
    ip netns exec "$(ns "$i")" tc qdisc add dev eth0 root tbf rate "$RATE" burst "$BURST" limit "$LIMIT"
  done
fi

# delay: NFQUEUE on each device's INPUT, released by delay.py in that namespace
if "$PY" -c "import sys; sys.exit(0 if float(sys.argv[1]) > 0 else 1)" "$DELAY_MS"; then
  for i in $(seq 0 $((DEVICES - 1))); do
    n=$(ns "$i")
    rm -f "$OUT/delay$i.ready"
    ip netns exec "$n" iptables -A INPUT -i eth0 -j NFQUEUE --queue-num 1 --queue-bypass
    ip netns exec "$n" "$PY" "$HERE/delay.py" --queue 1 --delay-ms "$DELAY_MS" \
      --realtime "$RT_PRIO" --ready-file "$OUT/delay$i.ready" 2>"$OUT/delay$i.log" &
    DAEMON_PIDS+=($!)
  done
  for i in $(seq 0 $((DEVICES - 1))); do
    for _ in $(seq 100); do [ -f "$OUT/delay$i.ready" ] && break; sleep 0.1; done
    [ -f "$OUT/delay$i.ready" ] || { echo "testbed.sh: delay daemon $i did not start:" >&2; cat "$OUT/delay$i.log" >&2; exit 1; }
  done
fi
set +e

# ---- the ranks -------------------------------------------------------------------------------
SECRET_DIR="$(mktemp -d)"
"$PY" -c "import secrets; print(secrets.token_hex(16))" >"$SECRET_DIR/token"
chmod 600 "$SECRET_DIR/token"
counters() {  # bytes and packets each eth0 has sent so far, as a JSON list
  local first=1
  printf '['
  for i in $(seq 0 $((DEVICES - 1))); do
    [ $first = 1 ] || printf ','
    first=0
    printf '{"tx_bytes":%s,"tx_packets":%s}' \
      "$(ip netns exec "$(ns "$i")" cat /sys/class/net/eth0/statistics/tx_bytes)" \
      "$(ip netns exec "$(ns "$i")" cat /sys/class/net/eth0/statistics/tx_packets)"
  done
  printf ']'
}
BEFORE=$(counters)
T0=$(date +%s.%N)
for i in $(seq 0 $((DEVICES - 1))); do
  ip netns exec "$(ns "$i")" env RANK="$i" WORLD_SIZE="$DEVICES" LOCAL_RANK=0 \
    LOCAL_WORLD_SIZE=1 MASTER_ADDR="$(addr 0)" MASTER_PORT="$PORT" GLOO_SOCKET_IFNAME=eth0 \
    ASTRA_SECRET_FILE="$SECRET_DIR/token" OMP_NUM_THREADS="$THREADS" "$@" \
    >"$OUT/rank$i.log" 2>&1 &
  RANK_PIDS+=($!)
done
RCS=()
deadline=$(( $(date +%s) + TIMEOUT_S ))
for idx in "${!RANK_PIDS[@]}"; do
  pid=${RANK_PIDS[$idx]}
  while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt $deadline ]; do sleep 0.2; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "testbed.sh: rank $idx still running after ${TIMEOUT_S}s; stopping" >&2
    RCS+=(124)
    continue
  fi
  wait "$pid"
  RCS+=($?)
done
T1=$(date +%s.%N)
AFTER=$(counters)
QDISCS=""
for i in $(seq 0 $((DEVICES - 1))); do
  QDISCS+="$(ip netns exec "$(ns "$i")" tc -s qdisc show dev eth0 | tr '\n' ' ')"$'\n'
done

# stop the daemons now so their summaries are written before testbed.json
for pid in "${DAEMON_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
for pid in "${DAEMON_PIDS[@]}"; do wait "$pid" 2>/dev/null; done
DAEMON_PIDS=()

TESTBED_CC="$(ip netns exec "$(ns 0)" sysctl -n net.ipv4.tcp_congestion_control)" \
  "$PY" - "$OUT" "$DEVICES" "$RATE" "$DELAY_MS" "${BURST:-}" "${LIMIT:-}" "$T0" "$T1" \
  "$BEFORE" "$AFTER" "$QDISCS" "${RCS[*]}" "$*" <<'EOF'
import json, os, sys
from pathlib import Path
out, devices, rate, delay_ms, burst, limit, t0, t1, before, after, qdiscs, rcs, cmd = sys.argv[1:]
before, after = json.loads(before), json.loads(after)
daemons = []
for i in range(int(devices)):
    log = Path(out, f"delay{i}.log")
    lines = log.read_text().strip().splitlines() if log.exists() else []
    try:
        daemons.append(json.loads(lines[-1]) if lines else None)
    except ValueError:
        daemons.append({"log_tail": lines[-1]})
cc = os.environ.get("TESTBED_CC") or None
rec = {
    "devices": int(devices), "rate": rate, "congestion_control": cc, "delay_ms": float(delay_ms),
    "tbf_burst_bytes": int(burst) if burst else None,
    "tbf_limit_bytes": int(limit) if limit else None,
    "wall_s": round(float(t1) - float(t0), 3),
    "rank_exit_codes": [int(c) for c in rcs.split()],
    "wire": [{k: a[k] - b[k] for k in a} for a, b in zip(after, before)],
    "qdiscs": [q for q in qdiscs.splitlines() if q.strip()],
    "delay_daemons": daemons,
    "command": cmd,
}
tmp = Path(out, f".testbed.json.{os.getpid()}")
tmp.write_text(json.dumps(rec, indent=1) + "\n")
os.replace(tmp, Path(out, "testbed.json"))
EOF

status=0
for c in "${RCS[@]}"; do [ "$c" = 0 ] || status=1; done
if [ $status != 0 ]; then
  echo "testbed.sh: rank exit codes: ${RCS[*]} (logs in $OUT/rank*.log)" >&2
fi
exit $status
