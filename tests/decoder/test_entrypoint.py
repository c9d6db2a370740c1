"""`ditserve decoder` flags and config file → the server's settings."""

from __future__ import annotations

import argparse

import pytest
from ditserve.entrypoints import decoder as entrypoint


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    entrypoint.add_arguments(parser)
    return parser.parse_args(argv)


def test_flags(tiny_vae_dir):
    config = entrypoint.server_config(parse("--vae", str(tiny_vae_dir), "--listen",
                                            "127.0.0.1:7001", "--max-batch", "3"))
    assert (config.vae, config.listen, config.max_batch_size, config.device) == (
        str(tiny_vae_dir), "127.0.0.1:7001", 3, "cpu")


def test_config_file_with_flag_overrides(tmp_path, tiny_vae_dir, monkeypatch):
    monkeypatch.delenv("DITSERVE_CONFIG", raising=False)
    path = tmp_path / "pipeline.yaml"
    path.write_text("stages: [{address: 127.0.0.1:7002}]\n"
                    f"decoder: {{address: 'decoder:7003', vae: '{tiny_vae_dir}', "
                    "max_batch_size: 2}\n")
    config = entrypoint.server_config(parse("--config", str(path)))
    assert (config.listen, config.max_batch_size, config.vae) == ("[::]:7003", 2,
                                                                   str(tiny_vae_dir))
    assert entrypoint.server_config(parse("--config", str(path), "--max-batch", "5")
                                    ).max_batch_size == 5


@pytest.mark.parametrize("argv, message", [
    (("--vae", "/nonexistent"), "has no config.json"),
    (("--max-batch", "0"), "--max-batch must be positive"),
])
def test_bad_settings(tiny_vae_dir, argv, message):
    args = parse(*argv) if argv[0] == "--vae" else parse("--vae", str(tiny_vae_dir), *argv)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        entrypoint.server_config(args)
