"""The `ditserve` command: a user's mistake (any UserError: configuration, checkpoint,
start-up, command) is one line and exit 2; a bug is never swallowed as one."""

from __future__ import annotations

import pytest
from ditserve import cli
from ditserve.common.status import UserError
from ditserve.config import ConfigError
from ditserve.entrypoints import convert


def _convert_raising(monkeypatch, error: Exception) -> None:
    def run(args):
        raise error
    monkeypatch.setattr(convert, "run", run)


@pytest.mark.parametrize("error", [ConfigError("coordinator.default_sampler must be one of"),
                                   cli.CommandError("--out must end in .safetensors")])
def test_a_user_error_is_one_line_and_exit_2(monkeypatch, capsys, error):
    _convert_raising(monkeypatch, error)
    assert cli.main(["convert", "in.pt", "--out", "out.safetensors"]) == 2
    assert capsys.readouterr().err == f"ditserve convert: {error}\n"


def test_a_bug_raising_value_error_is_not_taken_for_a_user_error(monkeypatch):
    _convert_raising(monkeypatch, ValueError("an internal invariant broke"))
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["convert", "in.pt", "--out", "out.safetensors"])


@pytest.mark.parametrize(("argv", "words"), [
    (["--stage", "0", "--stages", "20"], "stages must be between 1 and the model depth 4"),
    (["--stage", "0", "--stages", "2", "--blocks", "3:1"], "0 <= START < END"),
])
def test_stage_arguments_that_do_not_fit_the_model_are_user_errors(tiny_checkpoint, capsys,
                                                                     argv, words):
    args = ["stage", "--checkpoint", str(tiny_checkpoint), "--listen", "127.0.0.1:1", *argv]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err, err


def test_missing_checkpoint_is_a_user_error(tmp_path, capsys):
    assert cli.main(["stage", "--checkpoint", str(tmp_path / "none.pt"), "--stage", "0",
                     "--stages", "1", "--listen", "127.0.0.1:1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert issubclass(cli.CommandError, UserError)


def test_an_unknown_model_config_name_is_a_user_error(tiny_model, tmp_path, capsys):
    import torch

    official = tmp_path / "official.pt"  # a raw state dict: the name is read, not recorded
    torch.save(tiny_model.state_dict(), official)
    assert cli.main(["inspect", str(official), "--model", "DiT-XXL/2"]) == 2
    assert "unknown model config 'DiT-XXL/2'" in capsys.readouterr().err
