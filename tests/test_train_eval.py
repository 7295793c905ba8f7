"""`python -m core train` and `python -m core eval` end to end on a tiny synthetic dataset (real embedded SAM).

Two training steps (the second one after a --resume), then a 1-shot evaluation of 2 episodes in every mode:
the commands, the files they write and the JSON report cannot rot. ~1 minute on 2 CPU cores.
"""

import json
import os

import numpy as np
import pytest
import torch

from core import cli


def test_train_resume_and_eval(tiny_folder, tmp_path, monkeypatch):
    torch.set_num_threads(2)
    out = tmp_path / "run"
    cache = tmp_path / "features"
    common = ["--data", str(tiny_folder), "--fold", "0", "--device", "cpu", "--feature-cache", str(cache), "--quiet"]
    train = ["train", *common, "--episodes", "2", "--batch", "1", "--lr", "1e-4", "--warmup", "1",
             "--out", str(out), "--n-queries", "8"]
    assert cli.main(train + ["--steps-this-run", "1"]) == 0
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["config"]["base_classes"] == [2]
    assert cli.main(train) == 2  # an existing training is never overwritten silently
    assert cli.main(train + ["--resume"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert all(r["classes"] == ["disc"] for r in log)  # base classes only

    blob = torch.load(out / "adapters.pt", map_location="cpu", weights_only=True)
    meta = blob["training"]
    assert meta["complete"] and meta["steps"] == 2 and meta["fold"] == 0 and meta["novel_classes"] == [1]
    assert meta["backbone"]["name"] == "embedded" and len(meta["backbone"]["sha256"]) == 64
    digest = (out / "adapters.pt.sha256").read_text().split()[0]
    assert len(digest) == 64
    # VCP / DTA weights moved away from their initialisation; SAM's did not exist in the file
    assert set(blob) >= {"vcp", "dta", "config", "signature"}

    report = tmp_path / "eval.json"
    rc = cli.main(["eval", *common, "--shots", "1", "--episodes", "2", "--adapters", str(out / "adapters.pt"),
                   "--json", str(report)])
    assert rc == 0
    rep = json.loads(report.read_text())
    assert rep["adapters"]["sha256"] == digest and rep["seed"] == 0 and rep["classes"] == {"1": "square"}
    res = rep["results"]["1-shot"]
    assert res["episodes"] == 2 and len(res["episodes_sha256"]) == 64
    assert set(res["modes"]) == {"virefsam", "training_free", "static_prompt", "vcp_no_dta"}
    for m in res["modes"].values():
        assert 0.0 <= m["miou"] <= 100.0 and 0.0 <= m["fbiou"] <= 100.0
        assert m["classes"]["square"]["episodes"] == 2
    assert "test-time" in rep["modes"]["vcp_no_dta"]
    assert "not tuned" in rep["modes"]["vcp_no_dta"]  # as the trained file with DTA (eval's default tuning)
    assert rep["feature_cache"]["hits"] > 0  # every image encoded once for all modes


def test_ctrl_c_during_training_says_the_checkpoint_was_saved_and_how_to_resume(tiny_folder, tmp_path):
    """A real `python -m core train` interrupted with SIGINT (Ctrl-C) after its first step: exit 130, the
    checkpoint is there, and stderr says so with the command that continues it (the same one with --resume).
    It is started with SIGINT ignored, as a shell starts a background job (and as this test's process may have
    it after earlier tests): the command must listen all the same."""
    import os
    import shlex
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    args = ["train", "--data", str(tiny_folder), "--fold", "0", "--device", "cpu", "--feature-cache",
            str(tmp_path / "features"), "--quiet", "--episodes", "200", "--batch", "1", "--lr", "1e-4",
            "--warmup", "1", "--out", str(out), "--n-queries", "8", "--save-every", "1000", "--threads", "1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")  # faulthandler: stacks on SIGABRT
    command = " ".join(shlex.quote(w) for w in [sys.executable, "-m", "core", *args])
    proc = subprocess.Popen(["sh", "-c", f"trap '' INT; exec {command}"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    log = out / "train_log.jsonl"
    t0 = time.time()
    while not (log.exists() and log.read_text().strip()) and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    waited = time.time() - t0
    proc.send_signal(signal.SIGINT)
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # show where it hangs: faulthandler prints every thread's stack on SIGABRT
        status = Path(f"/proc/{proc.pid}/status")
        masks = [ln for ln in status.read_text().splitlines() if ln.startswith("Sig")] if status.exists() else []
        proc.send_signal(signal.SIGABRT)
        stdout, stderr = proc.communicate(timeout=60)
        steps = len(log.read_text().splitlines()) if log.exists() else 0
        pytest.fail(f"no exit 120 s after SIGINT (sent {waited:.0f} s after the start; {steps} steps logged "
                    f"when it was killed; signal masks {masks}); the stacks:\n{stderr[-6000:]}")
    assert proc.returncode == 130, stderr
    ckpt = out / "checkpoint.pt"
    assert ckpt.is_file()  # --save-every 1000: written by the interrupt, not by the schedule
    step = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
    assert step >= 1
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("cancelled:")]
    assert "nothing was written" not in line and "Traceback" not in stderr
    assert f"checkpoint {ckpt} was saved" in line
    command = line.split("continue with ", 1)[1]
    assert shlex.split(command) == ["python", "-m", "core", *args, "--resume"]


def test_train_with_another_dataset(tiny_folder, tmp_path, capsys):
    """--also adds another dataset's classes to the base classes; a class named like a novel class is refused
    (it would leak the held-out class) in one sentence."""
    import shutil

    other = tmp_path / "shapes_b"
    shutil.copytree(tiny_folder, other)
    (other / "classes.json").write_text(json.dumps({"classes": {"1": "box", "2": "square"}, "min_pixels": 100}))
    out = tmp_path / "mixed"
    common = ["train", "--data", str(tiny_folder), "--fold", "0", "--device", "cpu", "--feature-cache",
              str(tmp_path / "features"), "--quiet", "--episodes", "3", "--lr", "1e-4", "--warmup", "1",
              "--n-queries", "8", "--no-dta"]
    assert cli.main(common + ["--also", str(other), "--out", str(tmp_path / "leak")]) == 2
    assert "square is a novel class of the fold" in capsys.readouterr().err
    assert cli.main(common + ["--also", f"{other}@box", "--out", str(out)]) == 0
    blob = torch.load(out / "adapters.pt", map_location="cpu", weights_only=True)
    also = blob["training"]["also"]
    assert [(a["dataset"], a["class_names"]) for a in also] == [("shapes_b", ["box"])]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and {c for r in log for c in r["classes"]} <= {"disc", "box"}


def test_ctrl_c_message_of_other_commands_and_of_a_training_without_checkpoint(tmp_path):
    from core.cli import _interrupted, build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--data", "d", "--fold", "0", "--out", str(tmp_path / "new")])
    assert _interrupted(args, None, 0.0) == "interrupted; nothing was written."
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.pt").write_bytes(b"x")
    old = tmp_path / "old" / "checkpoint.pt"
    os.utime(old, (1_000_000, 1_000_000))
    argv = ["train", "--data", "d", "--fold", "0", "--out", str(tmp_path / "old"), "--resume"]
    msg = _interrupted(parser.parse_args(argv), argv, 2_000_000.0)
    assert "unchanged" in msg and msg.endswith("python -m core " + " ".join(argv))


def test_eval_takes_the_shipped_adapters_by_name(tiny_folder, tmp_path):
    """``eval --adapters default`` loads the adapters shipped for --model (the file segment, bench, Processing and
    the dock use for 'default', through core.pipeline.resolve_adapters); 'none' skips the virefsam mode."""
    from core.pipeline import default_adapters
    from core.training.train import file_sha256

    shipped = default_adapters("embedded")
    if shipped is None:
        pytest.skip("no adapters are shipped for the embedded model")
    torch.set_num_threads(2)
    common = ["eval", "--data", str(tiny_folder), "--fold", "0", "--device", "cpu", "--feature-cache",
              str(tmp_path / "features"), "--quiet", "--shots", "1", "--episodes", "1"]
    report = tmp_path / "eval.json"
    assert cli.main(common + ["--modes", "virefsam", "--adapters", "default", "--json", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["adapters"]["sha256"] == file_sha256(shipped) and rep["modes"] == {"virefsam": "ok"}
    assert 0.0 <= rep["results"]["1-shot"]["modes"]["virefsam"]["miou"] <= 100.0
    assert cli.main(common + ["--modes", "virefsam,training_free", "--adapters", "none", "--json", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["adapters"] is None and rep["modes"]["virefsam"] == "skipped: no --adapters"
    assert cli.main(common + ["--modes", "virefsam", "--adapters", str(tmp_path / "missing.pt")]) == 2


def test_train_from_the_shipped_adapters(tiny_folder, tmp_path):
    """``train --init default`` starts from the shipped adapters (e.g. to add held-out classes to them): the
    checkpoint before any step equals them, and the adapters file records where it started."""
    from core.pipeline import default_adapters
    from core.training.train import file_sha256

    shipped = default_adapters("embedded")
    if shipped is None:
        pytest.skip("no adapters are shipped for the embedded model")
    torch.set_num_threads(2)
    out = tmp_path / "ft"
    argv = ["train", "--data", str(tiny_folder), "--fold", "all", "--device", "cpu", "--feature-cache",
            str(tmp_path / "features"), "--quiet", "--episodes", "1", "--batch", "1", "--lr", "1e-9", "--warmup", "1",
            "--init", "default", "--out", str(out)]
    assert cli.main(argv) == 0
    blob = torch.load(out / "adapters.pt", map_location="cpu", weights_only=True)
    ref = torch.load(shipped, map_location="cpu", weights_only=True)
    assert blob["training"]["init"]["sha256"] == file_sha256(shipped)
    assert blob["training"]["novel_classes"] == []  # --fold all: every class trains
    for part in ("vcp", "dta"):
        for k, v in ref[part].items():
            assert torch.allclose(blob[part][k].float(), v.float(), atol=1e-4), (part, k)  # lr 1e-9: unchanged
    assert cli.main(argv[:-2] + ["--init", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x")]) == 2


def test_eval_kshot_ensemble(tiny_folder, tmp_path):
    """``eval --kshot ensemble``: with K > 1 shots each shot's own decoding is averaged with the joint one on the
    same adapted embedding; the report says which K-shot rule ran."""
    torch.set_num_threads(2)
    report = tmp_path / "eval.json"
    argv = ["eval", "--data", str(tiny_folder), "--fold", "0", "--device", "cpu", "--feature-cache",
            str(tmp_path / "features"), "--quiet", "--shots", "2", "--episodes", "1", "--modes", "virefsam",
            "--adapters", "default", "--kshot", "ensemble", "--json", str(report)]
    assert cli.main(argv) == 0
    rep = json.loads(report.read_text())
    assert rep["kshot"] == "ensemble"
    assert 0.0 <= rep["results"]["2-shot"]["modes"]["virefsam"]["miou"] <= 100.0


def test_eval_nested_shot_counts_share_the_queries(tiny_folder, tmp_path):
    """``eval --nested K``: every shot count takes the first supports of the K-shot episodes, so 1-shot and K-shot
    see the same queries (a paired measure); the K-shot episodes are those a plain K-shot run draws."""
    torch.set_num_threads(2)
    common = ["eval", "--data", str(tiny_folder), "--fold", "0", "--device", "cpu", "--feature-cache",
              str(tmp_path / "features"), "--quiet", "--episodes", "2", "--modes", "training_free"]
    nested, plain = tmp_path / "nested.json", tmp_path / "plain.json"
    assert cli.main(common + ["--shots", "1,2", "--nested", "2", "--json", str(nested)]) == 0
    assert cli.main(common + ["--shots", "2", "--json", str(plain)]) == 0
    rep, ref = json.loads(nested.read_text()), json.loads(plain.read_text())
    assert rep["nested"] == 2 and ref["nested"] is None
    one = rep["results"]["1-shot"]["modes"]["training_free"]["episodes"]
    two = rep["results"]["2-shot"]["modes"]["training_free"]["episodes"]
    assert [e["query"] for e in one] == [e["query"] for e in two]
    assert [e["support"] for e in one] == [e["support"][:1] for e in two] and all(len(e["support"]) == 2 for e in two)
    assert rep["results"]["2-shot"]["episodes_sha256"] == ref["results"]["2-shot"]["episodes_sha256"]
    assert cli.main(common + ["--shots", "1,2", "--nested", "1"]) == 2  # K below a shot count: one sentence


def test_train_with_several_shot_counts(tiny_folder, tmp_path):
    """``train --shots 1,2``: each episode draws one count (recorded in the adapters file); several counts need
    one episode per step, else one sentence."""
    torch.set_num_threads(2)
    out = tmp_path / "mixed"
    argv = ["train", "--data", str(tiny_folder), "--fold", "all", "--device", "cpu", "--feature-cache",
            str(tmp_path / "features"), "--quiet", "--episodes", "3", "--lr", "1e-4", "--warmup", "1",
            "--n-queries", "8", "--no-dta", "--shots", "1,2"]
    assert cli.main(argv + ["--batch", "2", "--out", str(tmp_path / "refused")]) == 2
    assert cli.main(argv + ["--batch", "1", "--out", str(out)]) == 0
    meta = torch.load(out / "adapters.pt", map_location="cpu", weights_only=True)["training"]
    assert meta["shots"] == [1, 2] and meta["complete"]
