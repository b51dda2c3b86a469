#!/usr/bin/env bash
# A worker: joins with the Vagrantfile's bootstrap token. The CA is not pinned
# (--discovery-token-unsafe-skip-ca-verification): the VMs share no files, and this is a lab on a
# private network. Idempotent: a node that has joined has /etc/kubernetes/kubelet.conf.
set -euo pipefail
: "${NODE_NAME:?}" "${API_ADDR:?}" "${KUBEADM_TOKEN:?}"

if [ -f /etc/kubernetes/kubelet.conf ]; then
  echo "==> $NODE_NAME: already joined"
  exit 0
fi
echo "==> $NODE_NAME: waiting for the API server at $API_ADDR:6443"
for _ in $(seq 120); do
  curl -fsk --max-time 3 "https://$API_ADDR:6443/readyz" >/dev/null 2>&1 && break
  sleep 5
done
echo "==> $NODE_NAME: kubeadm join $API_ADDR:6443"
kubeadm join "$API_ADDR:6443" --token "$KUBEADM_TOKEN" \
  --discovery-token-unsafe-skip-ca-verification \
  --node-name "$NODE_NAME" --cri-socket unix:///run/containerd/containerd.sock
