#!/usr/bin/env bash
# The control plane: `kubeadm init` without kube-proxy (skipPhases: addon/kube-proxy, the config
# file form of --skip-phases=addon/kube-proxy), pod and service CIDRs from 198.18.0.0/15, the
# bootstrap token the workers join with, then ebpfsvc from deploy/ through the overlay in
# vagrant/ebpfsvc/. Idempotent: init runs once; the token and the apply are re-asserted.
set -euo pipefail
: "${NODE_NAME:?}" "${NODE_IP:?}" "${CLUSTER_CIDR:?}" "${SERVICE_CIDR:?}" "${KUBEADM_TOKEN:?}" "${SRC:?}"
step() { printf '==> %s: %s\n' "$NODE_NAME" "$*"; }
export KUBECONFIG=/etc/kubernetes/admin.conf

if [ ! -f /etc/kubernetes/admin.conf ]; then
  step "kubeadm init (no kube-proxy)"
  version=$(kubeadm version -o short)
  cat > /etc/kubernetes/kubeadm-init.yaml <<CONF
apiVersion: kubeadm.k8s.io/v1beta4
kind: InitConfiguration
bootstrapTokens:
  - token: "$KUBEADM_TOKEN"
    ttl: "0s"
localAPIEndpoint:
  advertiseAddress: "$NODE_IP"
  bindPort: 6443
nodeRegistration:
  name: "$NODE_NAME"
  criSocket: unix:///run/containerd/containerd.sock
skipPhases:
  - addon/kube-proxy
---
apiVersion: kubeadm.k8s.io/v1beta4
kind: ClusterConfiguration
kubernetesVersion: "$version"
controlPlaneEndpoint: "$NODE_IP:6443"
# Kept in the cluster's kubeadm-config, so kubeadm upgrade does not bring kube-proxy back
# (skipping the phase sets it too; written out for the reader).
proxy:
  disabled: true
networking:
  podSubnet: "$CLUSTER_CIDR"
  serviceSubnet: "$SERVICE_CIDR"
controllerManager:
  extraArgs:
    # Each node's pod /24 is fixed by the Vagrantfile (CNI config and host-gw routes), so the
    # controller manager must not hand out others in node.spec.podCIDR.
    - name: allocate-node-cidrs
      value: "false"
CONF
  kubeadm init --config /etc/kubernetes/kubeadm-init.yaml
fi

step "kubeconfig for root and vagrant"
install -d -m 0700 /root/.kube
install -m 0600 /etc/kubernetes/admin.conf /root/.kube/config
if id vagrant >/dev/null 2>&1; then
  install -d -m 0700 -o vagrant -g vagrant /home/vagrant/.kube
  install -m 0600 -o vagrant -g vagrant /etc/kubernetes/admin.conf /home/vagrant/.kube/config
fi

step "bootstrap token for the workers"
if ! kubeadm token list -o jsonpath='{.token}{"\n"}' | grep -qx "$KUBEADM_TOKEN"; then
  kubeadm token create "$KUBEADM_TOKEN" --ttl 0
fi

step "no kube-proxy"
if kubectl -n kube-system get daemonset kube-proxy >/dev/null 2>&1; then
  echo "control-plane: a kube-proxy DaemonSet exists; see docs/deploy.md, 'Removing kube-proxy'" >&2
  exit 1
fi

step "ebpfsvc (kubectl apply -k vagrant/ebpfsvc)"
kubectl apply -k "$SRC/vagrant/ebpfsvc"
kubectl -n kube-system rollout status daemonset/ebpfsvc --timeout=10m
step "ok"
