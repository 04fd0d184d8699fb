"""``POST /train``: fine-tune the bundle's trainable artifact on a labelled batch (edge_runtime/training.py).

The body is JSON ``{"inputs": [[...], ...], "labels": [...]}``: a batch of samples in the caller's
raw feature space, as ``/predict`` takes them, and one label per sample (a class name of the
manifest or a class index). It is bounded like ``/predict`` (body bytes, nesting, batch size,
the in-flight budget); a bad body is a 400 that says what and where, a bundle without a trainable
artifact a 409. Once a round is kept, ``/predict`` answers with the trained weights.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from edge_runtime.errors import EdgeOpsError, InvalidInputError
from edge_runtime.serving.bodies import (
    Rejection,
    SampleShape,
    _check_batch,
    _nesting_depth,
    _utf8,
    is_plain_json,
    numbers,
)
from edge_runtime.serving.limits import ServeLimits
from edge_runtime.state import default_state_dir

log = logging.getLogger("edgeops.serve")

FIELDS = ("inputs", "labels")


def open_trainer(model: Any, agent: Any = None) -> tuple[Any, str | None]:
    """(Trainer or None, why not) for the served model; checkpoints go to the agent's state folder
    (``training/``), else to ``$XDG_STATE_HOME/edgeops/serve-<bundle>/training``."""
    from edge_runtime.training import trainable_artifact, trainer_for

    manifest = model.manifest or {}
    if trainable_artifact(manifest) is None:
        return None, "this bundle has no trainable artifact (convert it with --trainable)"
    state = getattr(agent, "state_dir", None)
    folder = Path(state) / "training" if state else default_state_dir(f"serve-{manifest.get('name', 'model')}") \
        / "training"
    try:
        return trainer_for(model, folder), None
    except (EdgeOpsError, OSError) as exc:
        log.warning("on-device training is off: %s", exc)
        return None, f"the trainable artifact cannot be used here: {exc}"


def _check_train_size(body: bytes | bytearray, sample: SampleShape, limits: ServeLimits) -> None:
    """413 for a body with more values or strings than the largest labelled batch; 400 for escapes."""
    values = body.count(b",") + 1
    if values > 2 * limits.max_batch * (sample.values + 1) + 64:
        raise Rejection(413, "too_large", f"the body holds about {values} values; a batch of at most "
                                          f"{limits.max_batch} labelled samples is taken (--max-batch)")
    if b"\\" in body:
        raise Rejection(400, "bad_request", "escaped characters in JSON strings are not taken (labels are plain)")
    strings = body.count(b'"') // 2
    if strings > limits.max_batch + 16:
        raise Rejection(413, "too_large", f"the body holds {strings} strings; at most {limits.max_batch} labels "
                                          "are taken (--max-batch)")


def _load_train_json(body: bytes | bytearray, limits: ServeLimits) -> dict:
    """The body's JSON object with exactly the fields 'inputs' and 'labels'; 400 otherwise."""
    text = _utf8(body)
    depth = _nesting_depth(text)
    if depth > limits.max_depth:
        raise Rejection(400, "bad_request", f"JSON nested {depth} levels deep; the limit is {limits.max_depth}")
    try:
        doc = json.loads(text, parse_constant=_not_finite)
    except (ValueError, RecursionError) as exc:
        raise Rejection(400, "bad_request", f"malformed JSON: {str(exc)[:160]}") from None
    if not isinstance(doc, dict) or set(doc) != set(FIELDS):
        got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
        raise Rejection(400, "bad_request", f"send a JSON object with exactly 'inputs' (a batch of samples) and "
                                            f"'labels' (one per sample); got {got}")
    return doc


def _check_labels(labels: Any, n: int) -> None:
    """400 unless labels is a list of n class names or indices."""
    if not isinstance(labels, list) or len(labels) != n:
        got = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise Rejection(400, "bad_request", f"'labels' must be a list with one label per sample: {n} "
                                            f"samples, labels {got}")
    for i, y in enumerate(labels):
        if isinstance(y, bool) or not isinstance(y, (int, str)):
            raise Rejection(400, "bad_request", f"labels[{i}]: {json.dumps(y)[:40]} is not a class name or index")


def _train_inputs(inputs: Any, sample: SampleShape, limits: ServeLimits) -> np.ndarray:
    """The 'inputs' batch as float32; what /predict would answer 422 is a 400 here."""
    try:
        return numbers(inputs, sample, limits)
    except Rejection as exc:
        raise Rejection(400 if exc.status == 422 else exc.status, "bad_request" if exc.status == 422 else exc.kind,
                        f"'inputs': {exc.detail}") from None


def parse_train_body(body: bytes | bytearray, sample: SampleShape, limits: ServeLimits) -> tuple[np.ndarray, list]:
    """(float32 batch, labels) of a ``/train`` body, bounded before it is parsed."""
    _check_train_size(body, sample, limits)
    doc = _load_train_json(body, limits)
    inputs, labels = doc["inputs"], doc["labels"]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(row, list) for row in inputs):
        raise Rejection(400, "bad_request", "'inputs' must be a non-empty batch: a list of samples")
    _check_batch(len(inputs), limits)
    _check_labels(labels, len(inputs))
    return _train_inputs(inputs, sample, limits), labels


def _not_finite(name: str) -> Any:
    raise ValueError(f"{name} is not a finite number")


async def train_endpoint(request: Request) -> Response:
    """POST /train: one update round; answers its loss, the probation's accuracies and whether it was kept."""
    from edge_runtime.serving import app as served_app

    served = request.app.state.served
    trainer = getattr(served, "trainer", None)
    if trainer is None:
        return served.error(409, "no_trainable_artifact", getattr(served, "trainer_off", None)
                            or "this bundle has no trainable artifact (convert it with --trainable)")
    if not is_plain_json(request.headers):
        return served.error(415, "unsupported_media_type", "send uncompressed UTF-8 application/json "
                                                           "{\"inputs\": [[...]], \"labels\": [...]}")
    try:
        result = await _admitted_train(request, served, trainer)
    except Rejection as exc:
        close = {"Connection": "close"} if exc.status in (408, 413, 415) else None
        return served.error(exc.status, exc.kind, exc.detail, close)
    except ClientDisconnect:
        served.metrics.disconnect()
        return Response(status_code=served_app.CLIENT_CLOSED)
    except InvalidInputError as exc:
        return served.error(400, "bad_request", str(exc))
    if isinstance(result, Response):
        return result
    return JSONResponse(result)


async def _admitted_train(request: Request, served: Any, trainer: Any) -> dict | Response:
    """Read the body within the in-flight byte budget and train on it; a 503 response when the budget is spent."""
    from edge_runtime.serving import app as served_app

    limits = served.limits
    length = served_app._content_length(request, limits)
    reserve = length if length is not None else limits.max_body_bytes
    if not await served.in_flight.acquire(reserve, limits.admission_timeout_s):
        return served.error(503, "busy", "too many request bytes in flight; retry later", {"Retry-After": "1"})
    try:
        body = await served_app._read_body(request, limits)
        if not body:
            raise Rejection(400, "bad_request", "empty body: send {\"inputs\": [[...]], \"labels\": [...]}")
        return await served.on_worker(_train, served, trainer, body)
    finally:
        await served.in_flight.release(reserve)


def _train(served: Any, trainer: Any, body: bytearray) -> dict:
    """Parse and train on the worker thread, holding the model lock; predictions then use the new weights."""
    x, labels = parse_train_body(body, served.sample, served.limits)
    with np.errstate(over="ignore"):
        done = trainer.train(x, labels)
    if not done.reverted:
        use_trained(served, trainer)
    return {**done.to_dict(), "model": {"artifact": trainer.model.path.name}}


def use_trained(served: Any, trainer: Any) -> None:
    """Serve predictions from the trainer's weights (telemetry keeps its recorder)."""
    if served.model is not trainer.model:
        trainer.model.recorder = served.model.recorder
        served.model = trainer.model
