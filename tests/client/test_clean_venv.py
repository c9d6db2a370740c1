"""The client-only install: a fresh virtualenv holding only the client's dependencies
(grpcio, grpcio-status, protobuf, Pillow and what they need) imports ditserve_client without
torch and runs `ditserve generate` / `ditserve info` against a server.

Offline and fast: the venv is made with `--without-pip` and the dependency distributions
are linked in from this environment (exactly their files, per their RECORD), the repo's
`client/` and `services/` on a .pth path instead of `pip install --no-deps .`. The server
is the fake coordinator; the end-to-end run against `ditserve up` is another test.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CLIENT_DISTRIBUTIONS = ["grpcio", "grpcio-status", "protobuf", "googleapis-common-protos",
                        "typing-extensions", "pillow"]


def test_the_distributions_linked_are_the_base_dependencies():
    """The clean venv holds what `pip install .` installs, no more and no less."""
    import re
    import tomllib

    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    base = {re.split(r"[<>=!~ ;\[]", r, maxsplit=1)[0].lower() for r in requires}
    linked = {name.lower() for name in CLIENT_DISTRIBUTIONS}
    assert base <= linked and "pillow" in base, base  # the rest: what grpcio-status needs


def _top_level(parts: tuple[str, ...]) -> str | None:
    """The entry a file belongs under: `grpc`, `google/protobuf`, `x.dist-info`, ..."""
    if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith(".pth"):
        return None
    return "/".join(parts[:2]) if parts[0] == "google" and len(parts) > 2 else parts[0]


def link_distributions(target: Path, names: list[str]) -> None:
    """Symlinks exactly the top-level entries of the named distributions into `target`."""
    (target / "google").mkdir(parents=True)
    for name in names:
        dist = importlib.metadata.distribution(name)
        for top in sorted({_top_level(f.parts) for f in dist.files or []} - {None}):
            link = target / top
            if not link.exists():
                link.symlink_to(Path(dist.locate_file(top)).resolve())


@pytest.fixture(scope="module")
def clean_python(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("client-only")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True)
    link_distributions(root / "deps", CLIENT_DISTRIBUTIONS)
    site = next((root / "venv" / "lib").glob("python*/site-packages"))
    (site / "ditserve.pth").write_text(
        "\n".join(str(p) for p in (root / "deps", REPO / "client", REPO / "services")) + "\n")
    return root / "venv" / "bin" / "python"


DITSERVE = ("-c", "import sys; from ditserve.cli import main; sys.exit(main(sys.argv[1:]))")
"""The `ditserve` console script's entry point, run by the clean interpreter."""


def run_clean(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(cwd), "PYTHONNOUSERSITE": "1"}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_imports_without_torch(clean_python, tmp_path):
    probe = ("import importlib.util, sys\n"
             "import ditserve_client, ditserve_client.cli, ditserve.cli\n"
             "assert 'torch' not in sys.modules and 'numpy' not in sys.modules\n"
             "for heavy in ('torch', 'numpy'):\n"
             "    assert importlib.util.find_spec(heavy) is None, heavy\n"
             "print('clean')\n")
    done = run_clean(clean_python, "-c", probe, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "clean", done.stderr


def test_generate_and_info_from_the_client_only_install(clean_python, coordinator, tmp_path):
    coordinator.fake.configure()
    done = run_clean(clean_python, *DITSERVE, "generate", "--target",
                     coordinator.address, "--class", "golden retriever", "--seed", "0",
                     "--steps", "3", "--out", "out.png", "--latents-out", "x.npy", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert Image.open(tmp_path / "out.png").format == "PNG"
    assert np.load(tmp_path / "x.npy").shape == (1, 4, 2, 2)
    assert list(coordinator.fake.requests[0].class_labels) == [207]
    info = run_clean(clean_python, *DITSERVE, "info", "--target",
                     coordinator.address, cwd=tmp_path)
    assert info.returncode == 0 and "DiT-Tiny/2" in info.stdout, info.stderr


def test_the_client_only_install_writes_a_grid_of_several(clean_python, coordinator, tmp_path):
    coordinator.fake.configure()
    done = run_clean(clean_python, *DITSERVE, "generate", "--target",
                     coordinator.address, "--class", "0", "--class", "1", "--out", "g.png",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    grid = Image.open(tmp_path / "g.png")
    assert grid.format == "PNG"
    assert (grid.getpixel((2, 2))[0], grid.getpixel((grid.width - 3, 2))[0]) == (0, 1)


def test_pyproject_builds_without_deprecation_warnings(tmp_path):
    """setuptools reads pyproject.toml as `pip install .` does, warning about nothing
    (a license table printed "project.license as a TOML table is deprecated")."""
    probe = ("import sys, warnings\n"
             "from setuptools.dist import Distribution\n"
             "from setuptools.config.pyprojecttoml import apply_configuration\n"
             "with warnings.catch_warnings(record=True) as caught:\n"
             "    warnings.simplefilter('always')\n"
             "    dist = apply_configuration(Distribution(), 'pyproject.toml')\n"
             "print(dist.metadata.license_expression)\n"
             "print([str(w.message).splitlines()[0] for w in caught])\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["Apache-2.0", "[]"], done.stdout
