"""waitress serving the API in a thread of the daemon: a production WSGI server with no dependencies.

The request threads only wait on futures; the model stays in its one worker
process, shared with the folder and MQTT inputs.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType
from typing import Any

from waitress.server import create_server
from waitress.wasyncore import close_all

from edgevl.config import HttpSettings
from edgevl.errors import ConfigError

log = logging.getLogger(__name__)

# Room for the multipart framing and the form fields around an upload of max_upload bytes.
FORM_OVERHEAD = 1 << 20


class HttpServer:
    def __init__(self, app: Any, settings: HttpSettings) -> None:
        host, port = settings.address
        try:
            self.server = create_server(
                app, host=host, port=port, threads=settings.threads, ident="edgevl",
                max_request_body_size=int(settings.max_upload) + FORM_OVERHEAD,
                channel_timeout=max(120, int(settings.request_timeout) + 30), clear_untrusted_proxy_headers=True,
            )
        except OSError as exc:
            raise ConfigError(f"http.listen: cannot listen on {settings.listen}: {exc.strerror or exc}") from None
        self.settings = settings
        self._thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    def __enter__(self) -> HttpServer:
        self._thread.start()
        log.info("HTTP API and commissioning page on http://%s/", self.settings.listen)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.task_dispatcher.shutdown(timeout=5)
        close_all(self.server._map)  # the listening socket, the wake-up pipe and open connections
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            log.warning("the HTTP server thread did not stop")
