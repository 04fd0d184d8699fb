"""The OpenAPI 3.1 description of `edgeops serve` for the model it serves (GET /openapi.json)."""

from __future__ import annotations

import copy
from typing import Any

from edge_runtime.serving.bodies import FLOAT32_MAX, SampleShape
from edge_runtime.serving.limits import ServeLimits

ERRORS = {
    400: "Malformed request: bad JSON, JSON nested too deep, an empty body",
    408: "The body did not arrive within the body timeout",
    413: "Over a limit: body size, batch size, value count, image pixels",
    415: "A Content-Type or encoding that is not taken (JSON must be UTF-8)",
    422: "A body that parses but does not fit: wrong shape, strings, booleans, null, non-finite numbers",
    503: "The in-flight budget of request bodies stayed full for the admission timeout",
}


def _inputs_schema(sample: SampleShape, limits: ServeLimits) -> dict[str, Any]:
    """One sample of the model's input shape, or a batch of them: finite float32 numbers."""
    number = {"type": "number", "minimum": -FLOAT32_MAX, "maximum": FLOAT32_MAX}
    one: dict[str, Any] = number
    for n in reversed(sample.shape):
        one = {"type": "array", "items": one, "minItems": n, "maxItems": n}
    batch = {"type": "array", "items": one, "minItems": 1, "maxItems": limits.max_batch}
    return {"anyOf": [one, batch], "description": "one sample, or a batch of samples: finite numbers only"}


def _json_image_bodies(limits: ServeLimits) -> list[dict[str, Any]]:
    """JSON bodies carrying base64 images: one 'image', or a batch of 'images'."""
    b64 = {"type": "string", "contentEncoding": "base64", "description": "a PNG, JPEG, BMP, GIF, WebP or PPM file"}
    return [
        {"type": "object", "properties": {"image": b64}, "required": ["image"], "additionalProperties": False},
        {"type": "object", "properties": {"images": {"type": "array", "items": b64, "minItems": 1,
                                                     "maxItems": limits.max_batch}},
         "required": ["images"], "additionalProperties": False},
    ]


def _predict_content(sample: SampleShape, limits: ServeLimits) -> dict[str, Any]:
    """The request bodies /predict takes, by media type."""
    json_bodies: list[dict[str, Any]] = [
        {"type": "object", "properties": {"inputs": _inputs_schema(sample, limits)}, "required": ["inputs"],
         "additionalProperties": False},
    ]
    if sample.takes_images:
        json_bodies += _json_image_bodies(limits)
    content: dict[str, Any] = {"application/json": {"schema": {"oneOf": json_bodies}}}
    if sample.takes_images:
        content["multipart/form-data"] = {"schema": {
            "type": "object", "required": ["image"],
            "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"},
                                     "minItems": 1, "maxItems": limits.max_batch}}}}
        content["image/*"] = {"schema": {"type": "string", "format": "binary"}}
    return content


def _paths(content: dict[str, Any]) -> dict[str, Any]:
    """The endpoints: /predict (with its request bodies), /healthz, /metrics, /model."""
    error_ref = {"$ref": "#/components/schemas/Error"}
    errors = {str(code): {"description": text, "content": {"application/json": {"schema": error_ref}}}
              for code, text in ERRORS.items()}
    plain = {"text/plain": {"schema": {"type": "string"}}}
    return {
        "/predict": {"post": {
            "operationId": "predict", "summary": "Predict one sample or a batch",
            "requestBody": {"required": True, "content": content},
            "responses": {"200": {"description": "Outputs (and labels for a classifier)",
                                  "content": {"application/json": {
                                      "schema": {"$ref": "#/components/schemas/Prediction"}}}},
                          **errors},
        }},
        "/healthz": {"get": {"operationId": "health", "summary": "Liveness",
                             "responses": {"200": {"description": "Serving", "content": {"application/json": {
                                 "schema": {"type": "object", "required": ["status", "model"],
                                            "properties": {"status": {"const": "ok"},
                                                           "model": {"type": "string"}}}}}}}}},
        "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus text",
                             "responses": {"200": {"description": "Counters", "content": plain}}}},
        "/model": {"get": {"operationId": "model", "summary": "The served model",
                           "responses": {"200": {"description": "Manifest summary", "content": {
                               "application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}}}}},
    }


# the answers' schemas
_SCHEMAS = {
    "Error": {"type": "object", "required": ["error", "detail"],
              "properties": {"error": {"type": "string"}, "detail": {}}},
    "Prediction": {"type": "object", "required": ["outputs", "latency_ms", "model"], "properties": {
        "outputs": {"type": "array"},
        "labels": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "latency_ms": {"type": "number", "minimum": 0},
        "model": {"type": "object", "required": ["name", "version", "artifact"]}}},
    "Model": {"type": "object", "required": ["name", "task", "artifact", "backend", "inputs", "outputs"],
              "properties": {"name": {"type": "string"}, "inputs": {"type": "array"},
                             "outputs": {"type": "array"}}},
}


def openapi_document(sample: SampleShape, limits: ServeLimits, title: str, version: str) -> dict[str, Any]:
    """An OpenAPI document whose request schemas follow the served model's input shape and the limits."""
    return {
        "openapi": "3.1.0",
        "info": {"title": f"edgeops serve: {title}", "version": version or "0",
                 "description": f"Predictions of the model {title!r}. Inputs are numbers or uploaded images, never "
                                f"file paths. Bodies are at most {limits.max_body_bytes} bytes, batches at most "
                                f"{limits.max_batch} samples, JSON at most {limits.max_depth} levels deep."},
        "paths": _paths(_predict_content(sample, limits)),
        "components": {"schemas": copy.deepcopy(_SCHEMAS)},
    }
