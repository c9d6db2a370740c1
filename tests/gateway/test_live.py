"""The gateway in front of a real `ditserve up`: what HTTP returns is what gRPC returns."""

from __future__ import annotations

import base64
import json

from ditserve_client import Client

from .conftest import sse_events

SSE = {"Accept": "text/event-stream"}


def test_model_is_what_grpc_reports(live):
    status, _, raw = live.gateway.request("GET", "/v1/model")
    model = json.loads(raw)
    with Client(live.up.target) as client:
        info = client.model_info()
    assert status == 200 and model["model"] == info.model_name
    assert model["num_classes"] == 10 and len(model["classes"]) == 10
    assert {s["name"]: s["default_steps"] for s in model["samplers"]} == info.samplers
    assert model["has_decoder"] and model["preview_modes"] == ["approximate", "decoded"]
    assert [s["serving"] for s in model["stages"]] == [True, True]


def test_json_reply_holds_the_same_images_and_latents_as_grpc(live):
    body = {"class_labels": [1, 7], "seed": 11, "sampler": "ddim", "num_steps": 5,
            "guidance_scale": 2.0, "return_latents": True}
    status, _, raw = live.gateway.request("POST", "/v1/generate", body)
    assert status == 200
    reply = json.loads(raw)
    with Client(live.up.target) as client:
        result = client.generate_result([1, 7], seed=11, sampler="ddim", steps=5, guidance=2.0,
                                        return_latents=True)
    assert [base64.b64decode(i["data"]) for i in reply["images"]] == [i.data for i in result.images]
    assert [i["label"] for i in reply["images"]] == [1, 7]
    assert base64.b64decode(reply["latents"]["data"]) == result.latents.data
    assert reply["latents"]["shape"] == [2, 4, 8, 8] and reply["seed"] == "11"


def test_stream_shows_every_step_with_decoded_previews(live):
    body = {"class_labels": [3], "seed": 2, "sampler": "ddim", "num_steps": 6,
            "preview_mode": "decoded"}
    status, _, raw = live.gateway.request("POST", "/v1/generate", body, SSE)
    events = sse_events(raw)
    assert status == 200
    assert [name for name, _ in events] == ["accepted", *["progress"] * 6, "result"]
    previews = [e["previews"] for name, e in events if name == "progress"]
    assert all(len(p) == 1 and p[0].startswith("data:image/") for p in previews)
    assert len({p[0] for p in previews}) > 1  # the image changes as it denoises
    assert events[-1][1]["images"][0]["width"] == 16


def test_the_coordinators_invalid_argument_is_400_in_its_words(live):
    body = {"class_labels": [3], "sampler": "ddim", "num_steps": 100000}
    status, _, raw = live.gateway.request("POST", "/v1/generate", body, SSE)
    error = json.loads(raw)["error"]
    assert status == 400 and error["code"] == "INVALID_ARGUMENT"
    assert "num_steps: 100000 is outside 1..1000" in error["message"]
