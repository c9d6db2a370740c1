"""`ditserve generate` / `ditserve info` against the fake coordinator, in-process."""

from __future__ import annotations

import io

import numpy as np
from ditserve.cli import main
from ditserve_client.progress import ProgressBar
from PIL import Image

from .conftest import IMAGE_SIDE


def test_one_class_writes_the_image_and_latents(coordinator, fake, tmp_path, capsys):
    out, latents = tmp_path / "dog.png", tmp_path / "x.npy"
    code = main(["generate", "--target", coordinator.address, "--class", "golden retriever",
                 "--seed", "0", "--steps", "5", "--sampler", "ddim", "--guidance", "4",
                 "--out", str(out), "--latents-out", str(latents), "--request-id", "r-7"])
    assert code == 0
    assert Image.open(out).size == (IMAGE_SIDE, IMAGE_SIDE)
    assert np.load(latents).shape == (1, 4, 2, 2) and np.load(latents).dtype == np.float32
    request = fake.requests[0]
    assert list(request.class_labels) == [207] and request.num_steps == 5
    assert request.request_id == "r-7" and request.return_latents
    err = capsys.readouterr().err
    assert "seed 0" in err and "step 5/5" in err and "\r" not in err  # plain lines off a TTY


def test_several_classes_make_a_grid_and_singles(coordinator, fake, tmp_path, capsys):
    out, singles = tmp_path / "grid.png", tmp_path / "singles"
    code = main(["generate", "--target", coordinator.address, "--class", "207", "--class",
                 "tench", "--class", "88", "--out", str(out), "--out-dir", str(singles)])
    assert code == 0
    grid = Image.open(out)
    assert grid.size == (2 * IMAGE_SIDE + 6, 2 * IMAGE_SIDE + 6)  # 2x2 with 2-px gaps
    assert grid.getpixel((2, 2))[0] == 207 and grid.getpixel((IMAGE_SIDE + 4, 2))[0] == 0
    assert sorted(p.name for p in singles.iterdir()) == [
        "000_class207.png", "001_class0.png", "002_class88.png"]
    assert "wrote" in capsys.readouterr().out


def test_previews_are_written_per_step(coordinator, fake, tmp_path):
    previews = tmp_path / "previews"
    code = main(["generate", "--target", coordinator.address, "--class", "1", "--steps", "4",
                 "--preview-dir", str(previews), "--preview-every", "2",
                 "--out", str(tmp_path / "o.png")])
    assert code == 0
    assert sorted(p.name for p in previews.iterdir()) == ["step_0002.png", "step_0004.png"]
    assert fake.requests[0].preview_every == 2 and fake.requests[0].preview_mode == 1


def test_jpeg_from_extension(coordinator, fake, tmp_path):
    assert main(["generate", "--target", coordinator.address, "--class", "1",
                 "--out", str(tmp_path / "o.jpg")]) == 0
    assert fake.requests[0].image_format == 2  # IMAGE_FORMAT_JPEG


def test_unknown_class_is_one_line_exit_2(coordinator, fake, tmp_path, capsys):
    code = main(["generate", "--target", coordinator.address, "--class", "golden retreiver",
                 "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("ditserve generate: unknown class name 'golden retreiver'")
    assert "'golden retriever' (207)" in err and fake.generate_calls == 0


def test_unreachable_server_is_one_line_exit_2(capsys, tmp_path):
    code = main(["generate", "--target", "127.0.0.1:1", "--class", "1", "--timeout", "5",
                 "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "UNAVAILABLE" in err and "127.0.0.1:1" in err


def test_info(coordinator, fake, capsys):
    assert main(["info", "--target", coordinator.address]) == 0
    out = capsys.readouterr().out
    assert "DiT-Tiny/2" in out and "1000: tench, goldfish" in out
    assert "ddpm (250 steps), ddim (50 steps)" in out and "decoder   yes" in out
    assert "stage 0: blocks 0..1 of 4" in out and "NOT SERVING" in out


def test_progress_bar_redraws_in_place_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    stream = Terminal()
    bar = ProgressBar(stream, width=10)
    for step in range(1, 5):
        bar.update(step, 4, 0.1 * step, 0.1 * (4 - step))
    bar.finish()
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n") and "[##########] 100%" in text
