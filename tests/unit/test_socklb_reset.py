"""socklb.reset_removed's pass in one namespace (docs/socklb.md, "A backend leaves"): which dumped
sockets it destroys, and that one the kernel refuses does not keep the others on a backend that
left. The real SOCK_DESTROY is in tests/bpf/test_socklb.py."""

import errno
import socket

import pyroute2

from ebpfsvc.datapath import socklb

GONE, KEPT = "198.18.3.2", "198.18.3.1"


def dumped(cookie: int, peer: str, port: int = 7000) -> dict:
    return {"idiag_dst": peer, "idiag_dport": port, "idiag_cookie": cookie}


class FakeDiag:
    """A DiagSocket whose dump of IPv4 TCP is `tcp`; every other dump is empty."""

    def __init__(self, tcp: list[dict]):
        self.tcp = tcp

    def __call__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def bind(self):
        pass

    def get_sock_stats(self, family, protocol, states):
        return self.tcp if (family, protocol) == (socket.AF_INET, socket.IPPROTO_TCP) else []


def test_a_refused_destroy_does_not_keep_the_other_sockets(monkeypatch):
    tcp = [dumped(1, GONE), dumped(2, GONE), dumped(3, KEPT), dumped(4, GONE), dumped(5, "0.0.0.0", 0)]
    monkeypatch.setattr(pyroute2, "DiagSocket", FakeDiag(tcp))
    destroyed = []

    def destroy(diag, family, proto, msg):
        if msg["idiag_cookie"] == 1:
            raise OSError(errno.EPERM, f"SOCK_DESTROY {msg['idiag_dst']}:{msg['idiag_dport']}: refused")
        destroyed.append(msg["idiag_cookie"])

    monkeypatch.setattr(socklb, "_destroy", destroy)
    counts, refused = socklb._reset_in_netns(lambda cookie, peer, port: True,
                                             lambda proto, address, port: address == KEPT)
    assert destroyed == [2, 4] and counts == {"TCP": 2, "UDP": 0}
    assert refused == [f"[Errno {errno.EPERM}] SOCK_DESTROY {GONE}:7000: refused"]


def test_sockets_the_socket_path_did_not_translate_are_left_alone(monkeypatch):
    monkeypatch.setattr(pyroute2, "DiagSocket", FakeDiag([dumped(1, GONE), dumped(2, GONE)]))
    destroyed = []
    monkeypatch.setattr(socklb, "_destroy", lambda diag, family, proto, msg: destroyed.append(msg["idiag_cookie"]))
    counts, refused = socklb._reset_in_netns(lambda cookie, peer, port: cookie == 2,
                                             lambda proto, address, port: False)
    assert destroyed == [2] and counts == {"TCP": 1, "UDP": 0} and refused == []
