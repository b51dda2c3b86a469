"""Servers in backend pods for the tests with real traffic (test_socklb, test_ipv6_traffic): a TCP
(8080) and a UDP (5353) server in each pod, answering with the pod's name, so a client sees which
backend it reached."""

from __future__ import annotations

import ipaddress
import socket
import threading

from ebpfsvc.datapath import nsenter


class Servers:
    """The servers of `netns_of` ({address: namespace}), named by `names` ({address: name}); a TCP
    answer is the name `repeat` times (many: several segments, GSO and offloads on the way back)."""

    def __init__(self, netns_of: dict[str, str], names: dict[str, str], repeat: int = 1):
        self.sockets = []
        self.threads = []
        self.repeat = repeat
        for addr, ns in netns_of.items():
            family = socket.AF_INET6 if ipaddress.ip_address(addr).version == 6 else socket.AF_INET
            tcp_sock = nsenter.socket_in(ns, family, socket.SOCK_STREAM)
            tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp_sock.bind((addr, 8080))
            tcp_sock.listen(16)
            udp_sock = nsenter.socket_in(ns, family, socket.SOCK_DGRAM)
            udp_sock.bind((addr, 5353))
            self.sockets += [tcp_sock, udp_sock]
            for target, s in ((self._tcp, tcp_sock), (self._udp, udp_sock)):
                t = threading.Thread(target=target, args=(s, names[addr]), daemon=True)
                t.start()
                self.threads.append(t)

    def _tcp(self, s, name):
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(3)
                try:
                    conn.recv(4096)         # the probe's request
                    conn.sendall(name.encode() * self.repeat)
                except OSError:
                    pass

    @staticmethod
    def _udp(s, name):
        while True:
            try:
                _, src = s.recvfrom(64)
                if src is None:             # shut down
                    return
                s.sendto(name.encode(), src)
            except OSError:
                return

    def close(self):
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(timeout=2)
