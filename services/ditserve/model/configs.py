"""The named DiT configurations of the paper (Table 1), plus tiny ones for tests."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DiTConfig:
    """Shape of a DiT; the fields and defaults of the reference `DiT.__init__`."""

    input_size: int = 32
    """Latent side (image side / 8): 32 for 256 px, 64 for 512 px."""
    patch_size: int = 2
    """Side of a patch in latent pixels; tokens = (input_size / patch_size) ** 2."""
    in_channels: int = 4
    """Latent channels."""
    hidden_size: int = 1152
    """Token width D."""
    depth: int = 28
    """Number of DiT blocks."""
    num_heads: int = 16
    """Attention heads; hidden_size must divide by it."""
    mlp_ratio: float = 4.0
    """MLP hidden width / hidden_size."""
    class_dropout_prob: float = 0.1
    """Training label dropout; > 0 adds the null class used by guidance."""
    num_classes: int = 1000
    """Class labels 0..num_classes-1; the null class is num_classes."""
    learn_sigma: bool = True
    """Whether the output has 2C channels: eps then the variance interpolation v."""
    name: str = ""
    """Config name such as "DiT-XL/2" (informational)."""

    def __post_init__(self) -> None:
        for field in ("input_size", "patch_size", "in_channels", "hidden_size", "depth",
                      "num_heads", "num_classes"):
            if getattr(self, field) < 1:
                raise ValueError(f"DiT config: {field} must be positive, got {getattr(self, field)}")
        if self.input_size % self.patch_size:
            raise ValueError(f"DiT config: input_size {self.input_size} is not a multiple of "
                             f"patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"DiT config: hidden_size {self.hidden_size} does not divide into "
                             f"{self.num_heads} heads")
        if self.hidden_size % 4:
            raise ValueError("DiT config: hidden_size must be a multiple of 4 (2-D sin-cos embedding)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    @property
    def has_null_class(self) -> bool:
        return self.class_dropout_prob > 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"DiT config: unknown fields {sorted(unknown)}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> DiTConfig:
        return cls.from_dict(json.loads(text))


# (depth, hidden_size, num_heads) of each size, as the reference's DiT_models.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# Tiny sizes for tests and the embedded demo model.
_TEST_SIZES = {"Tiny": (4, 64, 4), "Mini": (6, 192, 6)}


def _registry() -> dict[str, dict[str, Any]]:
    sizes = {**_SIZES, **_TEST_SIZES}
    return {f"DiT-{size}/{patch}": {"depth": d, "hidden_size": h, "num_heads": n,
                                    "patch_size": patch}
            for size, (d, h, n) in sizes.items() for patch in (2, 4, 8)}


DIT_CONFIGS: dict[str, dict[str, Any]] = _registry()
"""Config name → shape fields, e.g. "DiT-XL/2"; input size and classes are set per use."""


def dit_config(name: str, **overrides: Any) -> DiTConfig:
    """The named config (e.g. "DiT-XL/2"), with fields such as input_size overridden."""
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; known: {', '.join(DIT_CONFIGS)}")
    return DiTConfig(**{**DIT_CONFIGS[name], "name": name, **overrides})


def heads_for(depth: int, hidden_size: int, patch_size: int) -> tuple[str, int] | None:
    """The named config with this depth and width, if any: (name, num_heads)."""
    for name, fields in DIT_CONFIGS.items():
        if (fields["depth"], fields["hidden_size"], fields["patch_size"]) == (
                depth, hidden_size, patch_size):
            return name, fields["num_heads"]
    return None
