#!/usr/bin/env bash
# One-time set-up for the shaped-network testbed (benchmarks/netns/testbed.sh): the tools the
# testbed drives (ip, tc, iptables) and netfilterqueue, the Python binding delay.py uses to hold
# packets. Needs root (apt-get); exits 0 with a message otherwise, like the testbed itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "$(id -u)" != 0 ]; then
  echo "skipped: needs root (apt-get install; network namespaces, tc, iptables)"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# libnetfilter-queue-dev: headers netfilterqueue compiles against; iptables: the NFQUEUE target;
# iproute2: ip netns / ip link / tc (tbf). netem is not needed (and is absent on some kernels).
apt-get install -y -qq libnetfilter-queue-dev iptables iproute2 build-essential >/dev/null
.venv/bin/pip install -q netfilterqueue==1.1.0
.venv/bin/python -c "import netfilterqueue; print('netfilterqueue', netfilterqueue.__version__ if hasattr(netfilterqueue, '__version__') else 'ok')"
for t in ip tc iptables; do command -v "$t" >/dev/null || { echo "missing: $t"; exit 1; }; done
# the kernel needs tbf (rate) and the NFQUEUE target (delay); probe tbf in a throw-away namespace
ip netns add astra-probe
trap 'ip netns del astra-probe 2>/dev/null || true' EXIT
ip -n astra-probe link add p0 type veth peer name p1
ip -n astra-probe link set p0 up
if ip netns exec astra-probe tc qdisc add dev p0 root tbf rate 10mbit burst 16kb latency 50ms; then
  echo "tbf: ok"
else
  echo "tbf: not available in this kernel"; exit 1
fi
if ip netns exec astra-probe iptables -A INPUT -i p0 -j NFQUEUE --queue-num 1; then
  echo "NFQUEUE: ok"
else
  echo "NFQUEUE target: not available"; exit 1
fi
echo "setup done"
