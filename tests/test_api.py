"""The public Python API as the README shows it: the example runs verbatim and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_python_example_runs_verbatim(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the example names the shipped bundle by its path in the repository
    exec(compile(readme_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("(") and "'maccap'" in printed[0] and "'tomcap'" in printed[0]
    assert "samples=20" in printed[1]  # the bundle's own setting
    assert sum(line.startswith("ms per stage:") and "'encode'" in line for line in printed) == 2
    assert any(line.startswith("neighbours: [(") for line in printed)
    assert "'caption'" in next(line for line in printed if line.startswith("['"))


def test_the_api_loads_lazily_and_names_bad_settings(tiny_bundle_dir):
    import capdemo

    captioner = capdemo.load(tiny_bundle_dir, device="cpu")
    assert capdemo.list_methods()[:3] == ("maccap", "tomcap", "capdec")
    k_max = captioner.methods["tomcap"].limits()["k"][1]  # what the tiny LM's positions and store can take
    with pytest.raises(ValueError, match=f"k must be between 1 and {k_max}, got 99"):
        captioner.options("tomcap", k=99)
    result = captioner.caption([str(captioner.examples()[0])], "capdec")[0]  # a path works as well as an image
    assert result.method == "capdec" and result.to_json()["caption"] == result.caption
