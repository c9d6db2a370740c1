"""The OpenAPI 3.1 document of the gateway (served at /openapi.json).

Written out rather than generated: the API is five routes, and the request schema is held
to `GenerateBody`'s fields by tests/gateway/test_messages.py.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import ditserve

SAMPLERS = ["ddpm", "ddim", "dpm-solver++"]
SEED = {"type": "string", "pattern": "^[0-9]+$",
        "description": "64-bit seed as a decimal string (JavaScript numbers hold 53 bits)"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    words = {400: "invalid request (INVALID_ARGUMENT, FAILED_PRECONDITION)",
             401: "missing or wrong bearer token (UNAUTHENTICATED)",
             413: "request body over 64 KiB",
             429: "queue full (RESOURCE_EXHAUSTED); Retry-After says when to retry",
             503: "coordinator unavailable (UNAVAILABLE)",
             504: "deadline exceeded (DEADLINE_EXCEEDED)"}
    return {str(s): _json(_ref("Error"), words[s]) for s in statuses}


GENERATE_REQUEST = {
    "type": "object", "required": ["class_labels"], "additionalProperties": False,
    "properties": {
        "class_labels": {"type": "array", "minItems": 1,
                         "items": {"oneOf": [{"type": "integer", "minimum": 0},
                                             {"type": "string"}]},
                         "description": "class ids or names (any case), one image each"},
        "seed": {"oneOf": [{"type": "integer", "minimum": 0}, SEED],
                 "description": "seed of the request's generator; random when absent"},
        "num_steps": {"type": "integer", "minimum": 0, "default": 0,
                      "description": "denoising steps; 0 for the sampler's default"},
        "sampler": {"enum": SAMPLERS, "description": "absent for the server's default"},
        "guidance_scale": {"type": "number", "minimum": 1,
                           "description": "absent for the server's default; 1 for none"},
        "guidance_channels": {"enum": ["first3", "all"], "default": "first3"},
        "preview_mode": {"enum": ["approximate", "decoded"],
                         "description": "previews in progress events; absent for none"},
        "preview_every": {"type": "integer", "minimum": 0, "default": 1},
        "image_format": {"enum": ["png", "jpeg", "webp"], "default": "png"},
        "image_quality": {"type": "integer", "minimum": 0, "maximum": 100, "default": 0},
        "skip_images": {"type": "boolean", "default": False},
        "return_latents": {"type": "boolean", "default": False},
        "request_id": {"type": "string", "default": ""},
        "mode": {"enum": ["exact", "async"],
                 "description": "absent for the server's default (exact)"},
        "async_warmup_steps": {"type": "integer", "minimum": 0,
                               "description": "async mode: exact steps before pipelining; "
                               "absent for the server's default"},
    },
}

IMAGE = {"type": "object", "properties": {
    "media_type": {"type": "string"}, "width": {"type": "integer"},
    "height": {"type": "integer"}, "label": {"type": "integer"},
    "data": {"type": "string", "contentEncoding": "base64"}}}

SCHEMAS = {
    "GenerateRequest": GENERATE_REQUEST,
    "Accepted": {"type": "object", "properties": {
        "request_id": {"type": "string"}, "queue_position": {"type": "integer"},
        "seed": SEED, "num_steps": {"type": "integer"}, "sampler": {"type": "string"},
        "guidance_scale": {"type": "number"}, "mode": {"enum": ["exact", "async"]},
        "async_warmup_steps": {"type": "integer"}}},
    "Progress": {"type": "object", "properties": {
        "step": {"type": "integer"}, "total_steps": {"type": "integer"},
        "timestep": {"type": "integer"}, "elapsed_seconds": {"type": "number"},
        "eta_seconds": {"type": "number"},
        "previews": {"type": "array", "items": {"type": "string", "format": "uri"},
                     "description": "data: URLs of the predicted clean images"},
        "waiting_on": {"type": "string", "description": "set on a notice, not a step: the "
                       "peer the request is stalled on (\"stage chain\", \"decoder\")"},
        "waiting_reason": {"type": "string"}, "waiting_seconds": {"type": "number"}}},
    "Image": IMAGE,
    "Result": {"type": "object", "properties": {
        "request_id": {"type": "string"}, "seed": SEED,
        "images": {"type": "array", "items": _ref("Image")},
        "latents": {"oneOf": [{"type": "null"}, {"type": "object", "properties": {
            "shape": {"type": "array", "items": {"type": "integer"}},
            "dtype": {"type": "string"},
            "data": {"type": "string", "contentEncoding": "base64"}}}]},
        "timings": {"type": "object", "properties": {
            "queued_seconds": {"type": "number"}, "denoising_seconds": {"type": "number"},
            "decoding_seconds": {"type": "number"}}}}},
    "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "status": {"type": "integer"}, "code": {"type": "string",
                                                "description": "gRPC status code name"},
        "message": {"type": "string"}, "retry_after": {"type": "number"}}}}},
    "Model": {"type": "object", "properties": {
        "model": {"type": "string"}, "image_size": {"type": "integer"},
        "num_classes": {"type": "integer"},
        "classes": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "integer"}, "name": {"type": "string"}}}},
        "samplers": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "default_steps": {"type": "integer"}}}},
        "default_guidance_scale": {"type": "number"},
        "preview_modes": {"type": "array", "items": {"type": "string"}},
        "has_decoder": {"type": "boolean"}}},
}

STREAM_DESCRIPTION = (
    "With `Accept: text/event-stream`: Server-Sent Events `accepted` (Accepted), then "
    "`progress` (Progress) per step, then `result` (Result); a failure after the stream "
    "began is an `error` event (Error). Comment lines keep a queued request's connection "
    "open. Closing the connection cancels the request.")


@cache
def openapi_document() -> dict[str, Any]:
    bearer = [{"bearer": []}]
    generate_ok = _json(_ref("Result"), "the finished request (without an event-stream Accept)")
    generate_ok["content"]["text/event-stream"] = {
        "schema": {"type": "string"}, "x-events": {
            "accepted": _ref("Accepted"), "progress": _ref("Progress"),
            "result": _ref("Result"), "error": _ref("Error")}}
    generate_ok["description"] += ". " + STREAM_DESCRIPTION
    return {
        "openapi": "3.1.0",
        "info": {"title": "ditserve gateway", "version": ditserve.__version__,
                 "description": "HTTP/JSON in front of ditserve's gRPC coordinator."},
        "paths": {
            "/v1/generate": {"post": {
                "summary": "Generate one image per class label", "security": bearer,
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": _ref("GenerateRequest")}}},
                "responses": {"200": generate_ok, **_errors(400, 401, 413, 429, 503, 504)}}},
            "/v1/model": {"get": {
                "summary": "The served model, its classes, samplers and defaults",
                "security": bearer,
                "responses": {"200": _json(_ref("Model"), "the model"),
                              **_errors(401, 503)}}},
            "/healthz": {"get": {"summary": "Whether the coordinator is SERVING",
                                 "responses": {"200": {"description": "serving"},
                                               "503": {"description": "not serving"}}}},
            "/openapi.json": {"get": {"summary": "This document",
                                      "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            "/": {"get": {"summary": "The live web page",
                          "responses": {"200": {"description": "text/html"}}}},
        },
        "components": {"schemas": SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
