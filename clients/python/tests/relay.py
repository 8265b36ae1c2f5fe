"""A TCP relay between a worker and the database the tests use, so that a test can cut the worker's
connections, or make the database unreachable for good, at a moment of its choosing."""

from __future__ import annotations

import socket
import threading

import psycopg.conninfo


class Relay:
    """Relays connections on a port of its own to the database of ``conninfo``; ``conninfo`` (the
    attribute) reaches the database through it."""

    def __init__(self, conninfo: str) -> None:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
        self.target = (str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        self.conninfo = psycopg.conninfo.make_conninfo(conninfo, host="127.0.0.1", port=port)
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed by cut()
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def drop_connections(self) -> None:
        """Cuts every relayed connection; new ones still get through."""
        with self.lock:
            ends, self.sockets = self.sockets, []
        for end in ends:
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            end.close()

    def cut(self) -> None:
        """Cuts every connection and closes the port: from now on, connecting is refused."""
        if self.listener.fileno() != -1:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone would not) and stops listening
            self.listener.close()
        self.drop_connections()
