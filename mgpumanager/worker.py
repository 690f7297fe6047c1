"""The gunicorn worker class: gthread, with three changes a broker needs.

gunicorn's documented extension point (``worker_class`` naming a subclass
of its gthread worker) is used so that slow clients cannot starve the
broker, and so that a stop loses nothing:

1. **A connection reaches a thread only once its request head is complete.**
   gthread hands a connection to a thread as soon as any byte arrives; the
   thread then blocks in the header parser, and as many trickling clients as
   there are threads stop every endpoint, /healthz included. Here the event
   loop gathers the head without blocking (for a kept-alive connection too)
   and closes a connection that has not sent a whole head within
   ``proxy.client_timeout_s``.
2. **The graceful close does not block the event loop.** gthread closes a
   ``Connection: close`` socket with ``util.close_graceful`` on its main
   thread, waiting up to 2 s for the client to close its side; one client
   that lingers stalls every other connection. Here the socket is
   half-closed and then drained by the event loop, with the same deadline.
3. **SIGTERM tells the broker**, which keeps serving its queue in order
   while the graceful timeout allows and answers what is still queued
   shortly before it ends (503 ``shutting_down``).
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import time
from collections import deque
from functools import partial

from gunicorn.workers.gthread import _DEFER, TConn, ThreadWorker

HEAD_ENDS = (b"\r\n\r\n", b"\n\n")    # a bare-LF head goes to gunicorn, which answers 400
# A real client's request head is a few KiB; a longer one is refused here
# (431) rather than gathered into memory or handed to a thread.
HEAD_MAX_BYTES = 64 * 1024
_TOO_LARGE_BODY = b'{"error": {"code": "bad_request", "message": "the request head is over 64 KiB"}}\n'
TOO_LARGE = (b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: application/json\r\n"
             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
             % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY))
LINGER_S = 2.0                  # as gunicorn's close_graceful
LINGER_MAX_BYTES = 65536


class BrokerConn(TConn):
    """A connection whose graceful close is handed to the worker's event loop."""

    def __init__(self, worker: "BrokerWorker", *args):
        super().__init__(*args)
        self.worker = worker
        self.head = bytearray()
        self.head_deadline = 0.0

    def close(self, graceful: bool = False):
        if graceful:
            self.worker.linger(self.sock)
        else:
            super().close()


class CheckedOncePerSecond:
    """gunicorn's worker touches its heartbeat file and asks for its
    parent's pid on every pass of the event loop, three passes per small
    request: six syscalls of about thirty. Here at most once a second; the
    arbiter's timeout is tens of seconds."""

    CHECK_EVERY_S = 1.0
    _notified_at = float("-inf")
    _parent_checked_at = float("-inf")

    def notify(self):
        now = time.monotonic()
        if now - self._notified_at >= self.CHECK_EVERY_S:
            self._notified_at = now
            super().notify()

    def is_parent_alive(self):
        now = time.monotonic()
        if now - self._parent_checked_at < self.CHECK_EVERY_S:
            return True
        self._parent_checked_at = now
        return super().is_parent_alive()


class BrokerWorker(CheckedOncePerSecond, ThreadWorker):

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.heading: deque[BrokerConn] = deque()      # gathering a head; by deadline
        self.lingering: deque[tuple[float, socket.socket]] = deque()
        self.head_timeout_s = 60.0
        self._listeners_shut = False

    def load_wsgi(self):
        super().load_wsgi()
        broker = self._broker()
        if broker is not None:
            self.head_timeout_s = broker.config.proxy.client_timeout_s

    def _broker(self):
        # None while still booting: a worker a fast second HUP retires
        # gets its SIGTERM before it has loaded the app.
        extensions = getattr(getattr(self, "wsgi", None), "extensions", None) or {}
        return extensions.get("mgpumanager")

    # -- 1. whole heads only --------------------------------------------------

    def accept(self, listener):
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors: leave the connection in the backlog
                # rather than die; the ones we hold will close.
                self.log.warning("cannot accept a connection now: %s", e)
                time.sleep(0.05)
                return
            if e.errno == errno.EINVAL:
                # Its read side was shut on a full stop (refuse_new_if_stopping)
                # while the event loop could still poll it: accept no more.
                self._listeners_shut = True
                self.set_accept_enabled(False)
                return
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = BrokerConn(self, self.cfg, client_sock, client_addr, listener.getsockname())
        if self.cfg.is_ssl:
            self.enqueue_req(conn)        # TLS: the thread does the handshake as before
        else:
            self._gather(conn)

    def set_accept_enabled(self, enabled):
        if enabled and self._listeners_shut:
            return                        # shut for a stop: polling them would spin
        super().set_accept_enabled(enabled)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection has bytes: gather its next head first."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        if isinstance(conn, BrokerConn) and not self.cfg.is_ssl:
            self._gather(conn)
        else:
            self.enqueue_req(conn)

    def finish_request(self, conn, fs):
        """A kept-alive connection whose client pipelined its next request
        has those bytes read ahead already, and gunicorn hands it straight
        to a thread, whole head or not: a partial head would pin the thread
        for as long as the client likes. Gather the rest like any other."""
        if isinstance(conn, BrokerConn) and not self.cfg.is_ssl and not fs.cancelled() \
                and fs.exception() is None and fs.result() and fs.result() is not _DEFER \
                and conn.parser is not None:
            ahead = conn.parser.unreader.buf.getvalue()
            if ahead and not any(end in ahead for end in HEAD_ENDS):
                conn.parser.unreader.take_buffered()
                self._gather(conn, ahead)
                return
        super().finish_request(conn, fs)

    def _gather(self, conn: BrokerConn, ahead: bytes = b"") -> None:
        conn.sock.setblocking(False)
        conn.head = bytearray()
        conn.head_deadline = time.monotonic() + self.head_timeout_s
        self.heading.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))
        if ahead:
            self._head_bytes(conn, conn.sock, ahead)

    def _on_head_bytes(self, conn: BrokerConn, sock) -> None:
        data = _recv(sock)
        if data is not None:
            self._head_bytes(conn, sock, data)

    def _head_bytes(self, conn: BrokerConn, sock, data: bytes) -> None:
        if data:
            start = max(0, len(conn.head) - 3)      # only the new bytes can end the head
            conn.head += data
            complete = any(conn.head.find(end, start) >= 0 for end in HEAD_ENDS)
            if not complete and len(conn.head) <= HEAD_MAX_BYTES:
                return
            if not complete:
                self._stop_gathering(conn)
                try:
                    sock.send(TOO_LARGE)
                except OSError:
                    pass
                self.nr_conns -= 1
                conn.close()
                return
        self._stop_gathering(conn)
        if not data:
            self.nr_conns -= 1
            conn.close()
            return
        # The head (and whatever followed it) goes back in front of the
        # socket for gunicorn's parser, which then never waits for it.
        conn.init()
        conn.parser.unreader.unread(bytes(conn.head))
        conn.head = bytearray()
        conn.data_ready = True
        self.enqueue_req(conn)

    def _stop_gathering(self, conn: BrokerConn) -> None:
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass
        try:
            self.heading.remove(conn)
        except ValueError:
            pass

    def murder_pending(self):
        super().murder_pending()
        # At worker_connections gunicorn stops accepting, and idle sockets
        # (an attacker reconnects as they time out) would keep everyone out:
        # make room by closing the oldest connection that has sent no whole
        # head, then the oldest idle kept-alive one.
        while self.nr_conns >= self.worker_connections and (self.heading or
                                                             self.keepalived_conns):
            if self.heading:
                conn = self.heading[0]
                self._stop_gathering(conn)
            else:
                conn = self.keepalived_conns.popleft()
                try:
                    self.poller.unregister(conn.sock)
                except (OSError, KeyError, ValueError):
                    pass
            self.nr_conns -= 1
            conn.close()
        now = time.monotonic()
        while self.heading and self.heading[0].head_deadline <= now:
            conn = self.heading[0]
            self._stop_gathering(conn)
            self.nr_conns -= 1
            conn.close()
        while self.lingering and self.lingering[0][0] <= now:
            self._end_linger(self.lingering[0][1])

    # -- 2. a graceful close that does not block ------------------------------

    def linger(self, sock) -> None:
        """Half-close, let the client's remaining bytes drain on the event
        loop, close on its end of file or after LINGER_S (RFC 9112 9.6).
        A lingering socket still counts against worker_connections."""
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.setblocking(False)
            self.poller.register(sock, selectors.EVENT_READ, partial(self._drain, [0]))
        except (OSError, ValueError, KeyError):
            _close(sock)
            return
        self.nr_conns += 1
        self.lingering.append((time.monotonic() + LINGER_S, sock))

    def _drain(self, drained: list, sock) -> None:
        data = _recv(sock)
        if data is None:
            return
        drained[0] += len(data)
        if not data or drained[0] >= LINGER_MAX_BYTES:
            self._end_linger(sock)

    def _end_linger(self, sock) -> None:
        try:
            self.poller.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        self.lingering = deque(item for item in self.lingering if item[1] is not sock)
        self.nr_conns -= 1
        _close(sock)

    # -- 3. a stop that answers everyone ---------------------------------------

    def handle_exit(self, sig, frame):
        if self.alive:
            broker = self._broker()
            if broker is not None:
                broker.begin_shutdown(time.monotonic() + self.cfg.graceful_timeout,
                                      self.refuse_new_if_stopping)
        super().handle_exit(sig, frame)

    def refuse_new_if_stopping(self) -> None:
        """On a full stop, refuse new connections at once instead of leaving
        them in the listen backlog until this worker exits.

        A SIGTERM comes both when gunicorn stops and when a HUP retires this
        worker; only on a stop has the master already closed its listening
        sockets (gunicorn closes them before it signals the workers). While
        the master still holds them, a new worker serves them: leave them be.
        """
        try:
            ours = {os.fstat(s.fileno()).st_ino for s in self.sockets}
        except (OSError, AttributeError, ValueError):
            return                        # the event loop has closed them already: nothing to do
        try:
            master = set()
            for fd in os.listdir(f"/proc/{self.ppid}/fd"):
                try:
                    master.add(os.stat(f"/proc/{self.ppid}/fd/{fd}").st_ino)
                except OSError:
                    continue
        except OSError:
            return                        # cannot tell: keep gunicorn's behaviour
        if ours & master:
            return                        # a reload: the master keeps serving them
        for s in self.sockets:
            try:
                s.sock.shutdown(socket.SHUT_RD)   # the backlog is reset, new SYNs refused
            except (OSError, AttributeError):
                pass

    def run(self):
        try:
            super().run()
        finally:
            for _, sock in list(self.lingering):
                _close(sock)


def _recv(sock) -> bytes | None:
    """What a non-blocking socket has: bytes, b"" at its end (or on an error),
    None if nothing yet."""
    try:
        return sock.recv(65536)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass
