"""waitress serving the API in a thread of the daemon: a production WSGI server with no dependencies.

The request threads only wait on futures; the model stays in its one worker
process, shared with the folder and MQTT inputs.

Idle and slow clients must not take the API away from everyone else: the
server accepts ``http.max_connections`` connections (polled, not select()ed,
so more than 1024 descriptors work), closes keep-alive connections idle for
``idle_timeout`` and connections that have not sent a whole request within
``read_timeout`` of its first byte (slow-loris headers or bodies), and keeps
threads beyond those that wait for the model, so ``/healthz`` always has one.
"""

from __future__ import annotations

import logging
import resource
import threading
import time
from types import TracebackType
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher
from waitress.wasyncore import close_all

from edgevl.config import HttpSettings
from edgevl.errors import ConfigError

log = logging.getLogger(__name__)

# Room for the multipart framing and the form fields around an upload of max_upload bytes.
FORM_OVERHEAD = 1 << 20
# Descriptors beyond the connections: the spool, the worker, MQTT, logs.
SPARE_FDS = 256


class _Channel(HTTPChannel):  # type: ignore[misc]
    """A connection that remembers when its current request began to arrive."""

    request_started = 0.0

    def received(self, data: bytes) -> bool:
        if self.request is None:
            self.request_started = time.monotonic()
        result: bool = super().received(data)
        if self.request is None:  # every request in the data was complete
            self.request_started = 0.0
        return result


class _Server(TcpWSGIServer):  # type: ignore[misc]
    channel_class = _Channel
    read_timeout = 60.0

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle keep-alive connections (channel_timeout)
        cutoff = time.monotonic() - self.read_timeout
        for channel in list(self.active_channels.values()):
            started = getattr(channel, "request_started", 0.0)
            if started and started < cutoff and channel.request is not None:
                channel.will_close = True  # too slow to send its request: closed on the next turn


def _raise_fd_limit(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


class HttpServer:
    def __init__(self, app: Any, settings: HttpSettings) -> None:
        host, port = settings.address
        _raise_fd_limit(settings.max_connections + SPARE_FDS)
        # Each waiting /v1/ask holds a thread; the configured ones stay free for everything else.
        threads = settings.threads + settings.max_waiting + 1
        adj = Adjustments(
            host=host, port=port, threads=threads, ident="edgevl",
            max_request_body_size=int(settings.max_upload) + FORM_OVERHEAD, clear_untrusted_proxy_headers=True,
            connection_limit=settings.max_connections, channel_timeout=max(1, int(settings.idle_timeout)),
            cleanup_interval=1, asyncore_use_poll=True,
        )
        self.map: dict[int, Any] = {}
        self.dispatcher = ThreadedTaskDispatcher()
        self.dispatcher.set_thread_count(threads)
        self.servers: list[_Server] = []
        try:
            for sockinfo in adj.listen:
                server = _Server(app, self.map, dispatcher=self.dispatcher, adj=adj, sockinfo=sockinfo)
                server.read_timeout = settings.read_timeout
                self.servers.append(server)
        except OSError as exc:
            close_all(self.map)
            raise ConfigError(f"http.listen: cannot listen on {settings.listen}: {exc.strerror or exc}") from None
        self.settings = settings
        self._thread = threading.Thread(target=self.servers[0].run, name="http", daemon=True)

    def __enter__(self) -> HttpServer:
        self._thread.start()
        log.info("HTTP API and commissioning page on http://%s/", self.settings.listen)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.dispatcher.shutdown(timeout=5)
        close_all(self.map)  # the listening sockets, the wake-up pipe and open connections
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.warning("the HTTP server thread did not stop")
