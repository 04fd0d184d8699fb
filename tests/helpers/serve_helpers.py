"""Talking to a real `edgeops serve` in tests: a server on a free port and a plain HTTP client."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import edge_runtime


@contextmanager
def served(bundle_or_model: Any, agent: Any = None, **limits: Any) -> Iterator[str]:
    """Serve a bundle (path or loaded model) on 127.0.0.1 and a free port; yields the base URL."""
    from edge_runtime.serving import ServeLimits, running_server

    model = edge_runtime.load(bundle_or_model) if not hasattr(bundle_or_model, "predict") else bundle_or_model
    with running_server(model, limits=ServeLimits(**limits), agent=agent) as url:
        yield url


def call(url: str, body: Any = None, method: str | None = None, ctype: str | None = "application/json",
         headers: dict | None = None) -> tuple[int, Any]:
    """(status, JSON body or text) of one request; ``body`` is bytes or something to send as JSON."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    all_headers = {"Content-Type": ctype} if ctype else {}
    all_headers.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=all_headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
            is_json = resp.headers.get("Content-Type", "").startswith("application/json")
            return resp.status, (json.loads(raw) if is_json else raw.decode())
    except urllib.error.HTTPError as err:
        raw = err.read()
        try:
            return err.code, json.loads(raw)
        except ValueError:
            return err.code, raw.decode(errors="replace")


def open_raw(url: str, head: bytes) -> socket.socket:
    """A socket to the server that has sent ``head`` (request line, headers, maybe part of a body)."""
    host, port = url.split("//")[1].split(":")
    s = socket.create_connection((host, int(port)), timeout=30)
    s.sendall(head)
    return s


def closed_by_server(s: socket.socket, into: bytearray | None = None) -> bool:
    """True once the server has closed (or reset) the connection; what it sent goes to ``into``."""
    s.setblocking(False)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return True
            if into is not None:
                into += chunk
    except BlockingIOError:
        return False
    except OSError:
        return True
