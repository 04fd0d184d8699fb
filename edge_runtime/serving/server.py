"""Running the app on uvicorn: in the foreground (`edgeops serve`) or on a thread (tests, benchmarks)."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_runtime.model import EdgeModel
from edge_runtime.serving.app import create_app
from edge_runtime.serving.limits import ServeLimits

log = logging.getLogger("edgeops.serve")


class HeaderDeadlineH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request's headers.

    uvicorn closes idle keep-alive connections, but any byte received cancels that timer, so a
    client that sends its headers a byte at a time would keep its connection (and a slot of
    ``limit_concurrency``) for ever. Here a connection must complete each request's headers
    within ``header_timeout`` seconds of connecting or of its previous answer.
    """

    header_timeout = 10.0

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: Any = None
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._request_active():
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self._request_active():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _request_active(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_deadline(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self._request_active() and not self.transport.is_closing():
            log.debug("closing a connection whose request headers did not arrive within %.1f s", self.header_timeout)
            self.transport.close()


def server_config(model: EdgeModel, host: str, port: int, limits: ServeLimits, agent: Any = None) -> uvicorn.Config:
    """uvicorn's configuration: HTTP/1.1 (h11) with the header deadline, the limits' timeouts, no access log."""
    protocol = type("HeaderDeadlineH11", (HeaderDeadlineH11,), {"header_timeout": limits.header_timeout_s})
    app = create_app(model, limits, agent)
    return uvicorn.Config(app, host=host, port=port, http=protocol,  # type: ignore[arg-type]
                          lifespan="on", log_config=None, access_log=False, server_header=False,
                          timeout_keep_alive=limits.keep_alive_s,  # type: ignore[arg-type]
                          limit_concurrency=limits.max_connections, timeout_graceful_shutdown=5)


def serve_forever(model: EdgeModel, host: str, port: int, agent: Any = None, limits: ServeLimits | None = None) -> None:
    """Serve until SIGINT/SIGTERM; then stop the agent (which sends what its spool holds)."""
    limits = limits or ServeLimits()

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully, then raises the signal again with this handler in place
        signal.signal(signal.SIGTERM, interrupt)
    log.info("serving %r on http://%s:%d (POST /predict, GET /openapi.json)", model, host, port)
    try:
        uvicorn.Server(server_config(model, host, port, limits, agent)).run()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        if agent is not None:
            agent.stop()


@contextmanager
def running_server(model: EdgeModel, host: str = "127.0.0.1", port: int = 0, limits: ServeLimits | None = None,
                   agent: Any = None, start_timeout: float = 30.0) -> Iterator[str]:
    """Serve on a thread (port 0: a free one) and yield the base URL; stops the server on exit."""
    server = uvicorn.Server(server_config(model, host, port, limits or ServeLimits(), agent))
    thread = threading.Thread(target=server.run, name="edgeops-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
