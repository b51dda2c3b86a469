#!/usr/bin/env bash
# Every node: containerd, kubeadm/kubelet/kubectl from the Kubernetes apt repository, a host-gw
# pod network (the bridge + host-local CNI plugins, static routes between nodes: no CNI vendor),
# and the ebpfsvc image built from the repository and imported into containerd. Idempotent: each
# step checks or overwrites; a second run changes nothing but rebuilds the image from cache.
set -euo pipefail
: "${NODE_NAME:?}" "${NODE_IP:?}" "${POD_CIDR:?}" "${PEERS:?}" "${CLUSTER_CIDR:?}" "${K8S_VERSION:?}" "${SRC:?}"
export DEBIAN_FRONTEND=noninteractive
step() { printf '==> %s: %s\n' "$NODE_NAME" "$*"; }

step "kernel modules, sysctls, no swap"
printf 'overlay\nbr_netfilter\n' > /etc/modules-load.d/kubernetes.conf
modprobe overlay
modprobe br_netfilter
cat > /etc/sysctl.d/90-kubernetes.conf <<CONF
net.ipv4.ip_forward = 1
net.bridge.bridge-nf-call-iptables = 1
CONF
sysctl -q --system
swapoff -a
sed -i -E '/^[^#].*[[:space:]]swap[[:space:]]/s/^/#/' /etc/fstab

step "packages"
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
  containerd buildah ca-certificates curl gpg iptables conntrack socat ethtool iproute2 >/dev/null

step "Kubernetes $K8S_VERSION apt repository"
keyring=/etc/apt/keyrings/kubernetes-apt-keyring.gpg
repo="https://pkgs.k8s.io/core:/stable:/v${K8S_VERSION}/deb/"
if [ ! -s "$keyring" ] || ! grep -qs "$repo" /etc/apt/sources.list.d/kubernetes.list; then
  install -d -m 0755 /etc/apt/keyrings
  curl -fsSL "${repo}Release.key" | gpg --dearmor --yes -o "$keyring"
  echo "deb [signed-by=$keyring] $repo /" > /etc/apt/sources.list.d/kubernetes.list
  apt-get update -qq
fi
apt-get install -y -qq --no-install-recommends kubelet kubeadm kubectl kubernetes-cni >/dev/null
apt-mark hold kubelet kubeadm kubectl >/dev/null

step "containerd (systemd cgroups, kubeadm's pause image)"
pause=$(kubeadm config images list --kubernetes-version "$(kubeadm version -o short)" 2>/dev/null \
          | grep /pause: || echo registry.k8s.io/pause:3.10)
mkdir -p /etc/containerd
containerd config default \
  | sed -e 's/SystemdCgroup = false/SystemdCgroup = true/' \
        -e "s#sandbox_image = .*#sandbox_image = \"$pause\"#" > /etc/containerd/config.toml.new
if ! cmp -s /etc/containerd/config.toml.new /etc/containerd/config.toml; then
  mv /etc/containerd/config.toml.new /etc/containerd/config.toml
  systemctl restart containerd
else
  rm /etc/containerd/config.toml.new
fi
systemctl enable --now containerd >/dev/null

# The agent takes the interface of the Node's InternalIP as its uplink: eth1 (eth0 is the
# provider's NAT or management link), so --node-ip must be on eth1.
if ! ip -o -4 addr show dev eth1 2>/dev/null | grep -qF " $NODE_IP/"; then
  echo "node: $NODE_IP is not on eth1; the agent would take another interface as its uplink" >&2
  exit 1
fi

step "kubelet on $NODE_IP (not the NAT interface every VM shares)"
echo "KUBELET_EXTRA_ARGS=--node-ip=$NODE_IP" > /etc/default/kubelet
systemctl enable kubelet >/dev/null

step "host-gw pod network: $POD_CIDR on cni0, routes to the other nodes"
mkdir -p /etc/cni/net.d
# hairpinMode: a pod that reaches its own Service may get itself as the backend.
# ipMasq off: pods keep their addresses across nodes; hostgw-routes.sh masquerades what leaves the cluster.
cat > /etc/cni/net.d/10-ebpfsvc-hostgw.conflist <<CONF
{
  "cniVersion": "1.0.0",
  "name": "ebpfsvc-hostgw",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "$POD_CIDR"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CONF
install -m 0755 "$SRC/vagrant/provision/hostgw-routes.sh" /usr/local/sbin/ebpfsvc-hostgw-routes
cat > /etc/default/ebpfsvc-hostgw <<CONF
NODE_IP="$NODE_IP"
PEERS="$PEERS"
CLUSTER_CIDR="$CLUSTER_CIDR"
CONF
cat > /etc/systemd/system/ebpfsvc-hostgw.service <<'CONF'
[Unit]
Description=host-gw routes between the nodes' pod CIDRs (ebpfsvc Vagrant cluster)
Wants=network-online.target
After=network-online.target

[Service]
Type=oneshot
RemainAfterExit=yes
EnvironmentFile=/etc/default/ebpfsvc-hostgw
ExecStart=/usr/local/sbin/ebpfsvc-hostgw-routes

[Install]
WantedBy=multi-user.target
CONF
systemctl daemon-reload
systemctl enable ebpfsvc-hostgw >/dev/null
systemctl restart ebpfsvc-hostgw

step "ebpfsvc image, built here from $SRC and imported into containerd"
image=localhost/ebpfsvc:0.1.0
buildah build --quiet --layers -f "$SRC/deploy/Containerfile" -t "$image" "$SRC" >/dev/null
rm -f /var/tmp/ebpfsvc-image.tar
buildah push --quiet "$image" "docker-archive:/var/tmp/ebpfsvc-image.tar:$image"
ctr -n k8s.io images import /var/tmp/ebpfsvc-image.tar >/dev/null
rm -f /var/tmp/ebpfsvc-image.tar
step "ok"
