"""The README's first examples run as written: on the demo model's classes, and the ImageNet
ones beside `--checkpoint`. Run against the fake coordinator with the demo's class names."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from ditserve.cli import main
from ditserve.demo import DEMO_CLASS_NAMES

README = Path(__file__).resolve().parents[2] / "README.md"


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Each `ditserve ...` line of a shell block (continuations joined, comments dropped)."""
    joined = block.replace("\\\n", " ")
    lines = [shlex.split(line, comments=True) for line in joined.splitlines()]
    return [words[1:] for words in lines if words and words[0].endswith("ditserve")]


def run_generate(argv: list[str], address: str) -> int:
    """`ditserve generate ...` with --target moved to the fake."""
    argv = [word for i, word in enumerate(argv)
            if word != "--target" and (i == 0 or argv[i - 1] != "--target")]
    return main([*argv, "--target", address])


def test_the_first_cli_example_works_on_the_demo_model(coordinator, fake, tmp_path,
                                                      monkeypatch):
    fake.configure(class_names=DEMO_CLASS_NAMES, num_classes=10)
    monkeypatch.chdir(tmp_path)
    first = next(c for block in code_blocks("sh") for c in commands(block) if c[0] == "generate")
    assert "--checkpoint" not in " ".join(first)
    assert run_generate(first, coordinator.address) == 0
    assert all(0 <= label < 10 for label in fake.requests[0].class_labels)


def test_imagenet_examples_stand_beside_a_checkpoint(coordinator, fake, tmp_path, monkeypatch):
    fake.configure()  # 1000 classes, ImageNet's names
    monkeypatch.chdir(tmp_path)
    for block in code_blocks("sh"):
        for command in commands(block):
            if command[0] == "generate" and "207" in command:
                assert any("--checkpoint" in c for c in commands(block)), block
                assert run_generate(command, coordinator.address) == 0
    assert [list(r.class_labels) for r in fake.requests] == [[207, 207, 281]]


def test_the_sdk_snippet_works_on_the_demo_model(coordinator, fake, tmp_path, monkeypatch):
    fake.configure(class_names=DEMO_CLASS_NAMES, num_classes=10)
    monkeypatch.chdir(tmp_path)
    snippet = next(b for b in code_blocks("python") if "Client(" in b)
    exec(snippet.replace("127.0.0.1:50050", coordinator.address), {})
    assert list(fake.requests[0].class_labels) == [0, 1]
    assert list(tmp_path.iterdir())  # it saved its image
