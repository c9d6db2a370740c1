"""Class names ↔ ids: the embedded ImageNet list, matching rules and error messages."""

from __future__ import annotations

import pytest
from ditserve_client import ClassNames, UnknownClassError, imagenet_class_names


def test_imagenet_list_is_the_standard_order():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    known = {0: "tench", 1: "goldfish", 88: "macaw", 207: "golden retriever",
             279: "Arctic fox", 360: "otter", 388: "giant panda", 417: "balloon",
             812: "space shuttle", 933: "cheeseburger", 980: "volcano", 999: "toilet tissue"}
    assert {i: names[i] for i in known} == known


@pytest.fixture(scope="module")
def imagenet() -> ClassNames:
    return ClassNames.for_model([], 1000)


@pytest.mark.parametrize("label, expected", [
    ("golden retriever", 207), ("GOLDEN  Retriever", 207), ("golden_retriever", 207),
    ("207", 207), (" 207 ", 207), (207, 207), ("Cardigan", 264), ("cardigan", 474),
    ("crane", 517), ("crane bird", 134),
    # every synonym of the synset (WordNet lemmas), not only torchvision's first name:
    ("tabby cat", 281), ("Tabby", 281), ("tank suit", 639), ("maillot", 638),
    ("Tinca tinca", 0), ("man-eater", 2), ("great white shark", 2), ("crayfish", 124),
])
def test_resolve(imagenet, label, expected):
    assert imagenet.resolve(label) == expected


@pytest.mark.parametrize("label, message", [
    ("golden retreiver", r"close matches: 'golden retriever' \(207\)"),
    ("CARDIGAN", r"ambiguous: 264 \(Cardigan\) or 474 \(cardigan\)"),
    ("qwertyuiop", "no close match"),
    ("panda", r"ambiguous: 387 \(lesser panda\) or 388 \(giant panda\)"),
    ("taby cat", r"close matches: 'tabby' \(281\)"),
    (1000, r"out of range \(0..999\)"), ("-1", "out of range"),
    (True, "an id or a name"), (2.5, "an id or a name"),
])
def test_resolve_errors(imagenet, label, message):
    with pytest.raises(UnknownClassError, match=message):
        imagenet.resolve(label)


def test_every_imagenet_class_resolves_by_each_of_its_names(imagenet):
    from ditserve_client.labels import imagenet_synonyms

    classes = imagenet_synonyms()
    counts: dict[str, int] = {}
    for names in classes:
        for name in {n.casefold() for n in names}:
            counts[name] = counts.get(name, 0) + 1
    unique = 0
    for class_id, names in enumerate(classes):
        assert imagenet.resolve(names[0]) == class_id, names[0]  # its display name
        for name in names[1:]:
            if counts[name.casefold()] == 1:  # a synonym of this class only
                assert imagenet.resolve(name) == class_id, name
                unique += 1
    assert unique > 700


def test_server_reported_imagenet_names_keep_their_synonyms():
    from ditserve_client.labels import imagenet_class_names

    classes = ClassNames.for_model(list(imagenet_class_names()), 1000)
    assert classes.resolve("tabby cat") == 281


def test_a_small_model_lists_its_classes_for_an_unknown_name():
    demo = ClassNames(["red circle", "blue square"], 2)
    with pytest.raises(UnknownClassError, match=r"unknown class name 'tabby cat'; this model's "
                                                r"classes: 'red circle' \(0\), 'blue square' \(1\)"):
        demo.resolve("tabby cat")


def test_models_without_names_take_ids_only():
    classes = ClassNames.for_model([], 10)
    assert classes.resolve_all([3, "9"]) == [3, 9] and classes.name(3) == "3"
    with pytest.raises(UnknownClassError, match="reports no class names"):
        classes.resolve("cat")
