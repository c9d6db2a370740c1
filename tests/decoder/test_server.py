"""`ditserve decoder` as a real process: health, Decode, bad input, metrics, SIGTERM."""

from __future__ import annotations

import asyncio
import io
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from conftest import find_free_port
from ditserve.common.status import ServiceError, StatusCode
from ditserve.decoder.client import DecoderClient, latents_to_proto
from ditserve.decoder.decoder import VaeDecoder
from ditserve_client.proto.dit.v1 import decoder_pb2, decoder_pb2_grpc, image_pb2, tensor_pb2
from PIL import Image

from .conftest import random_latents


@pytest.fixture(scope="module")
def server(launcher, tiny_vae_dir):
    port, metrics_port = find_free_port(), find_free_port()
    process = launcher.start("decoder", [
        "decoder", "--vae", str(tiny_vae_dir), "--listen", f"127.0.0.1:{port}",
        "--max-batch", "4", "--metrics-port", str(metrics_port)], f"127.0.0.1:{port}")
    process.metrics_port = metrics_port
    return process


def decode(address: str, latents: torch.Tensor, **options) -> list[image_pb2.Image]:
    async def call():
        client = DecoderClient(address)
        try:
            return await client.decode(latents, **options)
        finally:
            await client.close()
    return asyncio.run(call())


def raw_decode(address: str, request: decoder_pb2.DecodeRequest) -> decoder_pb2.DecodeResponse:
    with grpc.insecure_channel(address) as channel:
        return decoder_pb2_grpc.DecoderServiceStub(channel).Decode(request, timeout=30)


def test_decode_returns_the_vaes_images(server, tiny_vae_dir):
    latents = random_latents(2, seed=5)
    images = decode(server.address, latents, fmt="png", labels=[3, 7], request_id="t1")
    expected = VaeDecoder.load(tiny_vae_dir).decode(latents)
    assert [i.class_label for i in images] == [3, 7]
    for image, pixels in zip(images, expected, strict=True):
        assert (image.width, image.height, image.format) == (16, 16, image_pb2.IMAGE_FORMAT_PNG)
        decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(image.data))))
        assert (decoded.int() - pixels.int()).abs().max() <= 1


def test_webp_and_concurrent_requests(server):
    async def many():
        client = DecoderClient(server.address)
        try:
            return await asyncio.gather(*(client.decode(random_latents(1, seed=i), fmt="webp",
                                                        quality=70) for i in range(5)))
        finally:
            await client.close()
    for images in asyncio.run(many()):
        assert Image.open(io.BytesIO(images[0].data)).format == "WEBP"


@pytest.mark.parametrize("tensor, message", [
    (tensor_pb2.Tensor(datatype="FP32", shape=[1, 4, 8, 8], raw_contents=b"\0" * 10),
     "needs 1024"),
    (latents_to_proto(torch.zeros(1, 3, 8, 8)), "this VAE takes 4"),
    (latents_to_proto(torch.full((1, 4, 8, 8), float("inf"))), "NaN or infinite"),
    (tensor_pb2.Tensor(datatype="INT64", shape=[1, 4, 2, 2], raw_contents=b"\0" * 128),
     "FP32, BF16 or FP16"),
])
def test_bad_latents_are_invalid_argument_and_server_keeps_serving(server, tensor, message):
    with pytest.raises(grpc.RpcError) as failure:
        raw_decode(server.address, decoder_pb2.DecodeRequest(latents=tensor))
    assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert message in failure.value.details()
    assert len(decode(server.address, random_latents(1))) == 1


def test_label_count_mismatch_through_client_is_chain_error(server):
    with pytest.raises(ServiceError) as failure:
        decode(server.address, random_latents(2), labels=[1])
    assert failure.value.code is StatusCode.INVALID_ARGUMENT
    assert "1 class labels for 2 latent rows" in failure.value.message


def test_metrics_endpoint(server):
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    assert 'dit_decoder_requests_total{outcome="ok"}' in text
    assert 'dit_decoder_requests_total{outcome="INVALID_ARGUMENT"}' in text
    assert "dit_decoder_batch_rows_bucket" in text


def test_the_client_at_the_decoders_address_says_what_it_serves(server, tmp_path, capsys):
    """`--target` at the decoder: reflection tells which service the address serves."""
    from ditserve.cli import main

    for argv in (["generate", "--class", "1", "--out", str(tmp_path / "o.png")], ["info"]):
        assert main([*argv, "--target", server.address, "--timeout", "30"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert f"{server.address} serves dit.v1.DecoderService (the VAE decoder)" in err
        assert "needs the coordinator (dit.v1.CoordinatorService)" in err


def test_sigterm_exits_cleanly(server):
    assert server.terminate() == 0
    log = server.log()
    assert "event=draining" in log and "event=stopped" in log
