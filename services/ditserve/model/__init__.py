"""The DiT model, its named configs, checkpoint formats and stage slicing."""

from .checkpoint import (
    CheckpointError,
    build,
    convert,
    load_dit,
    load_stage,
    open_checkpoint,
    save_ditserve,
)
from .configs import DIT_CONFIGS, DiTConfig, dit_config
from .dit import DiT
from .partition import parse_block_range, split_blocks, stage_block_range

__all__ = ["DIT_CONFIGS", "CheckpointError", "DiT", "DiTConfig", "build", "convert",
           "dit_config", "load_dit", "load_stage", "open_checkpoint", "parse_block_range", "save_ditserve",
           "split_blocks", "stage_block_range"]
