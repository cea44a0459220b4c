"""The method interface: declared settings and their validation (hand-picked and fuzzed), the registry, and a
method registered at run time showing up in the CLI, the facade and the app."""

from __future__ import annotations

import math
from dataclasses import dataclass

import gradio as gr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from capdemo import methods as registry
from capdemo.inputs import MAX_QUESTION_CHARS, clean_question
from capdemo.methods.base import CaptionMethod, MethodOptions, setting
from capdemo.result import Candidate, Result

NUMBERS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                    st.text(max_size=5))


@settings(max_examples=300, deadline=None)
@given(question=st.one_of(st.text(max_size=2 * MAX_QUESTION_CHARS), st.none(), st.integers(), st.binary(max_size=20)))
def test_question_box_fuzz(question):
    try:
        cleaned = clean_question(question)
    except ValueError as err:
        assert "\n" not in str(err) and str(err)
        return
    assert cleaned and len(cleaned) <= MAX_QUESTION_CHARS
    assert cleaned == cleaned.strip() and "  " not in cleaned and all(ch.isprintable() for ch in cleaned)


@pytest.mark.parametrize("raw,cleaned", [
    ("  what colour\tis it?\n", "what colour is it?"),
    ("is\x00 there\x1b a cat?", "is there a cat?"),
])
def test_questions_are_cleaned(raw, cleaned):
    assert clean_question(raw) == cleaned


@pytest.mark.parametrize("method", registry.methods(), ids=registry.names())
def test_every_setting_is_declared_with_bounds_help_and_a_default_inside_them(method):
    declared = method.Options.settings()
    assert declared, f"{method.label} declares no settings"
    for item in declared:
        assert item.label and item.help and "\n" not in item.help
        if item.kind in (int, float):
            assert item.low is not None and item.high is not None and item.low <= item.default <= item.high
        if item.kind is str:
            assert item.default in item.choices
    assert method.Options().validated() == method.Options()  # the declared defaults pass their own checks


@pytest.mark.parametrize("method", registry.methods(), ids=registry.names())
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_settings_fuzz(method, data):
    """Any values from the API: either a one-line error naming the setting, or values inside the bounds."""
    names = [item.name for item in method.Options.settings()]
    values = data.draw(st.fixed_dictionaries({name: NUMBERS for name in names}))
    try:
        options = method.Options(**values).validated()
    except ValueError as err:
        assert "\n" not in str(err) and any(name in str(err) for name in names)
        return
    for item in method.Options.settings():
        value = getattr(options, item.name)
        if item.kind in (int, float):
            assert not isinstance(value, bool) and item.low <= value <= item.high and math.isfinite(value)
            assert isinstance(value, item.kind)


def test_whole_float_counts_are_accepted_as_integers_and_model_limits_narrow_the_bounds():
    maccap = registry.get("maccap").Options
    assert maccap(samples=4.0).validated().samples == 4
    with pytest.raises(ValueError, match="samples must be a whole number, got 2.5"):
        maccap(samples=2.5).validated()
    with pytest.raises(ValueError, match="n_cr must be between 1 and 49, got 50"):
        maccap(n_cr=50).validated({"n_cr": (1, 49)})  # a 7x7 grid


def test_unknown_methods_are_named_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'blip'; choose one of maccap, tomcap"):
        registry.get("blip")


# --------------------------------------------------------------------------------------------
# A fourth method, registered at run time: the CLI, the facade and the app pick it up unedited


@dataclass
class EchoOptions(MethodOptions):
    shout: bool = setting(False, label="Shout", help="upper-case the caption")
    repeats: int = setting(1, low=1, high=3, label="Repeats", help="how many times the caption says it")


class EchoMethod(CaptionMethod):
    """Captions every image with the same words: proves the interface, not a captioner."""

    name = "echo"
    label = "Echo"
    citation = "capdemo's test method"
    Options = EchoOptions

    @classmethod
    def from_bundle(cls, context):
        return cls()

    def default_options(self):
        return EchoOptions()

    def caption(self, encoded, options):
        text = " ".join(["an image"] * options.repeats)
        text = text.upper() if options.shout else text
        return [Result(caption=text, method=self.name, candidates=[Candidate(text, 1.0)], timings_ms={"echo": 0.0})
                for _ in range(len(encoded))]


@pytest.fixture
def echo_bundle(tiny_bundle_dir, tmp_path):
    """A copy of the tiny bundle with an "echo" component, and the echo method registered."""
    import shutil

    from capdemo.bundle import BundleWriter

    registry.register(EchoMethod)
    shutil.copytree(tiny_bundle_dir, tmp_path / "bundle")
    writer = BundleWriter.extending(tmp_path / "bundle")
    writer.add_component("echo", {})
    yield writer.finish()
    registry.unregister("echo")


def test_a_method_registered_at_run_time_reaches_the_cli_the_facade_and_the_app(echo_bundle, capsys):
    from capdemo.__main__ import _parser, main
    from capdemo.pipeline import Captioner
    from capdemo.testing import example_images
    from capdemo.ui import create_blocks

    method_flag = next(a for a in _parser()._subparsers._group_actions[0].choices["caption"]._actions
                       if a.dest == "method")
    assert "echo" in method_flag.choices
    captioner = Captioner.from_bundle(echo_bundle, device="cpu")
    assert captioner.method_names == ("maccap", "tomcap", "capdec", "echo")
    result = captioner.caption(example_images()[:1], "echo", shout=True, repeats=2)[0]
    assert result.caption == "AN IMAGE AN IMAGE" and result.timings_ms["encode"] > 0
    with pytest.raises(ValueError, match="repeats must be between 1 and 3, got 4"):
        captioner.caption(example_images()[:1], "echo", repeats=4)

    demo = create_blocks(captioner)
    boxes = [block for block in demo.blocks.values() if isinstance(block, gr.CheckboxGroup)]
    assert [value for _, value in boxes[0].choices] == ["maccap", "tomcap", "capdec", "echo"]
    caption_api = next(fn for fn in demo.fns.values() if fn.api_name == "caption")
    parameters = [p for p in __import__("inspect").signature(caption_api.fn).parameters]
    assert {"echo_shout", "echo_repeats"} <= set(parameters)

    image = example_images()[0]
    path = echo_bundle.parent / "image.png"
    image.save(path)
    assert main(["caption", str(path), "--weights", str(echo_bundle), "--method", "echo", "--repeats", "3"]) == 0
    assert capsys.readouterr().out.strip().endswith("an image an image an image")
    assert main(["caption", str(path), "--weights", str(echo_bundle), "--method", "echo", "--samples", "3"]) == 2
    assert "--samples does not apply to Echo" in capsys.readouterr().err


def test_no_method_name_is_dispatched_on_outside_the_methods_package():
    """The registry is the one place a method is chosen by name: no `== "maccap"`-style branches elsewhere."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    names = "|".join(registry.names())
    pattern = re.compile(rf"""(==|!=|\bin\b|\bis\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = []
    for path in [*root.glob("capdemo/**/*.py"), root / "app.py"]:
        if "methods" in path.relative_to(root).parts:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []
