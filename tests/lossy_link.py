"""A real TCP link that loses answers: a proxy on a free loopback port in front of a real
server (Redis here), passing every byte on, except that while ``drop`` says so, a request
it matches is delivered and its answer thrown away, the connection then cut, as a network
that fails at the worst moment does. The server did the work; the client never hears."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tests.services import free_port

Matcher = Callable[[bytes], bool]


class LossyLink:
    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self._target = target_port
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._matcher: Matcher | None = None
        self.dropped = 0  # answers thrown away so far
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, matcher: Matcher | None) -> None:
        """From now on, lose the answer to every request ``matcher`` accepts (None: none)."""
        self._matcher = matcher

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self._target))
            doomed = threading.Event()  # this connection's next answer is to be lost
            threading.Thread(target=self._requests, args=(client, server, doomed), daemon=True).start()
            threading.Thread(target=self._answers, args=(server, client, doomed), daemon=True).start()

    def _requests(self, client: socket.socket, server: socket.socket, doomed: threading.Event) -> None:
        try:
            while request := client.recv(1 << 20):
                matcher = self._matcher
                if matcher is not None and matcher(request):
                    doomed.set()  # before it is sent: its answer cannot come back first
                server.sendall(request)
        except OSError:
            pass
        finally:
            server.close()

    def _answers(self, server: socket.socket, client: socket.socket, doomed: threading.Event) -> None:
        # A client that waits for each answer before its next request (redis-py without a
        # pipeline does) gets the doomed request's answer as the next bytes from the server.
        try:
            while answer := server.recv(1 << 20):
                if doomed.is_set():
                    self.dropped += 1
                    return  # the work is done; the answer goes nowhere, the link is cut
                client.sendall(answer)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):  # the client sees the link cut at once
                client.shutdown(socket.SHUT_RDWR)
            client.close()
            server.close()

    def close(self) -> None:
        self._stopping = True
        self._listener.close()


@contextmanager
def lossy_link(target_port: int) -> Iterator[LossyLink]:
    link = LossyLink(target_port)
    try:
        yield link
    finally:
        link.close()
