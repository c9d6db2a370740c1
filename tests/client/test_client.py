"""The sync Client against the fake coordinator: events, labels, retries, errors, auth."""

from __future__ import annotations

import asyncio
import subprocess

import grpc
import pytest
from conftest import find_free_port  # the shared tests/conftest.py
from ditserve_client import (
    Accepted,
    AsyncClient,
    Client,
    DitserveError,
    Progress,
    Result,
    UnknownClassError,
)
from ditserve_client.proto.dit.v1 import coordinator_pb2
from google.rpc import code_pb2

from .conftest import IMAGE_SIDE, error_status, start_fake


@pytest.fixture
def client(coordinator):
    with Client(coordinator.address, timeout=10) as client:
        yield client


def test_generate_yields_accepted_progress_result(client, fake):
    events = list(client.generate([207, 3], seed=7, steps=3, sampler="ddim", guidance=2.5,
                                  guidance_channels="all", return_latents=True))
    assert isinstance(events[0], Accepted) and events[0].seed == 7
    assert events[0].sampler == "ddim" and events[0].num_steps == 3
    assert [(e.step, e.total) for e in events[1:-1]] == [(1, 3), (2, 3), (3, 3)]
    assert all(isinstance(e, Progress) for e in events[1:-1])
    result = events[-1]
    assert isinstance(result, Result) and result.request_id == "req-1"
    assert [(i.label, i.width, i.format) for i in result.images] == [(207, IMAGE_SIDE, "png"),
                                                                    (3, IMAGE_SIDE, "png")]
    assert result.images[0].data.startswith(b"\x89PNG")
    assert result.latents.shape == (2, 4, 2, 2) and result.latents.dtype == "FP32"
    assert result.latents.to_numpy()[1, 0, 0, 0] == 16.0
    assert result.timings.denoising == 0.5
    request = fake.requests[0]
    assert request.sampler == coordinator_pb2.SAMPLER_DDIM and request.guidance_scale == 2.5
    assert request.guidance_channels == coordinator_pb2.GUIDANCE_CHANNELS_ALL


def test_names_resolve_through_model_info(client, fake):
    result = client.generate_result(["golden retriever", "Golden Retriever", "207", 1])
    assert list(fake.requests[0].class_labels) == [207, 207, 207, 1]
    assert [i.label for i in result.images] == [207, 207, 207, 1]
    assert fake.info_calls == 1  # cached after the first look-up


def test_unknown_name_fails_before_generating(coordinator, fake):
    with Client(coordinator.address) as client, \
            pytest.raises(UnknownClassError, match="'golden retriever' \\(207\\)"):
        client.generate_result(["golden retreiver"])
    assert fake.generate_calls == 0


def test_model_names_win_over_imagenet(coordinator):
    coordinator.fake.configure(class_names=["cat", "dog", "Golden Retriever"], num_classes=3)
    with Client(coordinator.address) as client:
        assert client.class_ids(["DOG", "golden retriever", 0]) == [1, 2, 0]
        with pytest.raises(UnknownClassError, match="unknown class name 'tench'"):
            client.class_ids(["tench"])
        with pytest.raises(UnknownClassError, match=r"out of range \(0..2\)"):
            client.class_ids(["cat", 5])  # a name brings the model's classes in


def test_previews_and_skip_images(client, fake):
    events = list(client.generate([1, 2], steps=4, previews="approximate", preview_every=2,
                                  skip_images=True))
    previews = [len(e.previews) for e in events if isinstance(e, Progress)]
    assert previews == [0, 2, 0, 2]
    assert events[-1].images == [] and events[-1].latents is None


def test_model_info(client, fake):
    info = client.model_info()
    assert info.model_name == "DiT-Tiny/2" and info.samplers == {"ddpm": 250, "ddim": 50}
    assert info.classes.num_classes == 1000 and info.classes.name(207) == "golden retriever"
    assert [(s.block_start, s.block_end, s.serving) for s in info.stages] == [(0, 2, True),
                                                                            (2, 4, False)]


@pytest.mark.parametrize("options, message", [
    ({"sampler": "euler"}, "unknown sampler"), ({"quality": 101}, "quality"),
    ({"quality": 0}, "quality"), ({"steps": -1}, "steps"), ({"steps": 0}, "steps"),
    ({"image_format": "gif"}, "image format"), ({"guidance": 0.5}, "guidance"),
    ({"guidance": 1e38}, "guidance"), ({"guidance": float("nan")}, "guidance"),
    ({"guidance": float("inf")}, "guidance"), ({"preview_every": 0}, "preview_every"),
    ({"seed": -1}, "seed"), ({"guidence": 4}, "unknown option 'guidence'"),
])
def test_bad_options_fail_locally(client, fake, options, message):
    with pytest.raises(ValueError, match=message):
        client.generate_result([1], **options)
    assert fake.generate_calls == 0


def test_unset_options_leave_the_server_defaults(client, fake):
    client.generate_result([1])
    request = fake.requests[0]
    assert request.sampler == coordinator_pb2.SAMPLER_UNSPECIFIED
    assert request.guidance_channels == coordinator_pb2.GUIDANCE_CHANNELS_UNSPECIFIED
    assert request.image_format == 0 and request.image_quality == 0  # IMAGE_FORMAT_UNSPECIFIED
    assert request.num_steps == 0 and request.preview_every == 0
    assert not request.HasField("guidance_scale") and not request.HasField("seed")


def test_largest_guidance_is_sent(client, fake):
    client.generate_result([1], guidance=1e4)
    assert fake.requests[0].guidance_scale == 1e4


def test_retries_are_the_channels_service_config(coordinator):
    """Retries come from a gRPC retryPolicy on the channel (shared by both clients), not
    from a loop in the client: the policy is in the service config it opens with."""
    import json

    from ditserve_client import AsyncClient

    with Client(coordinator.address, retries=2) as client:
        options = dict(client.settings.options())
    config = json.loads(options["grpc.service_config"])
    policy = config["methodConfig"][0]["retryPolicy"]
    assert config["methodConfig"][0]["name"] == [{"service": "dit.v1.CoordinatorService"}]
    assert policy["maxAttempts"] == 3 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert not hasattr(Client, "_wait_or_raise") and not hasattr(AsyncClient, "_wait_or_raise")
    with pytest.raises(ValueError, match=r"retries must be 0\.\.4"):
        Client(coordinator.address, retries=5)


def test_generate_retries_unavailable_before_any_event(client, fake):
    fake.configure(fail_generate=2)
    assert isinstance(client.generate_result([1]), Result)
    assert fake.generate_calls == 3


def test_generate_gives_up_after_retries(coordinator, fake):
    fake.configure(fail_generate=10)
    with Client(coordinator.address, retries=1) as client, pytest.raises(DitserveError) as err:
        client.generate_result([1])
    assert err.value.code == "UNAVAILABLE" and fake.generate_calls == 2


def test_no_retry_once_events_arrived(client, fake):
    fake.configure(fail_after_accepted=True)
    seen = []
    with pytest.raises(DitserveError) as err:
        for event in client.generate([1]):
            seen.append(event)
    assert err.value.code == "UNAVAILABLE" and "stage 1 died" in err.value.message
    assert len(seen) == 1 and fake.generate_calls == 1


def test_model_info_retries_unavailable(client, fake):
    fake.configure(fail_info=2)
    assert client.model_info().model_name == "DiT-Tiny/2" and fake.info_calls == 3


def test_resource_exhausted_carries_retry_hint_and_is_not_retried(client, fake):
    fake.configure(generate_error=error_status(code_pb2.RESOURCE_EXHAUSTED, "queue full", 1.5))
    with pytest.raises(DitserveError) as err:
        client.generate_result([1])
    assert (err.value.code, err.value.retry_after) == ("RESOURCE_EXHAUSTED", 1.5)
    assert "queue full" in str(err.value) and fake.generate_calls == 1


def test_invalid_argument_is_not_retried(client, fake):
    fake.configure(generate_error=error_status(code_pb2.INVALID_ARGUMENT, "bad label"))
    with pytest.raises(DitserveError) as err:
        client.generate_result([1])
    assert err.value.code == "INVALID_ARGUMENT" and err.value.retry_after is None
    assert fake.generate_calls == 1


def test_unreachable_server_is_unavailable():
    target = f"127.0.0.1:{find_free_port()}"  # nothing listens (port 1 may, for root)
    with Client(target, retries=1, timeout=5) as client, pytest.raises(DitserveError) as err:
        client.model_info()
    assert err.value.code == "UNAVAILABLE" and target in err.value.message


def test_a_silent_server_names_the_target_in_its_deadline_error():
    """A port that accepts connections but never speaks HTTP/2: the deadline passes."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        target = f"127.0.0.1:{listener.getsockname()[1]}"
        with Client(target, retries=0, timeout=1) as client, \
                pytest.raises(DitserveError) as err:
            client.model_info()
    assert err.value.code == "DEADLINE_EXCEEDED"
    assert f"no answer from {target} within the deadline" in err.value.message


def test_token_travels_as_bearer_metadata(coordinator, fake):
    with Client(coordinator.address, token="s3cret") as client:
        client.generate_result([1])
    assert fake.metadata[0]["authorization"] == "Bearer s3cret"


def test_bad_target_is_rejected():
    with pytest.raises(ValueError, match="HOST:PORT"):
        Client("localhost")
    with pytest.raises(ValueError, match=r"127\.0\.0\.1:99999: port 99999 is outside 1\.\.65535"):
        Client("127.0.0.1:99999")


def test_tls_with_token(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, fake, port = start_fake(credentials)
    try:
        with Client(f"localhost:{port}", tls=True, root_certificates=cert.read_bytes(),
                    token="t0k") as client:
            assert isinstance(client.generate_result([1]), Result)
        assert fake.metadata[0]["authorization"] == "Bearer t0k"
        with Client(f"localhost:{port}", retries=0) as plaintext, \
                pytest.raises(DitserveError):
            plaintext.model_info()
    finally:
        server.stop(grace=None)


def test_a_stage_address_is_named_by_reflection():
    """UNIMPLEMENTED from a server that is not the coordinator: what it serves instead."""
    from concurrent.futures import ThreadPoolExecutor

    from ditserve_client.proto.dit.v1 import stage_pb2, stage_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    stage_pb2_grpc.add_StageServiceServicer_to_server(stage_pb2_grpc.StageServiceServicer(),
                                                      server)
    name = stage_pb2.DESCRIPTOR.services_by_name["StageService"].full_name
    reflection.enable_server_reflection([name, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=10) as client, \
                pytest.raises(DitserveError) as err:
            client.generate_result([1])
        assert err.value.code == "UNIMPLEMENTED"
        assert f"127.0.0.1:{port} serves dit.v1.StageService (a pipeline stage)" in str(err.value)
        assert "needs the coordinator" in str(err.value)
    finally:
        server.stop(grace=None)


DECODER_DOWN = dict(error_after_result=error_status(
    code_pb2.UNAVAILABLE, "images are missing, the latents were sent in the Result: "
    "decoder at 127.0.0.1:1 is unavailable"))


def test_latents_sent_before_a_failure_ride_on_the_error(client, fake):
    """The decoder stayed down: the coordinator sends the latents asked for, then
    UNAVAILABLE. `generate_result` raises, and the latents are on the error."""
    fake.configure(**DECODER_DOWN)
    with pytest.raises(DitserveError) as err:
        client.generate_result([1, 2], seed=3, return_latents=True)
    assert err.value.code == "UNAVAILABLE" and "images are missing" in err.value.message
    kept = err.value.result
    assert isinstance(kept, Result) and kept.images == [] and kept.seed == 3
    assert kept.latents is not None and kept.latents.shape == (2, 4, 2, 2)


def test_the_asyncio_client_keeps_them_too(coordinator, fake):
    fake.configure(**DECODER_DOWN)

    async def run() -> DitserveError:
        async with AsyncClient(coordinator.address, timeout=10) as aclient:
            with pytest.raises(DitserveError) as err:
                await aclient.generate_result([4], return_latents=True)
            return err.value

    error = asyncio.run(run())
    assert error.code == "UNAVAILABLE" and error.result.latents.shape == (1, 4, 2, 2)


def test_an_error_before_any_result_carries_none(client, fake):
    fake.configure(fail_after_accepted=True)
    with pytest.raises(DitserveError) as err:
        client.generate_result([1])
    assert err.value.result is None


def test_a_waiting_notice_is_an_event_of_its_own(client, fake):
    fake.configure(waiting_after=2)
    events = list(client.generate([1]))
    notices = [e for e in events if isinstance(e, Progress) and e.waiting_on]
    steps = [e.step for e in events if isinstance(e, Progress) and not e.waiting_on]
    assert steps == [1, 2, 3, 4] and len(notices) == 1  # shown, though its step repeats
    assert notices[0].step == 2 and notices[0].waiting_seconds == 5.5
    assert "unavailable" in notices[0].waiting_reason


def test_async_mode_is_sent_and_accepted_reports_it(client, fake):
    events = list(client.generate([1], seed=7, steps=3, mode="async", warmup=1))
    request = fake.requests[0]
    assert request.mode == coordinator_pb2.GENERATION_MODE_ASYNC
    assert request.async_warmup_steps == 1
    assert (events[0].mode, events[0].async_warmup_steps) == ("async", 1)
    exact = list(client.generate([1], seed=7))
    assert not fake.requests[1].HasField("async_warmup_steps")
    assert (exact[0].mode, exact[0].async_warmup_steps) == ("exact", 0)


@pytest.mark.parametrize("options, words", [
    ({"mode": "fast"}, "unknown mode 'fast'"),
    ({"warmup": 2}, "warmup is for async mode only"),
    ({"mode": "async", "steps": 4, "warmup": 5}, "warmup must be 0..steps")])
def test_bad_modes_fail_before_sending(client, fake, options, words):
    with pytest.raises(ValueError, match=words):
        list(client.generate([1], **options))
    assert fake.generate_calls == 0
