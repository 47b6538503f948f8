"""Packaging: the wheel and sdist build offline, pass ``twine check``, carry the licence, the
version and ``py.typed``, and hold the library only (the research code runs from a clone)."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import topkast_jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "topkast_jax")


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> str:
    """Build sdist + wheel from a copy of the sources (no network: ``--no-isolation``)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
        check=True,
        capture_output=True,
    )
    return str(out)


def _one(dist: str, suffix: str) -> str:
    (name,) = [n for n in os.listdir(dist) if n.endswith(suffix)]
    return os.path.join(dist, name)


def test_licence_file_is_apache_2():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text


def test_wheel_holds_the_library_typed_and_licensed(dist):
    with zipfile.ZipFile(_one(dist, ".whl")) as whl:
        names = whl.namelist()
        info = f"topkast_jax-{topkast_jax.__version__}.dist-info"
        meta = email.parser.Parser().parsestr(whl.read(f"{info}/METADATA").decode())
    assert "topkast_jax/py.typed" in names
    assert "topkast_jax/__init__.py" in names and "topkast_jax/baselines/__init__.py" in names
    assert any(n.startswith(info) and n.endswith("LICENSE") for n in names)
    tops = {n.split("/")[0] for n in names}
    assert tops == {"topkast_jax", info}, "experiments/configs run from a clone (README)"
    assert meta["Name"] == "topkast-jax"
    assert meta["Version"] == topkast_jax.__version__  # one version source
    assert meta["Requires-Python"] == ">=3.11"
    assert "License :: OSI Approved :: Apache Software License" in meta.get_all("Classifier")
    assert "Typing :: Typed" in meta.get_all("Classifier")
    extras = set(meta.get_all("Provides-Extra"))
    assert {"flax", "experiments", "test"} <= extras


def test_sdist_holds_licence_and_metadata(dist):
    with tarfile.open(_one(dist, ".tar.gz")) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"LICENSE", "pyproject.toml", "README.md", "topkast_jax/py.typed"} <= names


def test_twine_check_passes(dist):
    files = [os.path.join(dist, n) for n in sorted(os.listdir(dist))]
    result = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *files],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
