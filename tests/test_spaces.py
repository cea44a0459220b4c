"""Spaces rehearsal: the README front matter against the repository, and the app started as a Space starts it.

A Gradio Space installs requirements.txt on the Python of ``python_version`` next to the Gradio of
``sdk_version``, then runs ``python <app_file>`` with ``GRADIO_SERVER_NAME=0.0.0.0`` and the port in
``GRADIO_SERVER_PORT`` (``GRADIO_NUM_PORTS=1``: that port or nothing); on ZeroGPU hardware ``spaces`` is
importable and ``SPACES_ZERO_GPU=true``. The rehearsal does the same with a fake ``spaces`` package
(tests/fake_spaces) that records which functions ``spaces.GPU`` wrapped and which were called. It does not set
``SYSTEM=spaces``: that switches on Gradio's own Spaces machinery (its hot-reload watcher and auto-wrapping),
which needs the real ``spaces`` package's internals and concerns Gradio, not capdemo.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from tests.app_server import free_port

ROOT = Path(__file__).resolve().parents[1]
FAKE_SPACES = ROOT / "tests" / "fake_spaces"
STARTUP_TIMEOUT_S = 240  # a cold start of the shapes bundle takes ~10-30 s on 2 shared cores
GPU_EVENTS = {"caption", "vqa", "embedding", "batch", "datastore",  # the model-calling events, and the examples'
              "example_caption"}  # captions (an example runs the model on its first click)


def front_matter() -> dict:
    return yaml.safe_load((ROOT / "README.md").read_text(encoding="utf-8").split("---\n", 2)[1])


def test_front_matter_matches_the_repository():
    space = front_matter()
    assert space["sdk"] == "gradio"
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert space["sdk_version"] == pins["gradio"]
    python = str(space["python_version"])
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert python in SpecifierSet(requires)
    assert python == f"{sys.version_info.major}.{sys.version_info.minor}"  # the tests ran on the Space's Python
    app_file = ROOT / space["app_file"]
    assert app_file.is_file() and 'if __name__ == "__main__":' in app_file.read_text()


@pytest.fixture
def app_module(monkeypatch):
    for name in ("GRADIO_SERVER_PORT", "PORT", "GRADIO_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("app")


def test_port_comes_from_gradio_server_port_then_port(app_module, monkeypatch):
    assert app_module.port_from_environment() == 7860
    monkeypatch.setenv("PORT", "8080")
    assert app_module.port_from_environment() == 8080
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7861")
    assert app_module.port_from_environment() == 7861
    monkeypatch.setenv("GRADIO_SERVER_PORT", "http")
    with pytest.raises(SystemExit, match="GRADIO_SERVER_PORT='http' is not a port number"):
        app_module.port_from_environment()
    monkeypatch.setenv("GRADIO_SERVER_NAME", "0.0.0.0")
    assert app_module.parse_args([]).host == "0.0.0.0"


def wait_for_http_200(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"app.py exited with {process.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    raise AssertionError(f"no HTTP 200 from {url} within {timeout_s} s")


@pytest.mark.slow
def test_app_starts_as_a_zerogpu_space_starts_it(tmp_path):
    from gradio_client import Client, handle_file

    port, gpu_log = free_port(), tmp_path / "spaces.log"
    env = {key: value for key, value in os.environ.items() if key not in ("CAPDEMO_WEIGHTS", "PORT")}
    env.update(GRADIO_SERVER_NAME="0.0.0.0", GRADIO_SERVER_PORT=str(port), GRADIO_NUM_PORTS="1",
               SPACES_ZERO_GPU="true", SPACE_ID="capdemo/rehearsal", PYTHONPATH=str(FAKE_SPACES),
               FAKE_SPACES_LOG=str(gpu_log), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="2")
    space = front_matter()
    log = open(tmp_path / "app.log", "w")
    process = subprocess.Popen([sys.executable, space["app_file"]], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        try:
            wait_for_http_200(url, process, STARTUP_TIMEOUT_S)
        except AssertionError:
            log.flush()
            raise AssertionError((tmp_path / "app.log").read_text()[-3000:]) from None
        applied = [line.split()[1] for line in gpu_log.read_text().splitlines() if line.startswith("applied ")]
        assert {name.rsplit(".", 1)[-1] for name in applied} == GPU_EVENTS

        example = sorted((ROOT / "weights" / "shapes" / "examples").glob("*.png"))[0]
        answer, *_ = Client(url, verbose=False).predict(handle_file(str(example)), "What colour is the biggest shape?",
                                                        api_name="/vqa")
        assert isinstance(answer, str) and answer
        called = [line.split()[1] for line in gpu_log.read_text().splitlines() if line.startswith("called ")]
        assert [name.rsplit(".", 1)[-1] for name in called] == ["vqa"]  # served through spaces.GPU
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
