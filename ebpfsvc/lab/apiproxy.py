"""The lab's API proxy: the root namespace's loopback -> the API server inside the lab.

`kubectl` and the lab's own Python run on the host, while the API server lives in the
lab's cp namespace. Routing the host into the lab is not allowed (nothing the lab makes
may touch the root namespace's routes), so this relay bridges the two at the socket
level instead: the lab controller binds a listening socket on 127.0.0.1 in the root
namespace and hands it over as an inherited file descriptor; this process runs inside
the cp namespace, so every connection it opens to the API server starts there.

TLS passes through untouched: clients verify the API server's own certificate.

    python -m ebpfsvc.lab.apiproxy LISTEN_FD HOST:PORT
"""

from __future__ import annotations

import socket
import sys
import threading


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        # Half-close so the other direction can finish (a watch's last bytes), then let go.
        for sock, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                sock.shutdown(how)
            except OSError:
                pass


def _serve(client: socket.socket, target: tuple[str, int]) -> None:
    try:
        upstream = socket.create_connection(target, timeout=10)
    except OSError:
        client.close()
        return
    upstream.settimeout(None)
    back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
    back.start()
    _pump(client, upstream)
    back.join()
    client.close()
    upstream.close()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    listener = socket.socket(fileno=int(argv[0]))
    host, _, port = argv[1].rpartition(":")
    host = host.strip("[]")          # an IPv6 address is bracketed (controlplane.host_port)
    target = (host, int(port))
    while True:
        client, _ = listener.accept()
        threading.Thread(target=_serve, args=(client, target), daemon=True).start()


if __name__ == "__main__":
    main()
