"""The gateway process over HTTP, in front of a fake coordinator: every endpoint, the
mapping of gRPC failures to HTTP statuses, tokens, CORS, a dropped connection cancelling
its call, SIGTERM, and one-line start-up errors."""

from __future__ import annotations

import base64
import json
import socket
import subprocess

import pytest
from conftest import error_status, find_free_port

from .conftest import (
    CLASS_NAMES,
    GatewayProcess,
    gateway_argv,
    png_bytes,
    sse_events,
)

SSE = {"Accept": "text/event-stream"}


def test_healthz_follows_the_coordinators_health(gateway, coordinator, fake):
    status, _, body = gateway.request("GET", "/healthz")
    assert status == 200 and json.loads(body)["status"] == "SERVING"
    coordinator.health.set("", 2)  # NOT_SERVING
    status, _, body = gateway.request("GET", "/healthz")
    assert status == 503 and json.loads(body)["status"] == "NOT_SERVING"


def test_healthz_is_503_when_the_coordinator_is_unreachable(tmp_path):
    process = GatewayProcess(f"127.0.0.1:{find_free_port()}", tmp_path / "gw.log").start()
    try:
        status, _, body = process.request("GET", "/healthz")
        assert status == 503 and json.loads(body)["status"] == "UNREACHABLE"
        status, _, body = process.request("GET", "/v1/model")
        assert status == 503 and json.loads(body)["error"]["code"] == "UNAVAILABLE"
    finally:
        process.stop()


def test_model_lists_classes_samplers_and_defaults(gateway, fake):
    status, _, body = gateway.request("GET", "/v1/model")
    model = json.loads(body)
    assert status == 200 and model["model"] == "DiT-Fake/2"
    assert model["classes"] == [{"id": i, "name": n} for i, n in enumerate(CLASS_NAMES)]
    assert model["samplers"] == [{"name": "ddpm", "default_steps": 250},
                                 {"name": "ddim", "default_steps": 50}]
    assert model["default_guidance_scale"] == 4.0 and model["image_size"] == 16


def test_generate_replies_json_with_base64_images(gateway, fake):
    body = {"class_labels": [2, "Blue Square"], "seed": 7, "sampler": "ddim", "num_steps": 3,
            "guidance_scale": 1.5}
    status, headers, raw = gateway.request("POST", "/v1/generate", body,
                                           {"Authorization": "Bearer made-up"})
    assert status == 200 and headers["content-type"] == "application/json"
    result = json.loads(raw)
    assert [base64.b64decode(i["data"]) for i in result["images"]] == [png_bytes(2), png_bytes(1)]
    assert result["images"][0]["media_type"] == "image/png" and result["seed"] == "7"
    assert "authorization" not in fake.calls.metadata[0]  # no tokens file: none forwarded
    (request,) = fake.calls.requests  # the body became this GenerateRequest
    assert list(request.class_labels) == [2, 1] and request.seed == 7
    assert request.num_steps == 3 and request.guidance_scale == 1.5 and request.sampler == 2


def test_generate_streams_accepted_progress_and_result_events(gateway, fake):
    body = {"class_labels": [0], "num_steps": 4, "preview_mode": "approximate"}
    status, headers, raw = gateway.request("POST", "/v1/generate", body, SSE)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert [name for name, _ in events] == ["accepted", *["progress"] * 4, "result"]
    accepted, progress, result = events[0][1], events[1][1], events[-1][1]
    assert accepted["seed"] == str(2**63 + 5)  # 64-bit seeds as strings, exact
    assert [e["step"] for _, e in events[1:-1]] == [1, 2, 3, 4]
    (preview,) = progress["previews"]
    assert preview == "data:image/png;base64," + base64.b64encode(png_bytes(0, 4)).decode()
    assert base64.b64decode(result["images"][0]["data"]) == png_bytes(0)


@pytest.mark.parametrize(("code", "http_status"), [
    ("INVALID_ARGUMENT", 400), ("FAILED_PRECONDITION", 400), ("UNAUTHENTICATED", 401),
    ("PERMISSION_DENIED", 403), ("RESOURCE_EXHAUSTED", 429), ("UNAVAILABLE", 503),
    ("DEADLINE_EXCEEDED", 504), ("INTERNAL", 500), ("UNIMPLEMENTED", 501)])
@pytest.mark.parametrize("accept", [{}, SSE])
def test_grpc_failures_map_to_http_statuses(gateway, fake, code, http_status, accept):
    fake.configure(error=error_status(code, f"the fake says {code}"))
    status, headers, raw = gateway.request("POST", "/v1/generate", {"class_labels": [1]}, accept)
    assert status == http_status
    error = json.loads(raw)["error"]
    assert (error["status"], error["code"]) == (http_status, code)
    if code == "UNIMPLEMENTED":  # the SDK says what the address serves instead
        assert "does not serve the coordinator API" in error["message"]
    else:  # UNAVAILABLE names the server, DEADLINE_EXCEEDED says no answer came
        assert f"the fake says {code}" in error["message"]
    assert "retry-after" not in headers


def test_queue_full_is_429_with_retry_after(gateway, fake):
    fake.configure(error=error_status("RESOURCE_EXHAUSTED", "queue full (64)", 2.5))
    status, headers, raw = gateway.request("POST", "/v1/generate", {"class_labels": [1]}, SSE)
    assert status == 429 and headers["retry-after"] == "3"  # whole seconds, rounded up
    assert json.loads(raw)["error"]["retry_after"] == 2.5


def test_a_failure_after_the_stream_began_is_an_error_event(gateway, fake):
    fake.configure(error_after_accepted=error_status("UNAVAILABLE", "stage 1 died"))
    status, _, raw = gateway.request("POST", "/v1/generate", {"class_labels": [1]}, SSE)
    assert status == 200
    (name, _), (error_name, error) = sse_events(raw)
    assert (name, error_name) == ("accepted", "error")
    assert (error["error"]["status"], error["error"]["code"]) == (503, "UNAVAILABLE")
    assert error["error"]["message"].endswith("stage 1 died")


@pytest.mark.parametrize(("body", "words"), [
    (b"{not json", "bad request body"),
    ({"class_labels": [1], "steps": 3}, "unknown field 'steps'"),
    ({"seed": 1}, "class_labels is required"),
    ({"class_labels": []}, "class_labels must be a non-empty list"),
    ({"class_labels": [1], "num_steps": "ten"}, "num_steps must be an integer"),
    ({"class_labels": [1], "seed": -1}, "seed must be an integer in 0..2**64-1"),
    ({"class_labels": [1], "return_latents": 1}, "return_latents must be true or false"),
    ({"class_labels": [1], "guidance_scale": 0.5}, "guidance scale must be in 1..10000"),
    ({"class_labels": [1], "sampler": "euler"}, "unknown sampler 'euler'"),
    ({"class_labels": ["purple cat"]}, "unknown class name 'purple cat'"),
    ({"class_labels": [1], "preview_mode": "blurry"}, "unknown preview mode 'blurry'"),
    ({"class_labels": [True]}, "class_labels must hold class ids"),
])
def test_bad_bodies_are_400_and_name_what_is_wrong(gateway, fake, body, words):
    status, _, raw = gateway.request("POST", "/v1/generate", body, SSE)
    error = json.loads(raw)["error"]
    assert status == 400 and error["code"] == "INVALID_ARGUMENT"
    assert words in error["message"]
    assert not fake.calls.requests  # refused before any Generate call


def test_a_body_past_64_kib_is_413(gateway, fake):
    body = {"class_labels": [1], "request_id": "x" * 70_000}
    status, _, raw = gateway.request("POST", "/v1/generate", body)
    assert status == 413 and "exceeds 65536 bytes" in json.loads(raw)["error"]["message"]
    assert not fake.calls.requests


def test_openapi_document_and_the_page_are_served(gateway):
    status, _, raw = gateway.request("GET", "/openapi.json")
    document = json.loads(raw)
    assert status == 200 and document["openapi"].startswith("3.")
    assert {"/v1/generate", "/v1/model", "/healthz", "/openapi.json", "/"} == set(document["paths"])
    status, headers, page = gateway.request("GET", "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    for asset in (b"/static/app.js", b"/static/style.css"):
        assert asset in page
        status, _, text = gateway.request("GET", asset.decode())
        assert status == 200 and b"http://" not in text and b"https://" not in text  # offline


def test_unknown_routes_and_methods_are_refused(gateway):
    assert gateway.request("GET", "/v1/nothing")[0] == 404
    assert gateway.request("GET", "/v1/generate")[0] == 405


# ---- tokens and CORS -------------------------------------------------------------------

@pytest.mark.parametrize("authorization", [None, "Bearer wrong", "Basic czNjcmV0", "Bearer "])
@pytest.mark.parametrize("path", ["/v1/model", "/v1/generate"])
def test_a_missing_or_wrong_token_is_401(guarded, fake, authorization, path):
    headers = {"Authorization": authorization} if authorization else {}
    method, body = ("POST", {"class_labels": [1]}) if path == "/v1/generate" else ("GET", None)
    status, reply_headers, raw = guarded.request(method, path, body, headers)
    assert status == 401 and reply_headers["www-authenticate"] == "Bearer"
    assert json.loads(raw)["error"]["code"] == "UNAUTHENTICATED"
    assert not fake.calls.metadata  # nothing reached the coordinator


def test_a_good_token_passes_and_is_forwarded_as_grpc_metadata(guarded, fake):
    headers = {"Authorization": "Bearer s3cret"}
    assert guarded.request("GET", "/v1/model", None, headers)[0] == 200
    status, _, _ = guarded.request("POST", "/v1/generate", {"class_labels": [1]}, headers)
    assert status == 200
    assert {m["authorization"] for m in fake.calls.metadata} == {"Bearer s3cret"}
    assert guarded.request("GET", "/healthz")[0] == 200  # probes need no token


def test_cors_admits_only_the_configured_origin(guarded, gateway):
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    status, headers, _ = guarded.request("OPTIONS", "/v1/generate", None,
                                         {"Origin": "https://app.example", **preflight})
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in headers["access-control-allow-headers"].lower()
    status, headers, _ = guarded.request("OPTIONS", "/v1/generate", None,
                                         {"Origin": "https://evil.example", **preflight})
    assert status == 400 and "access-control-allow-origin" not in headers
    # No --cors-origin: no CORS headers at all.
    _, headers, _ = gateway.request("GET", "/healthz", None, {"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in headers


# ---- a closed connection cancels; SIGTERM; start-up errors -------------------------------

def _open_request(port: int, body: dict, accept: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/generate HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                 + f"Accept: {accept}\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


@pytest.mark.parametrize("accept", ["text/event-stream", "application/json"])
def test_closing_the_connection_cancels_the_grpc_call(gateway, fake, accept):
    fake.configure(step_seconds=0.05, steps=2000)  # 100 s unless cancelled
    sock = _open_request(gateway.port, {"class_labels": [1]}, accept)
    if accept == "text/event-stream":
        received = b""
        while b"event: progress" not in received:  # the stream is under way
            chunk = sock.recv(65536)
            assert chunk, f"the gateway closed the stream: {received!r}"
            received += chunk
    assert fake.calls.started.wait(30)
    sock.close()
    assert fake.calls.cancelled.wait(30), f"the call was never cancelled:\n{gateway.log()[-3000:]}"
    assert gateway.request("GET", "/healthz")[0] == 200  # and the gateway serves on


def test_sigterm_drains_then_cancels_what_is_left_and_exits_0(coordinator, fake, tmp_path):
    process = GatewayProcess(coordinator.address, tmp_path / "gw.log", ["--grace", "1"]).start()
    try:
        fake.configure(step_seconds=0.05, steps=2000)
        sock = _open_request(process.port, {"class_labels": [1]}, "text/event-stream")
        assert fake.calls.started.wait(30)
        assert process.terminate() == 0
        assert fake.calls.cancelled.wait(30)  # the open request's call did not outlive it
        sock.close()
    finally:
        process.stop()


@pytest.mark.parametrize(("extra", "words"), [
    (["--listen", "0.0.0.0:0"], "is not loopback: give --tokens-file"),
    (["--tokens-file", "/nonexistent/tokens"], "cannot read tokens file"),
    (["--retries", "-1"], "--retries must be >= 0"),
])
def test_start_up_errors_are_one_line(extra, words):
    argv = gateway_argv("127.0.0.1:1", find_free_port(), extra)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and words in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_token_instead_of_a_digest_is_refused(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    argv = gateway_argv("127.0.0.1:1", find_free_port(), ["--tokens-file", str(tokens)])
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and f"{tokens}:1: expected a sha256 hex digest" in done.stderr


def test_a_port_in_use_is_one_line(coordinator):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = gateway_argv(coordinator.address, port)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_quiet_stream_gets_heartbeat_comments(coordinator, fake, tmp_path):
    """While no event comes (a queued request), comment lines keep proxies from closing."""
    process = GatewayProcess(coordinator.address, tmp_path / "gw.log",
                             ["--heartbeat", "0.05"]).start()
    try:
        fake.configure(step_seconds=0.5, steps=2)
        status, _, raw = process.request("POST", "/v1/generate", {"class_labels": [0]}, SSE)
    finally:
        process.stop()
    assert status == 200 and b"\n: waiting\n\n" in raw
    assert [name for name, _ in sse_events(raw)] == ["accepted", "progress", "progress", "result"]


def test_the_probe_tells_a_serving_gateway(gateway, coordinator, fake):
    from ditserve.gateway.probe import is_serving

    assert is_serving(f"127.0.0.1:{gateway.port}")
    coordinator.health.set("", 2)  # NOT_SERVING behind it
    assert not is_serving(f"127.0.0.1:{gateway.port}")
    assert not is_serving(f"127.0.0.1:{find_free_port()}")
