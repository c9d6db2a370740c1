"""Stage slices: chained they equal the whole model; each reads only its own tensors."""

from __future__ import annotations

import itertools

import pytest
import torch
from ditserve.model import (
    CheckpointError,
    DiT,
    dit_config,
    load_stage,
    parse_block_range,
    save_ditserve,
    split_blocks,
    stage_block_range,
)
from ditserve.model.checkpoint import DitserveReader
from numerics import FORWARD_FP32, assert_scaled_close


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A 6-block model with random non-zero weights in ditserve's file format."""
    torch.manual_seed(0)
    config = dit_config("DiT-Mini/2", input_size=8, num_classes=10)
    model = DiT(config)
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("ckpt") / "mini.safetensors"
    save_ditserve(model.state_dict().items(), config, path)
    return path, model.eval()


def _inputs(n: int = 3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([999, 500, 1][:n]),
            torch.tensor([3, 10, 7][:n]))


@pytest.mark.parametrize("ranges", [
    [(0, 6)], [(0, 3), (3, 6)], [(0, 2), (2, 4), (4, 6)], [(0, 1), (1, 5), (5, 6)],
    [(0, 2), (2, 3), (3, 4), (4, 6)], split_blocks(6, [4, 1, 1]),
])
def test_chained_slices_equal_the_whole_model(model_file, ranges):
    path, whole = model_file
    stages = [load_stage(path, r) for r in ranges]
    assert stages[0].has_embedders and stages[-1].has_final_layer
    assert not any(s.has_embedders for s in stages[1:])
    assert not any(s.has_final_layer for s in stages[:-1])
    x, t, y = _inputs()
    with torch.no_grad():
        h, c = stages[0].embed(x, t, y)
        for stage in stages:
            h = stage.run_blocks(h, c)
        out = stages[-1].head(h, c)
        assert_scaled_close(out, whole(x, t, y), FORWARD_FP32)


def test_a_stage_reads_only_its_own_bytes(model_file, monkeypatch):
    path, whole = model_file
    read: list[str] = []
    original = DitserveReader.get
    monkeypatch.setattr(DitserveReader, "get", lambda self, k: read.append(k) or original(self, k))
    middle = load_stage(path, (2, 4))
    own_bytes = sum(t.nbytes for t in middle.state_dict().values())
    total_bytes = sum(t.nbytes for t in whole.state_dict().values())
    read_bytes = sum(whole.state_dict()[k].nbytes for k in read)
    assert read_bytes == own_bytes
    assert all(k.startswith(("blocks.2.", "blocks.3.")) for k in read)
    assert own_bytes < 0.4 * total_bytes  # 2 of 6 blocks, no embedders or final layer


def test_partition_is_equal_and_covers_every_block():
    for depth in (4, 12, 28):
        for stages in range(1, min(depth, 8) + 1):
            ranges = [stage_block_range(depth, k, stages) for k in range(stages)]
            assert ranges[0][0] == 0 and ranges[-1][1] == depth
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1
    assert stage_block_range(28, 3, 4) == (21, 28)


@pytest.mark.parametrize("call, message", [
    (lambda: stage_block_range(12, 4, 4), "stage must be between 0 and 3"),
    (lambda: stage_block_range(12, 0, 13), "stages must be between 1"),
    (lambda: parse_block_range("3-5", 12), "START:END"),
    (lambda: parse_block_range("5:3", 12), "0 <= START < END"),
    (lambda: parse_block_range("0:13", 12), "depth 12"),
    (lambda: split_blocks(12, [6, 5]), "sum to depth 12"),
    (lambda: dit_config("DiT-XXL/2"), "unknown DiT config"),
])
def test_bad_partitions_say_what_is_wrong(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_stage_outside_the_model_is_refused(model_file):
    with pytest.raises(CheckpointError, match="outside the model's 6 blocks"):
        load_stage(model_file[0], (4, 8))


def test_every_paper_config_builds_with_the_papers_parameter_count():
    # Table 1/4 of the paper: parameters in millions at 256 px (latent 32).
    params = {"DiT-S/2": 33, "DiT-B/2": 130, "DiT-L/2": 458, "DiT-XL/2": 675}
    for name, millions in params.items():
        with torch.device("meta"):
            model = DiT(dit_config(name, input_size=32))
        count = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert abs(count / 1e6 - millions) / millions < 0.02, (name, count)
