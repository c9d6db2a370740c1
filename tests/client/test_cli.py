"""`ditserve generate` / `ditserve info` against the fake coordinator, in-process."""

from __future__ import annotations

import argparse
import io

import numpy as np
import pytest
from conftest import find_free_port  # the shared tests/conftest.py
from ditserve.cli import main
from ditserve_client.grid import CAPTION_HEIGHT, PADDING
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


def caption_strip(grid: Image.Image, column: int, row: int) -> np.ndarray:
    """The caption pixels under the image at (column, row) of a captioned grid."""
    left = PADDING + column * (IMAGE_SIDE + PADDING)
    top = PADDING + row * (IMAGE_SIDE + PADDING + CAPTION_HEIGHT) + IMAGE_SIDE
    return np.asarray(grid)[top:top + CAPTION_HEIGHT, left:left + IMAGE_SIDE]


def test_several_classes_make_a_captioned_grid_and_singles(coordinator, fake, tmp_path,
                                                           capsys):
    out, singles = tmp_path / "grid.png", tmp_path / "singles"
    code = main(["generate", "--target", coordinator.address, "--class", "207", "--class",
                 "tench", "--class", "207", "--out", str(out), "--out-dir", str(singles)])
    assert code == 0
    grid = Image.open(out)
    # 2x2 with 2-px gaps, each image with a caption line under it
    assert grid.size == (2 * IMAGE_SIDE + 6, 2 * (IMAGE_SIDE + CAPTION_HEIGHT) + 6)
    assert grid.getpixel((2, 2))[0] == 207 and grid.getpixel((IMAGE_SIDE + 4, 2))[0] == 0
    dog, fish, dog_again = (caption_strip(grid, 0, 0), caption_strip(grid, 1, 0),
                            caption_strip(grid, 0, 1))
    assert dog.max() > 128 and fish.max() > 128  # light text under each image
    assert np.array_equal(dog, dog_again) and not np.array_equal(dog, fish)  # its class's name
    assert sorted(p.name for p in singles.iterdir()) == [
        "000_class207.png", "001_class0.png", "002_class207.png"]
    assert "wrote" in capsys.readouterr().out


def test_previews_are_written_per_step_as_help_says(coordinator, fake, tmp_path, capsys):
    previews, grids = tmp_path / "previews", tmp_path / "grids"
    code = main(["generate", "--target", coordinator.address, "--class", "1", "--steps", "4",
                 "--preview-dir", str(previews), "--preview-every", "2",
                 "--out", str(tmp_path / "o.png")])
    assert code == 0
    assert sorted(p.name for p in previews.iterdir()) == ["step_0002.jpg", "step_0004.jpg"]
    assert Image.open(previews / "step_0002.jpg").format == "JPEG"
    assert fake.requests[0].preview_every == 2 and fake.requests[0].preview_mode == 1
    assert main(["generate", "--target", coordinator.address, "--class", "1", "--class", "2",
                 "--steps", "1", "--preview-dir", str(grids), "--out", str(tmp_path / "g.png")]) == 0
    assert Image.open(grids / "step_0001.jpg").format == "JPEG"  # a grid of both, same name
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    assert "step_XXXX.EXT" in capsys.readouterr().out.replace("\n", " ")


@pytest.mark.parametrize("out, fmt", [("o.jpg", 2), ("o.JPEG", 2), ("o.webp", 3), ("o.png", 1)])
def test_out_extension_picks_the_format(coordinator, fake, tmp_path, out, fmt):
    assert main(["generate", "--target", coordinator.address, "--class", "1",
                 "--out", str(tmp_path / out)]) == 0
    assert fake.requests[0].image_format == fmt


@pytest.mark.parametrize("args, message", [
    (["--out", "foo.gif"], "--out foo.gif: unknown image extension .gif; use .png, .jpg"),
    (["--out", "noext"], "unknown image extension (none)"),
    (["--out", "/nonexistent/x.png"], "--out /nonexistent/x.png: folder /nonexistent does not "
                                      "exist"),
    (["--out", "o.png", "--format", "jpeg"], "--format jpeg does not match --out o.png"),
    (["--latents-out", "/nonexistent/x.npy", "--no-images"], "folder /nonexistent"),
    (["--target", "127.0.0.1:99999"], "target 127.0.0.1:99999: port 99999 is outside"),
    (["--guidance", "1e38"], "guidance scale must be in 1..10000"),
])
def test_bad_outputs_and_options_fail_before_generating(coordinator, fake, tmp_path, capsys,
                                                       monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--target", coordinator.address, "--class", "1", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert fake.generate_calls == 0 and not list(tmp_path.iterdir())


def test_out_folder_is_refused(coordinator, fake, tmp_path, capsys):
    (tmp_path / "d.png").mkdir()
    assert main(["generate", "--target", coordinator.address, "--class", "1",
                 "--out", str(tmp_path / "d.png")]) == 2
    assert "is a folder" in capsys.readouterr().err and fake.generate_calls == 0


@pytest.mark.parametrize("flag", ["--steps", "--preview-every"])
def test_zero_is_refused_not_a_hidden_default(coordinator, fake, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--target", coordinator.address, "--class", "1", flag, "0"])
    assert exit_.value.code == 2 and f"argument {flag}: must be at least 1, got 0" in \
        capsys.readouterr().err
    assert fake.generate_calls == 0


def test_unset_flags_leave_the_server_defaults(coordinator, fake, tmp_path):
    assert main(["generate", "--target", coordinator.address, "--class", "1",
                 "--out", str(tmp_path / "o.png")]) == 0
    request = fake.requests[0]
    assert (request.num_steps, request.sampler, request.guidance_channels,
            request.image_quality) == (0, 0, 0, 0)
    assert not request.HasField("guidance_scale")


def test_mistyped_flag_shows_the_subcommands_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--class", "1", "--guidnace", "4"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("usage: ditserve generate ")
    assert "unrecognized arguments: --guidnace 4 (did you mean --guidance?)" in err


def test_version(capsys):
    from ditserve import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"ditserve {__version__}"


def test_every_option_of_every_subcommand_has_help():
    from ditserve.cli import _parser

    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.option_strings[0]}"
               for name, sub in commands.choices.items() for action in sub._actions
               if action.option_strings and not action.help]
    assert missing == []


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
    target = f"127.0.0.1:{find_free_port()}"  # nothing listens (port 1 may, for root)
    code = main(["generate", "--target", target, "--class", "1", "--timeout", "5",
                 "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "UNAVAILABLE" in err and target in err


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


def test_the_cli_saves_the_latents_when_the_images_are_missing(coordinator, fake, tmp_path,
                                                               capsys):
    from .test_client import DECODER_DOWN
    fake.configure(**DECODER_DOWN)
    out, latents = tmp_path / "x.png", tmp_path / "x.npy"
    code = main(["generate", "--target", coordinator.address, "--class", "1", "--class", "2",
                 "--out", str(out), "--latents-out", str(latents)])
    assert code != 0 and not out.exists()
    assert np.load(latents).shape == (2, 4, 2, 2)  # what was computed is on disk
    captured = capsys.readouterr()
    assert f"wrote {latents}" in captured.out
    error_lines = [line for line in captured.err.splitlines() if "images are missing" in line]
    assert len(error_lines) == 1 and "Traceback" not in captured.err


def test_the_cli_says_what_a_stalled_request_waits_on(coordinator, fake, tmp_path, capsys):
    fake.configure(waiting_after=1)
    assert main(["generate", "--target", coordinator.address, "--class", "1",
                 "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "waiting on the stage chain for 6 s: stage 1 at 127.0.0.1:1 is unavailable" in err
