#!/usr/bin/env bash
# iperf3 between pods on two workers: straight to the server's pod IP (the pod network alone) and
# through its ClusterIP (ebpfsvc's datapath on the client's veth), TCP, one and four streams.
# Prints a table and keeps iperf3's JSON in /root/ebpfsvc-bench/. Re-runnable.
set -euo pipefail
: "${SRC:?}"
export KUBECONFIG=/etc/kubernetes/admin.conf
ns=ebpfsvc-bench
seconds=${BENCH_SECONDS:-10}
out=/root/ebpfsvc-bench/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$out"

kubectl apply -f "$SRC/vagrant/manifests/iperf3.yaml" >/dev/null
kubectl -n "$ns" rollout status deployment/iperf3-server --timeout=5m >/dev/null
kubectl -n "$ns" wait --for=condition=Ready pod/iperf3-client --timeout=5m >/dev/null
pod_ip=$(kubectl -n "$ns" get pods -l app=iperf3-server -o jsonpath='{.items[0].status.podIP}')
cluster_ip=$(kubectl -n "$ns" get service iperf3 -o jsonpath='{.spec.clusterIP}')

printf '%-10s %-16s %8s %12s %12s\n' path address streams "Gbit/s" retransmits
for target in "pod-ip:$pod_ip" "clusterip:$cluster_ip"; do
  for streams in 1 4; do
    name=${target%%:*}
    addr=${target#*:}
    json="$out/$name-P$streams.json"
    kubectl -n "$ns" exec iperf3-client -- iperf3 -c "$addr" -p 5201 -t "$seconds" -P "$streams" -J > "$json"
    python3 - "$json" "$name" "$addr" "$streams" <<'PY'
import json, sys
path, name, addr, streams = sys.argv[1:]
end = json.load(open(path))["end"]
gbps = end["sum_received"]["bits_per_second"] / 1e9
print(f"{name:<10} {addr:<16} {streams:>8} {gbps:>12.2f} {end['sum_sent'].get('retransmits', 0):>12}")
PY
  done
done
echo "iperf3 JSON: $out"
