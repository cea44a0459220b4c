"""Repository contracts: the README's two commands, CI calling the test command, a clean CPU install."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    body = text.split("---", 2)[2]  # after the Spaces front matter
    return re.findall(r"```bash\n(.+?)\n```", body, flags=re.S)[:2]


def test_readme_opens_with_two_commands_and_front_matter():
    text = (ROOT / "README.md").read_text()
    front = text.split("---", 2)[1]
    for key in ("sdk: gradio", "app_file: app.py", "sdk_version:", "python_version:"):
        assert key in front
    install_app, install_tests = _readme_commands()
    assert install_app.endswith("python app.py") and "requirements.txt" in install_app
    assert install_tests.endswith("-m pytest -q") and "requirements-dev.txt" in install_tests
    # nothing but one paragraph between the title and the first command
    intro = text.split("# capdemo", 1)[1].split("```bash", 1)[0].strip()
    assert "\n\n" not in intro


def test_ci_runs_the_linter_then_the_readme_test_command_verbatim():
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    tests = lines.index(_readme_commands()[1])
    lint = next(i for i, line in enumerate(lines) if line.rstrip().endswith(".venv/bin/ruff check ."))
    assert lint < tests and "set -euo pipefail" in lines  # a lint error stops CI before the tests
    ruff = re.search(r"^ruff==(\S+)$", (ROOT / "requirements-dev.txt").read_text(), re.M)
    assert ruff and "[tool.ruff.lint]" in (ROOT / "pyproject.toml").read_text()


def test_no_capdemo_module_is_longer_than_400_lines():
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / "capdemo").rglob("*.py")}
    assert {path: n for path, n in lengths.items() if n > 400} == {}


def test_gradio_version_pinned_consistently():
    front = (ROOT / "README.md").read_text().split("---", 2)[1]
    sdk = re.search(r"sdk_version:\s*(\S+)", front).group(1)
    assert f"gradio=={sdk}" in (ROOT / "requirements.txt").read_text()


def test_environment_is_consistent_and_cpu_only():
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    names = {dist.metadata["Name"].lower() for dist in importlib.metadata.distributions()}
    if not Path("/proc/driver/nvidia").exists():  # a CPU host must not have pulled CUDA wheels
        assert not [n for n in names if n.startswith("nvidia-") or n in ("triton", "cuda-toolkit")]
    assert importlib.metadata.version("torch").startswith("2.13.0")
    assert importlib.metadata.version("torchvision") == "0.28.0"


def test_capdemo_never_imports_training():
    imports_training = re.compile(r"^\s*(from|import) training", re.M)
    offenders = [p.name for p in (ROOT / "capdemo").rglob("*.py") if imports_training.search(p.read_text())]
    assert offenders == []
