"""The package as pip builds and installs it: its packages, data, console scripts, dependencies and shipped bundle.

The wheel is built offline from a copy of the build inputs (``pip wheel --no-deps --no-build-isolation``, so
nothing is downloaded and the checkout gets no build/ or egg-info litter), then installed with ``--no-deps`` into
a folder that is put first on PYTHONPATH, and its console scripts are run from another directory: the
dependencies come from the test environment, everything capdemo comes from the wheel.
"""

from __future__ import annotations

import configparser
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SHAPES = ROOT / "weights" / "shapes"
# What the build reads: pyproject.toml names nothing else.
BUILD_INPUTS = ("pyproject.toml", "requirements.txt", "README.md", "capdemo", "training", "weights/shapes")
INSTALLED_BUNDLE = "capdemo/bundled_weights/shapes"  # where pyproject.toml maps weights/shapes in the wheel
SCRIPTS = {"capdemo": "capdemo.__main__:main", "capdemo-train": "training.__main__:main"}


def _python_packages(top: str) -> set[str]:
    """Dotted names of every folder under ``top`` that holds Python files."""
    return {path.parent.relative_to(ROOT).as_posix().replace("/", ".")
            for path in (ROOT / top).rglob("*.py") if "__pycache__" not in path.parts}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("CAPDEMO_WEIGHTS", "PYTHONPATH")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", **extra}


def test_every_python_package_is_declared():
    declared = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert _python_packages("capdemo") | _python_packages("training") <= declared


def test_dependencies_are_the_requirements_pins():
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"]
    assert dynamic == {"file": ["requirements.txt"]}
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert all("==" in pin for pin in pins) and {"torch==2.13.0", "torchvision==0.28.0"} <= set(pins)


def test_default_bundle_prefers_the_environment_then_the_checkout(monkeypatch, tmp_path):
    from capdemo import weights

    monkeypatch.setenv("CAPDEMO_WEIGHTS", "hf-hub:org/name@abc123")
    assert weights.default_bundle() == "hf-hub:org/name@abc123"
    monkeypatch.delenv("CAPDEMO_WEIGHTS")
    assert weights.default_bundle() == str(SHAPES)  # running from the checkout
    installed = tmp_path / "site" / INSTALLED_BUNDLE
    installed.mkdir(parents=True)
    (installed / "bundle.json").write_text("{}")
    monkeypatch.setattr(weights, "_DEFAULT_BUNDLE_DIRS", (tmp_path / "checkout" / "weights" / "shapes", installed))
    assert weights.default_bundle() == str(installed)
    (installed / "bundle.json").unlink()
    with pytest.raises(weights.WeightsUnavailableError) as missing:
        weights.default_bundle()
    message = str(missing.value)
    assert "\n" not in message and "--weights" in message and "CAPDEMO_WEIGHTS" in message


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    source, dist = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in BUILD_INPUTS:
        target = source / name
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / name, target)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(dist), str(source)], check=True, capture_output=True, text=True)
    (built,) = dist.glob("capdemo-*.whl")
    return built


@pytest.mark.slow
def test_wheel_holds_the_code_the_data_and_the_shapes_bundle(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        code = {path.relative_to(ROOT).as_posix() for top in ("capdemo", "training")
                for path in (ROOT / top).rglob("*.py") if "__pycache__" not in path.parts}
        assert code <= names
        assert {"training/data/openvqa_answer_dict.json", "training/data/README.md"} <= names
        recipes = {path.relative_to(ROOT).as_posix() for path in (ROOT / "training" / "recipes").glob("*.toml")}
        assert recipes and recipes <= names  # `reproduce` reads them from the installed package
        assert not {name for name in names if name.split("/")[0] in ("tests", "weights", "benchmarks")}

        manifest = json.loads(archive.read(f"{INSTALLED_BUNDLE}/bundle.json"))
        assert manifest == json.loads((SHAPES / "bundle.json").read_text())
        for rel, entry in manifest["files"].items():  # byte-identical, so the installed copy verifies
            assert _sha256(archive.read(f"{INSTALLED_BUNDLE}/{rel}")) == entry["sha256"], rel

        dist_info = next(name.split("/")[0] for name in names if name.endswith(".dist-info/METADATA"))
        entry_points = configparser.ConfigParser()
        entry_points.read_string(archive.read(f"{dist_info}/entry_points.txt").decode())
        assert dict(entry_points["console_scripts"]) == SCRIPTS
        metadata = Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())

    import capdemo

    assert metadata["Version"] == capdemo.__version__
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    requires = metadata.get_all("Requires-Dist")
    assert [r for r in requires if "extra ==" not in r] == pins
    assert "tensorboard" in metadata.get_all("Provides-Extra")
    assert any(r.startswith("tensorboard==") and 'extra == "tensorboard"' in r for r in requires)


@pytest.mark.slow
def test_installed_package_runs_from_elsewhere_with_its_own_bundle(wheel, tmp_path):
    """Console scripts and ``import capdemo`` from the wheel, outside the checkout; its bundle verifies and captions."""
    target, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True)
    env = _clean_env(PYTHONPATH=str(target))

    def run(*command: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    located = run(sys.executable, "-c",
                  "import capdemo, training; from capdemo.weights import default_bundle; "
                  "print(capdemo.__file__); print(training.__file__); print(default_bundle())")
    assert located.returncode == 0, located.stderr
    capdemo_file, training_file, bundle = located.stdout.split()
    assert Path(capdemo_file).is_relative_to(target) and Path(training_file).is_relative_to(target)
    assert Path(bundle) == target / INSTALLED_BUNDLE

    for script in SCRIPTS:
        shown = run(str(target / "bin" / script), "--help")
        assert shown.returncode == 0 and "usage" in shown.stdout.lower(), shown.stderr

    example = sorted((SHAPES / "examples").glob("*.png"))[0]
    captioned = run(str(target / "bin" / "capdemo"), "caption", str(example), "--json", "--method", "tomcap")
    assert captioned.returncode == 0, captioned.stderr
    result = json.loads(captioned.stdout)
    assert result["image"] == str(example) and result["caption"].strip()
    assert result["candidates"][0]["text"] == result["caption"]
