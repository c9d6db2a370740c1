"""The embedded demo model through the running multi-stage pipeline makes pictures of the
class asked for: the shipped classifier recognises it in at least 90% of the images
generated with the server's default sampler and guidance (issue: the embedded default
model)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import UpCluster
from ditserve.demo import DEMO_CLASS_NAMES, classify
from ditserve_client import Client
from PIL import Image

IMAGES_PER_CLASS = 3


@pytest.fixture(scope="module")
def demo_cluster(tmp_path_factory):
    """`ditserve up` with no checkpoint: the embedded demo model over 2 stages."""
    up = UpCluster(["--stages", "2"], tmp_path_factory.mktemp("demo") / "logs")
    try:
        yield up.start()
    finally:
        up.stop()


def _decode(images) -> np.ndarray:
    """Encoded images → uint8 (N, H, W, 3)."""
    return np.stack([np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))
                     for image in images])


def test_default_server_is_the_demo_model_over_two_stages(demo_cluster):
    with Client(demo_cluster.target) as client:
        info = client.model_info()
    assert len(info.stages) == 2 and all(stage.serving for stage in info.stages)
    assert list(info.classes.names) == DEMO_CLASS_NAMES
    assert info.has_decoder and info.image_size == 64


def test_generated_images_show_the_requested_class(demo_cluster):
    labels = [c for c in range(len(DEMO_CLASS_NAMES)) for _ in range(IMAGES_PER_CLASS)]
    predicted: list[int] = []
    with Client(demo_cluster.target) as client:
        for first in range(0, len(labels), 10):  # default sampler, steps and guidance
            result = client.generate_result(labels[first:first + 10], seed=first)
            predicted += classify(_decode(result.images)).tolist()
    accuracy = float(np.mean(np.array(predicted) == np.array(labels)))
    print(f"demo pipeline accuracy: {accuracy:.3f} over {len(labels)} images")
    assert accuracy >= 0.9, list(zip(labels, predicted, strict=True))
