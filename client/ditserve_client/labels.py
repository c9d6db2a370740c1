"""Class names ↔ ids: "golden retriever" or "207" → 207.

1000-class models use the ImageNet-1k names (`imagenet_classes.txt`: torchvision's list,
in which the two names it repeats are told apart as "crane bird" (134) / "crane" (517) and
"maillot" (638) / "maillot tank suit" (639)); other models use the names the server
reports in GetModelInfo. Matching is exact first, then case-insensitive; unknown names fail
with the closest known ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import cache
from importlib import resources

IMAGENET_NUM_CLASSES = 1000


class UnknownClassError(ValueError):
    """A class label that names no class of the served model."""


@cache
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, by id."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text("utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    if len(names) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(f"imagenet_classes.txt holds {len(names)} names, not 1000")
    return names


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


class ClassNames:
    """The classes of one model: names by id when known, else just how many there are."""

    def __init__(self, names: Sequence[str] = (), num_classes: int | None = None):
        self.names = tuple(names)
        self.num_classes = num_classes if num_classes is not None else (len(names) or None)
        self._folded: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            self._folded.setdefault(_key(name), []).append(i)

    @classmethod
    def for_model(cls, names: Sequence[str], num_classes: int | None) -> ClassNames:
        """The server's names when it has them; ImageNet's for a 1000-class model."""
        if names:
            return cls(names, num_classes)
        if num_classes == IMAGENET_NUM_CLASSES:
            return cls(imagenet_class_names())
        return cls((), num_classes)

    def name(self, class_id: int) -> str:
        """The class's name, or its id as text when names are unknown."""
        return self.names[class_id] if 0 <= class_id < len(self.names) else str(class_id)

    def resolve(self, label: int | str) -> int:
        """An id or a name (any case) → the class id; UnknownClassError otherwise."""
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise UnknownClassError(f"class label must be an id or a name, got {label!r}")
        if isinstance(label, str) and label.strip().lstrip("-").isdigit():
            label = int(label.strip())
        if isinstance(label, int):
            return self._check_id(label)
        return self._lookup(label.strip())

    def resolve_all(self, labels: Sequence[int | str]) -> list[int]:
        return [self.resolve(label) for label in labels]

    def _check_id(self, class_id: int) -> int:
        if class_id < 0 or (self.num_classes is not None and class_id >= self.num_classes):
            known = f"0..{self.num_classes - 1}" if self.num_classes else "non-negative"
            raise UnknownClassError(f"class id {class_id} is out of range ({known})")
        return class_id

    def _lookup(self, name: str) -> int:
        if name in self.names and self.names.count(name) == 1:
            return self.names.index(name)
        ids = self._folded.get(_key(name), [])
        if len(ids) == 1:
            return ids[0]
        if len(ids) > 1:
            options = " or ".join(f"{i} ({self.names[i]})" for i in ids)
            raise UnknownClassError(f"class name {name!r} is ambiguous: {options}; give the id")
        raise UnknownClassError(self._unknown_message(name))

    def _unknown_message(self, name: str) -> str:
        if not self.names:
            return (f"class name {name!r}: the server reports no class names; "
                    f"give class ids (0..{(self.num_classes or 1) - 1})")
        key = _key(name)
        close = difflib.get_close_matches(key, list(self._folded), n=5, cutoff=0.6)
        close += [k for k in self._folded if key in k and k not in close][: 5 - len(close)]
        if not close:
            return f"unknown class name {name!r} (no close match; give a class id)"
        hints = ", ".join(f"{self.names[self._folded[k][0]]!r} ({self._folded[k][0]})"
                          for k in close)
        return f"unknown class name {name!r}; close matches: {hints}"
