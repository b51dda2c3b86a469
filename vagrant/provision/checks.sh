#!/usr/bin/env bash
# End-to-end checks on the Vagrant cluster, the same ones the netns lab runs: a Service with two
# backends on two workers reached through its ClusterIP (by address and by DNS name) from a pod,
# through a NodePort on each worker from outside the pod network, and a ClientIP-affinity Service
# that must keep a client on one backend. Exits non-zero if any check fails. Re-runnable.
set -euo pipefail
: "${SRC:?}" "${PEERS:?}" "${NODE_IP:?}"
export KUBECONFIG=/etc/kubernetes/admin.conf
ns=ebpfsvc-checks
requests=20
passed=0
failed=0

kubectl apply -f "$SRC/vagrant/manifests/checks.yaml" >/dev/null
kubectl -n "$ns" rollout status deployment/echo --timeout=5m >/dev/null
kubectl -n "$ns" wait --for=condition=Ready pod/client --timeout=5m >/dev/null
backends=$(kubectl -n "$ns" get pods -l app=echo -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}' | sort)

# The distinct backend names that $requests GETs of URL return, from the client pod.
from_client() {
  kubectl -n "$ns" exec client -- sh -c \
    "for i in \$(seq $requests); do curl -sS --max-time 3 '$1/hostname'; echo; done" | sed '/^$/d' | sort -u
}
# The same from this node's own network namespace (outside the pod network).
from_node() {
  for _ in $(seq "$requests"); do curl -sS --max-time 3 "$1/hostname"; echo; done | sed '/^$/d' | sort -u
}
check() {
  local name=$1 got=$2 want=$3
  if [ "$got" = "$want" ]; then
    passed=$((passed + 1)); echo "PASS  $name"
  else
    failed=$((failed + 1)); echo "FAIL  $name: got [$(echo "$got" | paste -sd' ')], want [$(echo "$want" | paste -sd' ')]"
  fi
}

cluster_ip=$(kubectl -n "$ns" get service echo -o jsonpath='{.spec.clusterIP}')
affinity_ip=$(kubectl -n "$ns" get service echo-affinity -o jsonpath='{.spec.clusterIP}')
# Endpoints settle a moment after the pods are Ready.
for _ in $(seq 30); do
  [ "$(from_client "http://$cluster_ip" 2>/dev/null)" = "$backends" ] && break
  sleep 2
done

check "ClusterIP $cluster_ip:80 reaches both backends" "$(from_client "http://$cluster_ip")" "$backends"
check "ClusterIP by name (cluster DNS is a ClusterIP too)" \
  "$(from_client "http://echo.$ns.svc.cluster.local")" "$backends"
for peer in $PEERS; do
  ip=${peer%%=*}
  [ "$ip" = "$NODE_IP" ] && continue   # traffic to a local address never crosses the uplink
  check "NodePort $ip:30080 reaches both backends" "$(from_node "http://$ip:30080")" "$backends"
done
affinity=$(from_client "http://$affinity_ip")
check "sessionAffinity ClientIP keeps one backend" "$(grep -c . <<<"$affinity" || true)" "1"
check "sessionAffinity backend is one of the backends" "$(echo "$backends" | grep -cxF "$affinity")" "1"

echo "checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
