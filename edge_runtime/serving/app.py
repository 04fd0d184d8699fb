"""The ASGI application of `edgeops serve` (Starlette): endpoints, bounded body reading, JSON errors.

Parsing and inference run on one worker thread, in arrival order (small JSON bodies on the
event loop when that worker is idle): interpreters are not thread-safe, and one parse at a
time keeps memory bounded by the in-flight budget plus one batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from edge_runtime import wire
from edge_runtime.errors import EdgeOpsError, InvalidInputError
from edge_runtime.labels import LabelJoiner
from edge_runtime.model import EdgeModel
from edge_runtime.serving.bodies import (
    Rejection,
    SampleShape,
    body_kind,
    decode_image,
    is_plain_json,
    media_type,
    parse_json,
)
from edge_runtime.serving.limits import InFlightBytes, ServeLimits
from edge_runtime.serving.metrics import ServeMetrics, model_summary
from edge_runtime.serving.openapi import openapi_document
from edge_runtime.serving.training import open_trainer, train_endpoint, use_trained

log = logging.getLogger("edgeops.serve")

ENDPOINTS = "POST /predict, POST /feedback, POST /train, GET /healthz, /metrics, /model, /openapi.json"
# JSON bodies up to this size are parsed and predicted on the event loop when the worker is idle:
# a thread hop costs more than such a request, and handing the GIL back and forth lengthens the tail
INLINE_BODY_BYTES = 16 * 1024
# a client that closed its connection before the answer: nobody receives this status (nginx's convention)
CLIENT_CLOSED = 499


class Served:
    """The model, its limits and counters, and the worker thread that parses and predicts."""

    def __init__(self, model: EdgeModel, limits: ServeLimits, agent: Any = None) -> None:
        self.model = model
        self.limits = limits
        self.agent = agent
        self.metrics = ServeMetrics()
        self.in_flight = InFlightBytes(limits.max_in_flight_bytes)
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgeops-infer")
        self.worker_jobs = 0
        self.model_lock = threading.Lock()     # interpreters are not thread-safe
        image = ((model.manifest or {}).get("input_schema") or {}).get("image")
        self.sample = SampleShape(model.input_spec.name, model.input_spec.shape, bool(image))
        m = model.manifest or {}
        self.openapi = openapi_document(self.sample, limits, m.get("name", model.path.stem), m.get("version") or "")
        # late labels (POST /feedback) join predictions by the id /predict answered with (edge_runtime/labels.py)
        self.labels = _label_joiner(model, agent)
        # POST /train fine-tunes the bundle's trainable artifact (edge_runtime/training.py); 409 without one
        self.trainer, self.trainer_off = open_trainer(model, agent)
        if self.trainer is not None and self.trainer.updates:
            use_trained(self, self.trainer)      # a checkpoint from before a restart: serve its weights
        self._run_id = f"{os.getpid():x}{int(time.time()) % 0xFFFF:04x}"
        self._next_id = 0

    def input_ids(self, rows: np.ndarray) -> list[str]:
        """Ids for the rows just predicted (``<run>-<n>``), remembered with their predicted classes."""
        ids = [f"{self._run_id}-{self._next_id + i}" for i in range(len(rows))]
        self._next_id += len(rows)
        idx = rows.argmax(axis=1) if rows.shape[1] > 1 else (rows[:, 0] > 0.5).astype(int)
        for i, cls in zip(ids, idx, strict=True):
            self.labels.predicted(i, int(cls))
        return ids

    async def on_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        self.worker_jobs += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.worker, self._locked, fn, *args)
        finally:
            self.worker_jobs -= 1

    def _locked(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.model_lock:
            return fn(*args)

    async def answer(self, kind: str, payload: Any) -> dict:
        """Predict a small JSON body right here when nothing waits for the worker, anything else on the worker."""
        if kind == "json" and len(payload) <= INLINE_BODY_BYTES and not self.worker_jobs \
                and self.model_lock.acquire(blocking=False):
            try:
                return self.predict(kind, payload)
            finally:
                self.model_lock.release()
        return await self.on_worker(self.predict, kind, payload)

    def predict(self, kind: str, payload: Any) -> dict:
        """Parse (JSON or image bytes, or decoded multipart parts) and predict, holding the model lock."""
        x = self._parse(kind, payload)
        model = self.model
        t0 = time.perf_counter()
        with np.errstate(over="ignore"):       # float32-range inputs saturate in int8 quantization
            out = model.predict(x)
        ms = (time.perf_counter() - t0) * 1000
        batch = out if out.ndim == 2 else out[None, :]
        self.metrics.observe(ms, len(batch))
        m = model.manifest or {}
        result: dict = {"outputs": np.round(out.astype(np.float64), 6).tolist(), "latency_ms": round(ms, 3),
                        "model": {"name": m.get("name"), "version": m.get("version"), "artifact": model.path.name}}
        self._add_labels_and_ids(result, model, out, batch)
        if self.agent is not None:
            self.agent.collect()
        return result

    def _parse(self, kind: str, payload: Any) -> Any:
        """The model's input from a body: numbers (JSON), an image, or the images of multipart parts."""
        if kind == "json":
            return parse_json(payload, self.sample, self.limits)
        if kind == "image":
            return decode_image(payload, self.limits, "the body")
        x = [decode_image(data, self.limits, f"part 'image'[{i}]") for i, data in enumerate(payload)]
        return x[0] if len(x) == 1 else x

    def _add_labels_and_ids(self, result: dict, model: EdgeModel, out: np.ndarray, batch: np.ndarray) -> None:
        """The predicted class labels, and the ids a label sent to /feedback names the inputs by."""
        single = out.ndim != 2
        if model.task == "classification" and model.labels:
            labels = _predicted_labels(model.labels, batch)
            result["labels"] = labels[0] if single else labels
        if self.labels is not None and batch.ndim == 2:
            self._add_ids(result, batch, single)

    def _add_ids(self, result: dict, batch: np.ndarray, single: bool) -> None:
        ids = self.input_ids(batch)
        if single:
            result["id"] = ids[0]
        else:
            result["ids"] = ids

    def error(self, status: int, kind: str, detail: Any, headers: dict | None = None) -> JSONResponse:
        self.metrics.error(kind)
        return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


def _predicted_labels(labels: list, batch: np.ndarray) -> list:
    """The class label of each output row (one sigmoid column: above 0.5 is the second class)."""
    idx = batch.argmax(axis=1) if batch.shape[1] > 1 else (batch[:, 0] > 0.5).astype(int)
    return [labels[i] for i in idx]


def create_app(model: EdgeModel, limits: ServeLimits | None = None, agent: Any = None) -> Any:
    """The ASGI app serving ``model``; with a device ``agent``, predictions feed its telemetry windows.

    Its ``state.served`` holds the model, the limits and the counters.
    """
    served = Served(model, limits or ServeLimits(), agent)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model.path.name})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(served.metrics.render(model, served.in_flight.used),
                                 media_type="text/plain; version=0.0.4")

    async def model_info(request: Request) -> Response:
        return JSONResponse(model_summary(model))

    async def openapi(request: Request) -> Response:
        return JSONResponse(served.openapi)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ticker = asyncio.create_task(_collect_every_second(served)) if agent is not None else None
        try:
            yield
        finally:
            if ticker is not None:
                ticker.cancel()
            served.worker.shutdown(wait=True, cancel_futures=True)

    app = Starlette(routes=[
        Route("/predict", _predict_endpoint, methods=["POST"]),
        Route("/feedback", _feedback_endpoint, methods=["POST"]),
        Route("/train", train_endpoint, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/model", model_info, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
    ], exception_handlers={HTTPException: _http_error, Exception: _internal_error}, lifespan=lifespan)
    app.state.served = served
    return _Counted(app, served.metrics)


async def _predict_endpoint(request: Request) -> Response:
    """POST /predict: an answer, or the refusal each failure maps to."""
    served: Served = request.app.state.served
    try:
        return await _predict(served, request)
    except Rejection as exc:
        # refused before its body was read: close rather than read (and drop) the rest of it
        close = {"Connection": "close"} if exc.status in (408, 413, 415) else None
        return served.error(exc.status, exc.kind, exc.detail, close)
    except ClientDisconnect:
        served.metrics.disconnect()
        return Response(status_code=CLIENT_CLOSED)
    except InvalidInputError as exc:
        return served.error(422, "invalid_input", str(exc))
    except EdgeOpsError as exc:
        return served.error(400, "bad_request", str(exc))
    except Exception:
        log.exception("POST /predict failed")
        return served.error(500, "internal", "internal error (logged on the server)")


def _output_width(model: EdgeModel) -> int:
    """Values per sample of the model's first output (1 when it says none)."""
    return int(model.outputs[0].shape[-1]) if model.outputs and model.outputs[0].shape else 1


def _label_joiner(model: EdgeModel, agent: Any) -> LabelJoiner | None:
    """The agent's joiner (joined labels then reach its telemetry windows), or one of our own; None for a
    model that does not classify."""
    if agent is not None and getattr(agent, "labels", None) is not None:
        return agent.labels
    width = _output_width(model)
    if model.task == "classification" or (model.task is None and width > 1):
        return LabelJoiner(model.labels, len(model.labels) if model.labels else max(2, width))
    return None


_LABEL_REFUSALS = {"oversized": (413, "too_large"), "malformed_json": (400, "bad_request"),
                   "too_deep": (400, "bad_request")}


async def _feedback_endpoint(request: Request) -> Response:
    """POST /feedback: true labels of earlier predictions, ``{"labels": [{"id", "label"}, ...]}`` (the ids
    /predict answered with), joined to them; answers how many joined. Bounded like /predict."""
    served: Served = request.app.state.served
    if served.labels is None:
        return served.error(422, "invalid_input", "this model does not classify: it takes no labels")
    if not is_plain_json(request.headers):
        return served.error(415, "unsupported_media_type", "send labels as uncompressed UTF-8 application/json "
                                                           "{\"labels\": [{\"id\": ..., \"label\": ...}]}")
    limits = dataclasses.replace(served.limits, max_body_bytes=min(served.limits.max_body_bytes,
                                                                   wire.MAX_LABELS_PAYLOAD))
    try:
        _content_length(request, limits)
        body = await _read_body(request, limits)
        pairs = wire.parse_labels(bytes(body))
    except Rejection as exc:
        return served.error(exc.status, exc.kind, exc.detail, {"Connection": "close"} if exc.status != 400 else None)
    except ClientDisconnect:
        served.metrics.disconnect()
        return Response(status_code=CLIENT_CLOSED)
    except wire.Rejected as rej:
        served.labels.count_invalid()
        status, kind = _LABEL_REFUSALS.get(rej.reason, (422, "invalid_input"))
        return served.error(status, kind, rej.detail)
    return JSONResponse(_join_labels(served.labels, pairs))


def _join_labels(joiner: LabelJoiner, pairs: list) -> dict:
    """Join (id, label) pairs; how many joined, matched no prediction, or were invalid."""
    invalid0 = joiner.invalid_total
    joined = sum(joiner.label(i, y) is not None for i, y in pairs)
    invalid = joiner.invalid_total - invalid0
    return {"joined": joined, "unmatched": len(pairs) - joined - invalid, "invalid": invalid}


async def _http_error(request: Request, exc: Exception) -> Response:
    served: Served = request.app.state.served
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return served.error(404, "not_found", f"no endpoint {request.url.path}; try {ENDPOINTS}")
    if exc.status_code == 405:
        return served.error(405, "method_not_allowed", f"{request.method} is not taken on {request.url.path}; "
                                                       f"try {ENDPOINTS}", exc.headers)
    return served.error(exc.status_code, "bad_request", str(exc.detail))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return request.app.state.served.error(500, "internal", "internal error (logged on the server)")


class _Counted:
    """Counts every HTTP request, whatever its endpoint (an ASGI wrapper)."""

    def __init__(self, app: Starlette, metrics: ServeMetrics) -> None:
        self.app = app
        self.state = app.state
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            self.metrics.request()
        await self.app(scope, receive, send)


async def _predict(served: Served, request: Request) -> Response:
    limits = served.limits
    ctype, params = media_type(request.headers.get("content-type"))
    kind = body_kind(ctype, params, served.sample)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise Rejection(415, "unsupported_media_type", f"Content-Encoding {encoding} is not taken: send the body "
                                                       "uncompressed")
    length = _content_length(request, limits)
    reserve = length if length is not None else limits.max_body_bytes
    if not await served.in_flight.acquire(reserve, limits.admission_timeout_s):
        return served.error(503, "busy", f"{served.in_flight.limit} bytes of request bodies are in flight "
                                         "(--max-in-flight-bytes); retry later",
                            {"Retry-After": "1", "Connection": "close"})
    try:
        body = await _read_body(request, limits)
        if not body:
            raise Rejection(400, "bad_request", "empty body: send JSON {\"inputs\": [...]} or an image")
        payload: Any = body
        if kind == "multipart":
            payload = await _multipart_images(request, body, limits)
        return JSONResponse(await served.answer(kind, payload))
    finally:
        await served.in_flight.release(reserve)


def _content_length(request: Request, limits: ServeLimits) -> int | None:
    raw = request.headers.get("content-length")
    if raw is None:
        return None
    if not raw.isdigit():
        raise Rejection(400, "bad_request", "Content-Length is not a number")
    length = int(raw)
    if length > limits.max_body_bytes:
        raise Rejection(413, "too_large", f"a body of {length} bytes is over the {limits.max_body_bytes}-byte "
                                          "limit (--max-body-bytes)")
    return length


async def _read_body(request: Request, limits: ServeLimits) -> bytearray:
    """The body, refused past the size limit or when it has not all arrived within the body timeout."""
    body = bytearray()
    try:
        with anyio.fail_after(limits.body_timeout_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limits.max_body_bytes:
                    raise Rejection(413, "too_large", f"the body is over the {limits.max_body_bytes}-byte limit "
                                                      "(--max-body-bytes)")
    except TimeoutError:
        raise Rejection(408, "timeout", f"the body did not arrive within {limits.body_timeout_s:g} s "
                                        f"({len(body)} bytes came)") from None
    return body


async def _multipart_images(request: Request, body: bytearray, limits: ServeLimits) -> list[bytes]:
    """The files of the 'image' field(s) of a multipart body already read (and bounded)."""
    form = await _parsed_form(request, body, limits)
    try:
        files = _image_files(form, limits)
        return [await f.read() for f in files]
    finally:
        await form.close()


def _replay(body: bytearray) -> Callable:
    """An ASGI receive that hands over the body already read once, then a disconnect."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": bytes(body), "more_body": False}

    return replay


async def _parsed_form(request: Request, body: bytearray, limits: ServeLimits) -> Any:
    """The multipart form of a body already read; 400 when it is malformed."""
    parts = Request(request.scope, _replay(body))
    try:
        return await parts.form(max_files=limits.max_batch + 1, max_fields=16, max_part_size=limits.max_body_bytes)
    except HTTPException as exc:
        raise Rejection(400, "bad_request", f"malformed multipart/form-data: {exc.detail}") from None
    except Exception as exc:  # noqa: BLE001 - python-multipart's errors on hostile bodies
        raise Rejection(400, "bad_request", f"malformed multipart/form-data ({type(exc).__name__})") from None


def _image_files(form: Any, limits: ServeLimits) -> list:
    """The uploaded files of the form's 'image' field(s): at least one, at most a batch."""
    files = [v for k, v in form.multi_items() if k == "image"]
    if not files or any(isinstance(f, str) for f in files):
        raise Rejection(422, "invalid_input", "multipart/form-data needs one or more files in the field 'image'")
    if len(files) > limits.max_batch:
        raise Rejection(413, "too_large", f"a batch of {len(files)} samples is over the limit of "
                                          f"{limits.max_batch} (--max-batch)")
    return files


async def _collect_every_second(served: Served) -> None:
    """Close telemetry windows on time even when no request comes (on the worker, beside predict)."""
    while True:
        await asyncio.sleep(1.0)
        try:
            await served.on_worker(served.agent.collect)
        except Exception:
            log.exception("telemetry collection failed")
