"""The gateway's JSON vocabulary, without a server: body parsing, events, status mapping,
tokens, and the OpenAPI document kept in step with the body's fields."""

from __future__ import annotations

import base64
import dataclasses
import hashlib

import pytest
from ditserve.gateway.auth import TokenCheck, bearer_token
from ditserve.gateway.config import GatewayConfig
from ditserve.gateway.messages import ApiError, BadRequest, GenerateBody, event_json
from ditserve.gateway.openapi import openapi_document
from ditserve_client import Accepted, DitserveError, EncodedImage, Progress, Result, Timings


def test_a_full_body_becomes_the_sdk_options():
    body = GenerateBody.from_json({
        "class_labels": [207, "golden retriever"], "seed": "18446744073709551615",
        "num_steps": 50, "sampler": "ddim", "guidance_scale": 4, "guidance_channels": "all",
        "preview_mode": "decoded", "preview_every": 5, "image_format": "webp",
        "image_quality": 80, "skip_images": False, "return_latents": True,
        "request_id": "abc", "mode": "async", "async_warmup_steps": 3})
    assert body.class_labels == (207, "golden retriever") and body.seed == 2**64 - 1
    assert body.options() == {
        "seed": 2**64 - 1, "steps": 50, "sampler": "ddim", "guidance": 4.0,
        "guidance_channels": "all", "previews": "decoded", "preview_every": 5,
        "image_format": "webp", "quality": 80, "skip_images": False, "return_latents": True,
        "request_id": "abc", "mode": "async", "warmup": 3}


def test_absent_and_null_fields_leave_the_servers_defaults():
    options = GenerateBody.from_json({"class_labels": [1], "seed": None, "sampler": None}).options()
    assert options["seed"] is None and options["sampler"] is None and options["guidance"] is None
    assert options["steps"] is None and options["previews"] is None


@pytest.mark.parametrize(("data", "words"), [
    ([1, 2], "must be a JSON object"),
    ({"class_labels": [1], "num_steps": 1.5}, "num_steps must be an integer"),
    ({"class_labels": [1], "num_steps": True}, "num_steps must be an integer"),
    ({"class_labels": [1], "seed": 2**64}, "seed must be an integer in 0..2**64-1"),
    ({"class_labels": [1], "seed": "0x10"}, "seed must be an integer"),
    ({"class_labels": [1], "guidance_scale": "4"}, "guidance_scale must be a number"),
    ({"class_labels": [1], "sampler": 2}, "sampler must be a string"),
    ({"class_labels": [1.5]}, "class_labels must hold class ids"),
    ({"class_labels": "cat"}, "class_labels must be a non-empty list"),
])
def test_bad_fields_are_refused_by_name(data, words):
    with pytest.raises(BadRequest, match=words.replace("*", r"\*").replace(".", r"\.")):
        GenerateBody.from_json(data)


def test_events_become_json_with_exact_seeds_data_urls_and_base64():
    png = EncodedImage(b"\x89PNG-bytes", "png", 16, 16, 3)
    accepted = Accepted("r1", 2, 2**63 + 1, 50, "ddim", 4.0, "async", 5)
    assert event_json(accepted) == ("accepted", {
        "request_id": "r1", "queue_position": 2, "seed": str(2**63 + 1), "num_steps": 50,
        "sampler": "ddim", "guidance_scale": 4.0, "mode": "async", "async_warmup_steps": 5})
    name, progress = event_json(Progress(3, 50, 940, 0.3, 4.7, [png]))
    assert name == "progress" and progress["total_steps"] == 50
    assert progress["previews"] == ["data:image/png;base64," + base64.b64encode(png.data).decode()]
    name, result = event_json(Result([png], None, Timings(0.1, 2.0, 0.2), 9, "r1"))
    assert name == "result" and result["seed"] == "9" and result["latents"] is None
    assert result["images"] == [{"media_type": "image/png", "width": 16, "height": 16,
                                 "label": 3, "data": base64.b64encode(png.data).decode()}]


@pytest.mark.parametrize(("error", "status", "code"), [
    (DitserveError("RESOURCE_EXHAUSTED", "full", 0.2), 429, "RESOURCE_EXHAUSTED"),
    (DitserveError("DATA_LOSS", "bits"), 500, "DATA_LOSS"),
    (DitserveError("CANCELLED", "gone"), 499, "CANCELLED"),
    (ValueError("unknown sampler"), 400, "INVALID_ARGUMENT"),
    (RuntimeError("bug"), 500, "INTERNAL"),
])
def test_exceptions_map_to_statuses(error, status, code):
    mapped = ApiError.from_exception(error)
    assert (mapped.status, mapped.code) == (status, code)


def test_retry_after_is_whole_seconds_and_only_where_http_defines_it():
    assert ApiError(429, "RESOURCE_EXHAUSTED", "", 0.2).headers() == {"Retry-After": "1"}
    assert ApiError(503, "UNAVAILABLE", "", 2.01).headers() == {"Retry-After": "3"}
    assert ApiError(503, "UNAVAILABLE", "").headers() == {}
    assert ApiError(400, "INVALID_ARGUMENT", "", 1.0).headers() == {}


def test_the_openapi_request_schema_has_exactly_the_bodys_fields():
    document = openapi_document()
    schema = document["components"]["schemas"]["GenerateRequest"]
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(GenerateBody)}
    assert schema["required"] == ["class_labels"]
    refs = {ref.rsplit("/", 1)[1] for ref in _refs(document)}
    assert refs <= set(document["components"]["schemas"])  # no dangling reference


def _refs(node):
    if isinstance(node, dict):
        yield from ([node["$ref"]] if "$ref" in node else [])
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


# ---- tokens -----------------------------------------------------------------------------

def test_tokens_file_accepts_listed_tokens_only(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"# comment\n\n{hashlib.sha256(b'alpha').hexdigest().upper()}  # ci\n"
                    f"{hashlib.sha256(b'beta').hexdigest()}\n")
    check = TokenCheck.from_file(str(path))
    assert check.enabled and len(check.digests) == 2
    assert check.accepts("alpha") and check.accepts("beta")
    assert not check.accepts("alph") and not check.accepts("") and not check.accepts(None)
    assert not check.accepts(hashlib.sha256(b"alpha").hexdigest())  # the digest is no token


def test_no_tokens_file_means_no_check_and_an_empty_one_is_an_error(tmp_path):
    assert TokenCheck.from_file("").accepts(None)
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="lists no digest"):
        TokenCheck.from_file(str(tmp_path / "empty"))


@pytest.mark.parametrize(("header", "token"), [
    ("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("Basic abc", None), ("Bearer", None),
    ("", None), (None, None)])
def test_bearer_token_of_a_header(header, token):
    assert bearer_token(header) == token


@pytest.mark.parametrize(("listen", "loopback"), [
    ("127.0.0.1:8080", True), ("localhost:1", True), ("[::1]:8080", True),
    ("0.0.0.0:8080", False), ("[::]:8080", False), ("gateway.example:80", False)])
def test_only_loopback_may_serve_without_tokens(listen, loopback):
    if loopback:
        assert GatewayConfig("c:1", listen).loopback
    else:
        with pytest.raises(ValueError, match="is not loopback"):
            GatewayConfig("c:1", listen)
        assert not GatewayConfig("c:1", listen, allow_unauthenticated=True).loopback
