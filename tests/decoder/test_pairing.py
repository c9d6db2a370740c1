"""A VAE that does not belong to the served DiT is refused at the decoder's start-up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ditserve.decoder.pairing import (
    VaePairingError,
    check_pairing,
    dit_latent_space,
    own_vae,
    vae_downscale,
)
from ditserve.demo import DEMO_DIT_PATH, DEMO_VAE_PATH


def vae_config(folder: Path, channels: int = 4, scaling_factor: float | None = 0.18215,
               blocks: tuple[int, ...] = (128, 256, 512, 512)) -> Path:
    """A VAE folder holding only its config.json (all the pairing check reads); SD's four
    blocks (×8 down) unless told."""
    folder.mkdir(parents=True)
    config = {"_class_name": "AutoencoderKL", "latent_channels": channels,
              "block_out_channels": list(blocks)}
    if scaling_factor is not None:
        config["scaling_factor"] = scaling_factor
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_demo_model_and_its_own_vae_pair():
    assert own_vae(DEMO_DIT_PATH) == DEMO_VAE_PATH
    check_pairing(DEMO_DIT_PATH, DEMO_VAE_PATH)


def test_an_official_style_dit_refuses_the_demo_vae(tiny_checkpoint):
    """The issue's case: a DiT without a VAE of its own expects SD's latents (0.18215)."""
    with pytest.raises(VaePairingError) as error:
        check_pairing(tiny_checkpoint, DEMO_VAE_PATH)
    message = str(error.value)
    assert f"VAE {DEMO_VAE_PATH} does not belong to the model {tiny_checkpoint}" in message
    assert "scaling factor 0.18215" in message and "sd-vae-ft-ema" in message


def test_an_official_style_dit_takes_any_sd_vae(tiny_checkpoint, tmp_path):
    check_pairing(tiny_checkpoint, vae_config(tmp_path / "sd-vae-ft-mse"))
    check_pairing(tiny_checkpoint, vae_config(tmp_path / "no-scale", scaling_factor=None))


def test_the_demo_dit_refuses_an_sd_vae(tmp_path):
    with pytest.raises(VaePairingError, match="trained on the latents of its own VAE"):
        check_pairing(DEMO_DIT_PATH, vae_config(tmp_path / "sd-vae"))


def test_latent_channels_must_match(tiny_checkpoint, tmp_path):
    with pytest.raises(VaePairingError, match="this VAE has 16 channels"):
        check_pairing(tiny_checkpoint, vae_config(tmp_path / "flux-like", channels=16))


def test_a_diffusers_pipeline_folder_brings_its_vae(tmp_path):
    pipeline = tmp_path / "DiT-XL-2-256"
    (pipeline / "transformer").mkdir(parents=True)
    vae_config(pipeline / "vae", scaling_factor=0.5)
    for checkpoint in (pipeline, pipeline / "transformer"):
        assert dit_latent_space(checkpoint).scaling_factor == 0.5
        check_pairing(checkpoint, vae_config(tmp_path / f"copy-{checkpoint.name}", 4, 0.5))
    with pytest.raises(VaePairingError):
        check_pairing(pipeline, vae_config(tmp_path / "sd"))


def test_the_decoder_process_refuses_in_one_line(tmp_path, tiny_checkpoint):
    """`ditserve up --checkpoint X` without --vae starts the decoder on the demo VAE: it
    exits 2 before binding, naming both."""
    model = tmp_path / "model" / "tiny.safetensors"
    model.parent.mkdir()
    shutil.copy(tiny_checkpoint, model)
    config = tmp_path / "pipeline.yaml"
    config.write_text(f"model: {{checkpoint: '{model}'}}\n"
                      "stages: [{address: '127.0.0.1:1'}]\n"
                      "decoder: {address: '127.0.0.1:1', vae: ''}\n")
    done = subprocess.run([sys.executable, "-m", "ditserve.cli", "decoder", "--config",
                           str(config)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"ditserve decoder: VAE {DEMO_VAE_PATH} does not belong to "
                                  f"the model {model}")


def test_the_down_factor_is_read_as_diffusers_builds_the_encoder(tmp_path):
    """×2 per down block but the last: checked against a real (tiny) AutoencoderKL's
    latents, and on SD's layout (×8)."""
    import torch
    from diffusers import AutoencoderKL

    blocks = (8, 8, 8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * len(blocks),
                        up_block_types=("UpDecoderBlock2D",) * len(blocks),
                        block_out_channels=blocks, layers_per_block=1)
    vae.save_pretrained(tmp_path / "tiny")
    with torch.no_grad():
        side = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mean.shape[-1]
    assert vae_downscale(tmp_path / "tiny") == 32 // side == 4
    assert vae_downscale(vae_config(tmp_path / "sd")) == 8


def test_an_unreadable_vae_config_is_a_pairing_error(tmp_path):
    with pytest.raises(VaePairingError, match="cannot read the VAE config"):
        vae_downscale(tmp_path / "missing")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"block_out_channels": 3}')
    with pytest.raises(VaePairingError, match="no block_out_channels list"):
        vae_downscale(tmp_path / "odd")
