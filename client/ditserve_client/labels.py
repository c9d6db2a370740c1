"""Class names ↔ ids: "golden retriever" or "207" → 207.

1000-class models use the ImageNet-1k names (`imagenet_classes.txt`, one class a line:
torchvision's name first, in which the two names it repeats are told apart as "crane bird"
(134) / "crane" (517) and "maillot" (638) / "maillot tank suit" (639), then the synset's
other WordNet lemmas, comma-separated, as timm's `imagenet_synset_to_lemma.txt` lists
them: "tabby, tabby cat"). Other models use the names the server reports in GetModelInfo.
Matching is exact first, then case-insensitive; a class's own name wins over another's
synonym; a synonym of several classes is ambiguous; unknown names fail with the closest
known ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from functools import cache
from importlib import resources

IMAGENET_NUM_CLASSES = 1000
FEW_CLASSES = 20
"""Models with at most this many classes list them all when a name is unknown."""


class UnknownClassError(ValueError):
    """A class label that names no class of the served model."""


@cache
def imagenet_synonyms() -> tuple[tuple[str, ...], ...]:
    """Every name of each ImageNet-1k class, by id: its display name first."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text("utf-8")
    classes = tuple(tuple(name.strip() for name in line.split(","))
                    for line in text.splitlines() if line.strip())
    if len(classes) != IMAGENET_NUM_CLASSES:
        raise RuntimeError(f"imagenet_classes.txt holds {len(classes)} classes, not 1000")
    return classes


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k display names, by id."""
    return tuple(names[0] for names in imagenet_synonyms())


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).casefold()


class ClassNames:
    """The classes of one model: names by id when known, else just how many there are."""

    def __init__(self, names: Sequence[str] = (), num_classes: int | None = None,
                 synonyms: Sequence[Sequence[str]] = ()):
        self.names = tuple(names)
        self.num_classes = num_classes if num_classes is not None else (len(names) or None)
        self._folded: dict[str, list[int]] = {}
        for i, name in enumerate(self.names):
            self._folded.setdefault(_key(name), []).append(i)
        self._synonyms: dict[str, list[int]] = {}  # other names, each class once
        for i, others in enumerate(synonyms):
            for key in {_key(name) for name in others} - {_key(self.names[i])}:
                self._synonyms.setdefault(key, []).append(i)

    @classmethod
    def for_model(cls, names: Sequence[str], num_classes: int | None) -> ClassNames:
        """The server's names when it has them; ImageNet's for a 1000-class model."""
        if tuple(names) == imagenet_class_names():  # the server reports ImageNet's names
            return cls(names, num_classes, imagenet_synonyms())
        if names:
            return cls(names, num_classes)
        if num_classes == IMAGENET_NUM_CLASSES:
            return cls(imagenet_class_names(), synonyms=imagenet_synonyms())
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
        ids = self._folded.get(_key(name)) or self._synonyms.get(_key(name), [])
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
        key, known = _key(name), {**self._synonyms, **self._folded}
        close = difflib.get_close_matches(key, list(known), n=5, cutoff=0.6)
        close += [k for k in self._folded if key in k and k not in close][: 5 - len(close)]
        if not close and len(self.names) <= FEW_CLASSES:  # a small model: say what it knows
            known_names = ", ".join(f"{n!r} ({i})" for i, n in enumerate(self.names))
            return f"unknown class name {name!r}; this model's classes: {known_names}"
        if not close:
            return f"unknown class name {name!r} (no close match; give a class id)"
        hints = ", ".join(f"{self.names[known[k][0]]!r} ({known[k][0]})" for k in close)
        return f"unknown class name {name!r}; close matches: {hints}"
