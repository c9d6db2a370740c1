"""Class names come from the config or the checkpoint (never from hashing weights)."""

from __future__ import annotations

import pytest
from ditserve.config import ConfigError
from ditserve.coordinator.model_info import class_names
from ditserve.demo import DEMO_DIT_PATH, DEMO_WEIGHTS
from ditserve.model import DiTConfig

TEN = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                num_heads=2, num_classes=10)


def _lines(path) -> list[str]:
    return [line.strip() for line in path.read_text("utf-8").splitlines() if line.strip()]


def test_the_demo_checkpoint_brings_its_own_names():
    names = class_names(TEN, checkpoint=str(DEMO_DIT_PATH))
    assert names == _lines(DEMO_WEIGHTS / "class_names.txt") and len(names) == 10


def test_names_beside_any_checkpoint_are_used(tmp_path):
    checkpoint = tmp_path / "mine.safetensors"
    checkpoint.write_bytes(b"")  # only its folder is looked at
    (tmp_path / "class_names.txt").write_text("\n".join(f"shape {i}" for i in range(10)))
    assert class_names(TEN, checkpoint=str(checkpoint))[9] == "shape 9"


def test_the_config_file_comes_first_and_must_match_the_model(tmp_path):
    names_file = tmp_path / "names.txt"
    names_file.write_text("\n".join(f"n{i}" for i in range(10)) + "\n\n")
    assert class_names(TEN, str(names_file), str(DEMO_DIT_PATH))[0] == "n0"
    names_file.write_text("only\ntwo\n")
    with pytest.raises(ConfigError, match=r"names.txt has 2 names, the model has 10 classes"):
        class_names(TEN, str(names_file))
    with pytest.raises(ConfigError, match="cannot read"):
        class_names(TEN, str(tmp_path / "missing.txt"))


def test_without_names_imagenet_for_1000_classes_else_numbered(tmp_path):
    imagenet = class_names(DiTConfig(input_size=8, hidden_size=32, num_heads=2, depth=2))
    assert len(imagenet) == 1000 and imagenet[207].startswith("golden retriever")
    assert class_names(TEN, checkpoint=str(tmp_path / "x.pt"))[3] == "class 3"


def _stage(index: int):
    from ditserve.stage.runner import StageDescription

    return StageDescription(stage_index=index, num_stages=3, block_start=index,
                            block_end=index + 1, depth=3, model_name="m",
                            model_config_json=TEN.to_json(), weight_hash="h",
                            wire_dtype="FP32", address=f"a{index}", device="cpu",
                            max_batch_size=8, serving=True)


class _Chain:
    def __init__(self):
        self.error = None

    async def describe(self):
        if self.error is not None:
            raise self.error
        return [_stage(i) for i in range(3)]


@pytest.mark.parametrize("message, down", [
    ("stage-0 at 127.0.0.1:1: failed to connect", [0]),
    ("stage-1 at 127.0.0.1:2: stage-2 at 127.0.0.1:3: Deadline Exceeded", [2]),
    ("no stage named", [0, 1, 2])])
def test_an_unreachable_stage_is_reported_not_serving(message, down):
    import asyncio

    from ditserve.common.status import ServiceError, StatusCode
    from ditserve.config import CoordinatorConfig
    from ditserve.coordinator.model_info import ModelInfo

    chain = _Chain()
    info = ModelInfo(TEN, chain, CoordinatorConfig(), class_names(TEN), stages=[])
    assert all(s.serving for s in asyncio.run(info.describe()).stages)
    chain.error = ServiceError(StatusCode.UNAVAILABLE, message)
    reply = asyncio.run(info.describe())
    assert [s.stage_index for s in reply.stages if not s.serving] == down
    chain.error = None
    assert all(s.serving for s in asyncio.run(info.describe()).stages)


def test_the_stage_serving_gauge_follows_the_chain_without_anyone_asking():
    """The coordinator's own watch (every `stage_health_interval_seconds`) updates
    dit_coordinator_stage_serving; GetModelInfo is never called here."""
    import asyncio

    from ditserve.common.status import ServiceError, StatusCode
    from ditserve.config import CoordinatorConfig
    from ditserve.coordinator import metrics
    from ditserve.coordinator.model_info import ModelInfo, watch_stages

    def serving(stage: int) -> float:
        return metrics.STAGE_SERVING.labels(str(stage))._value.get()

    async def main() -> list[list[float]]:
        chain = _Chain()
        info = ModelInfo(TEN, chain, CoordinatorConfig(), class_names(TEN),
                         stages=[_stage(i) for i in range(3)])
        watcher = asyncio.create_task(watch_stages(info, 0.01))
        seen = []
        try:
            await asyncio.sleep(0.05)
            seen.append([serving(i) for i in range(3)])
            chain.error = ServiceError(StatusCode.UNAVAILABLE,
                                       "stage-0 at A: stage-1 at B: failed to connect")
            await asyncio.sleep(0.05)
            seen.append([serving(i) for i in range(3)])
            chain.error = None
            await asyncio.sleep(0.05)
            seen.append([serving(i) for i in range(3)])
        finally:
            watcher.cancel()
        return seen

    assert asyncio.run(main()) == [[1, 1, 1], [1, 0, 1], [1, 1, 1]]


def test_the_image_size_follows_the_served_vae(tmp_path):
    """GetModelInfo's image side is the latent side times the served VAE's down factor:
    the config's decoder VAE first, then the VAE beside the checkpoint, else SD's ×8."""
    import json

    from ditserve.coordinator.model_info import VAE_DOWNSCALE, served_vae_downscale

    def vae(folder, blocks):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"block_out_channels": blocks}))
        return str(folder)

    checkpoint = tmp_path / "model" / "dit.safetensors"
    vae(checkpoint.parent / "vae", [16, 32, 64])  # shipped beside it: ×4
    assert served_vae_downscale("", str(checkpoint)) == 4
    assert served_vae_downscale(vae(tmp_path / "sd", [128, 256, 512, 512]), str(checkpoint)) == 8
    assert served_vae_downscale(str(tmp_path / "on-another-host"), str(checkpoint)) == 4
    assert served_vae_downscale(str(tmp_path / "on-another-host")) == VAE_DOWNSCALE
    assert served_vae_downscale("", str(tmp_path / "x.pt")) == VAE_DOWNSCALE


def test_the_demo_model_is_served_as_64_pixel_images():
    """Whatever the demo VAE's down factor, the demo DiT's latents decode to the 64×64
    pictures it was trained on."""
    from ditserve.coordinator.model_info import served_vae_downscale
    from ditserve.demo.shapes import IMAGE_SIZE
    from ditserve.model import open_checkpoint

    side = open_checkpoint(DEMO_DIT_PATH).config.input_size
    assert side * served_vae_downscale("", str(DEMO_DIT_PATH)) == IMAGE_SIZE == 64
