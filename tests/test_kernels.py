"""Pinned CPU kernels: `python -m training` gives the shipped bundle's bytes on this CPU, not only on the one that
built it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from capdemo.encoders import EncoderConfig
from training.kernels import PINNED_KERNELS, pin_cpu_kernels, pins_apply

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "weights" / "shapes"


@pytest.mark.skipif(not pins_apply(), reason="the pinned kernels are x86-64's AVX2 code; other CPUs round differently")
def test_the_shipped_clip_embeds_the_shipped_datastore_to_its_bytes(tmp_path):
    """The shapes build's index stage, rerun on the shipped CLIP: on an AVX-512 CPU without the pins, 6 % of the
    values differ in their last bits (README, "Bit for bit on another CPU too"; docs/shapes-world-history.md). The
    command must pin the kernels itself, so the pins the test session set are taken out of its environment. Only a
    CPU with AVX-512 can catch a missing pin (an AVX2 CPU runs the pinned code anyway); on an Intel CPU with AVX-512,
    which no one measured here, MKL's matrix products may differ too."""
    component = json.loads((SHIPPED / "bundle.json").read_text())["components"]["encoder"]
    spec = tmp_path / "encoder.json"
    weights = SHIPPED / "encoder" / "open_clip_model.safetensors"
    EncoderConfig.from_dict(component).replace(pretrained=str(weights)).save_json(spec)
    shipped = SHIPPED / "tomcap" / "datastore"
    env = {name: value for name, value in os.environ.items() if name not in PINNED_KERNELS}
    subprocess.run([sys.executable, "-m", "training", "index", "--corpus", str(shipped / "captions.txt"),
                    "--encoder", str(spec), "--out", str(tmp_path / "datastore"), "--kind", "flat", "--device", "cpu"],
                   cwd=ROOT, env={**env, "OMP_NUM_THREADS": "2"}, check=True, capture_output=True)
    assert (tmp_path / "datastore" / "captions.txt").read_bytes() == (shipped / "captions.txt").read_bytes()
    assert (tmp_path / "datastore" / "index.faiss").read_bytes() == (shipped / "index.faiss").read_bytes()


@pytest.mark.skipif(not pins_apply(), reason="nothing is pinned off x86-64")
def test_pinning_keeps_what_the_environment_chose(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "ALL")
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    pin_cpu_kernels()
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "ALL"
    assert os.environ["ATEN_CPU_CAPABILITY"] == PINNED_KERNELS["ATEN_CPU_CAPABILITY"] == "avx2"
