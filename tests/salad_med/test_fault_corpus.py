"""The fault corpus (issue 11): bad inputs and faults built from code, run through the commands they hit.

Re-run (about 75 s of CPU on one core, 4 min wall on a loaded 2-core machine; prints
``fault corpus: handled H / total T`` at the end)::

    OMP_NUM_THREADS=1 python -m pytest -q tests/salad_med/test_fault_corpus.py

Each case asserts what a user relies on when something goes wrong:

* one ``error:`` line naming the file or key and the reason, and the documented exit code
  (0 ok, 1 failure, 2 bad arguments/configuration);
* batch jobs (``preprocess``, ``score``, the DICOM node) record the bad input and finish the others;
* nothing half-written: no temporary file left, every CSV/JSON/YAML/PNG written parses;
* no patient name in any log, CSV or audit file (every DICOM carries ``tests.faults.FAKE_PATIENT_NAME``).

Faults that need a real process (``kill -9`` of ``preprocess`` and ``train``, a file-size limit) run
``python -m salad_med`` in a subprocess; the others use typer's ``CliRunner`` or the library. One tiny
SALAD run (32x32 images, 3 epochs) trained in a folder whose path holds spaces and non-ASCII letters
is shared by the module. A case that cannot run here (no tmpfs without root) is tallied as not run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from salad_med.cli.app import app
from tests.conftest import TINY_OVERRIDES, python_env, write_tiny_split
from tests.faults import (
    FAKE_PATIENT_NAME,
    PHI_MARKERS,
    Tally,
    assert_error,
    assert_outputs_parse,
    error_line,
    hidden_files,
    phantom_dicom,
    phi_hits,
    radiograph_png,
    tmpfs,
    write_bad_dicoms,
    write_bad_images,
)

runner = CliRunner()

#: The shared run: the tiny settings with 3 epochs (pre-training 1 + one round of 2), so that a run
#: killed in epoch 2 still has an epoch to resume.
RUN_SETS = [*TINY_OVERRIDES, "train.epochs_per_round=2"]
IMAGE_KINDS = ["zero-byte file", "truncated PNG", "truncated JPEG", "text named .png", "constant image",
               "1x1 image"]
DICOM_KINDS = ["truncated DICOM", "DICOM without pixel data", "SR instead of an image", "multi-frame DICOM",
               "broken VOI LUT"]
CONFIG_CASES = {  # case -> (file name, YAML text or None, extra --set, fragments of the error line)
    "config: unknown key": ("unknown.yaml", "train:\n  lrr: 0.001\n", [], ["unknown.yaml", "train.lrr", "unknown key"]),
    "config: wrong type": ("type.yaml", "train:\n  lr: fast\n", [], ["type.yaml", "train.lr", "expected float"]),
    "config: out of range": ("range.yaml", "model:\n  latent_dim: 1\n", [],
                             ["range.yaml", "model.latent_dim", "below the minimum"]),
    "config: lr=0": (None, None, ["train.lr=0"], ["train.lr", "must be above 0"]),
    "config: invalid YAML": ("broken.yaml", "train:\n  lr: [0.1,\n  k: 3\n", [], ["broken.yaml", "invalid YAML", "line"]),
    "config: missing file": ("absent.yaml", None, [], ["absent.yaml", "cannot read config"]),
}
CHECKPOINT_CASES = ["checkpoint: truncated", "checkpoint: other architecture", "checkpoint: pickle that runs code",
                    "checkpoint: earlier format", "checkpoint: scorer with K >= bank rows"]
CASES = [
    *CONFIG_CASES,
    "manifest: missing columns", "manifest: duplicate ids x.png + x.jpg", "manifest: missing files",
    "manifest: one-class val split", "manifest: empty file",
    *(f"image: {k}" for k in IMAGE_KINDS), "paths: spaces and non-ASCII",
    *(f"dicom: {k}" for k in DICOM_KINDS),
    *CHECKPOINT_CASES,
    "kill -9: preprocess, rerun", "kill -9: train mid-checkpoint, resume", "crash between best.pt and last.pt",
    "output: read-only folder", "output: full disk (file-size limit)", "output: full disk (tmpfs)",
    "output: a file where a folder is expected",
    "node: bad objects", "node: wrong called AE title", "node: unknown calling AE title", "node: SR object sent",
    "score: K >= bank size at training", "evaluate: constant scores", "train: identical images (no spread)",
    "train: into a finished run", "no patient name in any output",
]
TALLY = Tally(CASES)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """The module's folder: a path with a space and non-ASCII letters, as users have."""
    path = tmp_path_factory.mktemp("faults") / "données ü é"
    path.mkdir()
    return path


@pytest.fixture(scope="module")
def seen() -> list[str]:
    """Every CLI output and log message of the module (searched for patient names at the end)."""
    return []


@pytest.fixture(scope="module", autouse=True)
def _capture_logs(seen):
    class _Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = _Keep(logging.DEBUG)
    logger = logging.getLogger("salad_med")
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def cli(seen):
    def _invoke(*args):
        result = runner.invoke(app, [str(a) for a in args])
        seen.append(result.output)
        return result

    return _invoke


def _sets(items) -> list[str]:
    return [x for item in items for x in ("--set", item)]


@pytest.fixture(scope="module")
def split(root) -> Path:
    return write_tiny_split(root / "data ö", n=32)


@pytest.fixture(scope="module")
def run(root, split) -> Path:
    """The shared run (3 epochs), trained in ``root/run é``: the uninterrupted reference of the kill test."""
    from salad_med.config import load_config
    from salad_med.engine.trainer import train_from_manifest

    run_dir = root / "run é"
    train_from_manifest(load_config("demo", RUN_SETS), split, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def good_png(root) -> Path:
    return radiograph_png(root / "inputs" / "good.png", seed=3)


def _python_env() -> dict[str, str]:
    return python_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"the process ended (exit {proc.returncode}) before {what}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


# --------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_faults(case, cli, root, split):
    name, text, sets, needles = CONFIG_CASES[case]
    args = []
    if name is not None:
        path = root / "configs" / name
        path.parent.mkdir(exist_ok=True)
        if text is not None:
            path.write_text(text, encoding="utf-8")
        args = ["--config", path]
    out = root / "config-runs" / name if name else root / "config-runs" / "set"
    res = cli("train", *args, "--manifest", split, "--output", out, *_sets(sets))
    assert_error(res, 2, *needles)
    assert not out.exists(), "a bad config must fail before anything is written"
    TALLY.handled(case)


# ------------------------------------------------------------------------------------- manifests
def test_manifest_missing_columns(cli, root, split):
    bad = root / "manifests" / "no_label.csv"
    bad.parent.mkdir(exist_ok=True)
    pd.read_csv(split).drop(columns=["label", "patient_id"]).to_csv(bad, index=False)
    out = root / "manifest-runs" / "columns"
    res = cli("train", "--config", "demo", "--manifest", bad, "--output", out, *_sets(TINY_OVERRIDES))
    assert_error(res, 1, str(bad), "missing required column(s) patient_id, label")
    assert not (out / "last.pt").exists() and not hidden_files(out)
    TALLY.handled("manifest: missing columns")


def test_manifest_duplicate_ids_name_both_files(cli, root):
    folder = root / "dup"
    for name in ("x.png", "x.jpg", "y.png"):
        radiograph_png(folder / "normal" / name, seed=len(name))
    radiograph_png(folder / "abnormal" / "z.png", seed=9)
    res = cli("manifest", "build", "folder", folder, "--out", root / "dup.csv")
    assert_error(res, 1, str(folder), "duplicate image_id", "x.png", "x.jpg")  # both clashing files named
    assert not (root / "dup.csv").exists()
    TALLY.handled("manifest: duplicate ids x.png + x.jpg")


def test_manifest_missing_files(cli, root, split):
    df = pd.read_csv(split)
    gone = [root / "gone" / "lost one.png", root / "gone" / "lost two.png"]
    df.loc[2, "source_path"], df.loc[20, "source_path"] = str(gone[0]), str(gone[1])  # a train row, a val row
    bad = root / "manifests" / "missing.csv"
    bad.parent.mkdir(exist_ok=True)
    df.to_csv(bad, index=False)
    out = root / "manifest-runs" / "missing"
    res = cli("train", "--config", "demo", "--manifest", bad, "--output", out, *_sets(TINY_OVERRIDES))
    assert_error(res, 1, str(gone[0]), "file not found", "--skip-missing")
    assert not (out / "last.pt").exists()
    # --skip-missing: the batch completes without them and says which were dropped
    res = cli("train", "--config", "demo", "--manifest", bad, "--output", out, "--skip-missing",
              *_sets(TINY_OVERRIDES))
    assert res.exit_code == 0, res.output
    skipped = pd.read_csv(out / "skipped.csv")
    assert sorted(skipped["path"]) == sorted(map(str, gone)) and set(skipped["reason"]) == {"file not found"}
    assert "on 15 train / 7 val images" in res.output
    assert (out / "best.pt").is_file() and not hidden_files(out)
    assert_outputs_parse(out)
    TALLY.handled("manifest: missing files")


def test_manifest_one_class_val_split(cli, root, split):
    df = pd.read_csv(split)
    df.loc[df["split"] == "val", "label"] = 0
    bad = root / "manifests" / "one_class.csv"
    bad.parent.mkdir(exist_ok=True)
    df.to_csv(bad, index=False)
    out = root / "manifest-runs" / "one_class"
    res = cli("train", "--config", "demo", "--manifest", bad, "--output", out, *_sets(TINY_OVERRIDES))
    assert_error(res, 1, "val split has only normal (0) images", "re-split")
    assert not (out / "last.pt").exists()
    TALLY.handled("manifest: one-class val split")


def test_manifest_empty_file(cli, root):
    bad = root / "manifests" / "empty.csv"
    bad.parent.mkdir(exist_ok=True)
    bad.write_bytes(b"")
    res = cli("train", "--config", "demo", "--manifest", bad, "--output", root / "manifest-runs" / "empty")
    assert_error(res, 1, str(bad), "cannot read manifest")
    TALLY.handled("manifest: empty file")


# ---------------------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def image_batch(root, run, cli):
    """``preprocess`` then ``score`` of a folder mixing good radiographs and every bad image kind."""
    folder = root / "images in"
    goods = [radiograph_png(folder / "normal" / f"good{i}.png", seed=i) for i in range(3)]
    goods.append(radiograph_png(folder / "abnormal" / "spaced name ü é.png", seed=7))
    bad = write_bad_images(folder / "normal" / "bad")
    pre_out, score_out = root / "images preprocessed", root / "images scored"
    pre = cli("preprocess", "--dataset", "folder", "--input", folder, "--output", pre_out, "--size", 32,
              "--set", "preprocess.detect_carrier=false")
    scored = cli("score", "--run", run, "--output", score_out, folder)
    return {"goods": goods, "bad": bad, "pre": pre, "pre_out": pre_out, "score": scored, "score_out": score_out}


def _rows(csv: Path, key: str = "source_path") -> dict[str, dict]:
    df = pd.read_csv(csv, keep_default_na=False, dtype=str)
    return {r[key]: r for r in df.to_dict("records")}


def _assert_batch_completed(batch, n_bad: int) -> None:
    """Both batch commands exit 0, every good input has its output, nothing half-written."""
    n_good = len(batch["goods"])
    assert batch["pre"].exit_code == 0, batch["pre"].output
    assert f"{n_good} ok" in batch["pre"].output and f"{n_bad} failed" in batch["pre"].output
    assert batch["score"].exit_code == 0, batch["score"].output
    assert f"scored {n_good} of {n_good + n_bad} inputs ({n_bad} failed)" in batch["score"].output
    for out in (batch["pre_out"], batch["score_out"]):
        assert not hidden_files(out), hidden_files(out)
        assert assert_outputs_parse(out) > 0
    manifest = _rows(batch["pre_out"] / "manifest.csv")
    scores = _rows(batch["score_out"] / "scores.csv")
    for good in batch["goods"]:
        assert manifest[str(good)]["status"] == "ok" and Path(manifest[str(good)]["output_path"]).is_file()
        assert scores[str(good)]["status"] == "ok" and 0.0 <= float(scores[str(good)]["score"]) <= 1.0


def _assert_recorded_failure(batch, path: Path, expect: str) -> None:
    """The bad input is a failed row with the reason in failures.csv, manifest.csv and scores.csv."""
    failures = _rows(batch["pre_out"] / "failures.csv")
    assert expect.lower() in failures[str(path)]["reason"].lower(), failures[str(path)]
    row = _rows(batch["pre_out"] / "manifest.csv")[str(path)]
    assert row["status"] == "failed" and row["output_path"] == ""
    scored = _rows(batch["score_out"] / "scores.csv")[str(path)]
    assert scored["status"] == "failed" and scored["score"] == "" and scored["rank"] == ""
    assert expect.lower() in scored["reason"].lower() and str(path) in scored["reason"], scored
    # the one console line of the failure names the file and the reason
    lines = [line for line in batch["score"].output.splitlines() if line.startswith(f"failed: {path}")]
    assert len(lines) == 1 and expect.lower() in lines[0].lower()


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_bad_images(kind, image_batch):
    _assert_batch_completed(image_batch, len(image_batch["bad"]))
    path, expect = image_batch["bad"][kind]
    _assert_recorded_failure(image_batch, path, expect)
    TALLY.handled(f"image: {kind}")


def test_paths_with_spaces_and_non_ascii(image_batch, run, root):
    """The shared run lives in ``données ü é/run é``; an input named ``spaced name ü é.png`` goes through."""
    assert " " in str(run) and not str(run).isascii() and (run / "best.pt").is_file()
    spaced = image_batch["goods"][-1]
    manifest = _rows(image_batch["pre_out"] / "manifest.csv")
    assert manifest[str(spaced)]["status"] == "ok"
    assert Path(manifest[str(spaced)]["output_path"]).name == "spaced name ü é.png"
    scores = pd.read_csv(image_batch["score_out"] / "scores.csv", keep_default_na=False)
    assert scores.set_index("image_id").loc["spaced name ü é", "status"] == "ok"
    TALLY.handled("paths: spaces and non-ASCII")


# ----------------------------------------------------------------------------------------- DICOM
@pytest.fixture(scope="module")
def dicom_batch(root, run, cli):
    """``preprocess --dataset dicom`` then ``score`` of a tree mixing good phantoms and bad objects."""
    folder = root / "dicom in"
    goods = [phantom_dicom(folder / f"good{i}.dcm", seed=i) for i in range(3)]
    bad = write_bad_dicoms(folder / "bad")
    pre_out, score_out = root / "dicom preprocessed", root / "dicom scored"
    pre = cli("preprocess", "--dataset", "dicom", "--input", folder, "--output", pre_out, "--size", 32,
              "--set", "preprocess.detect_carrier=false")
    scored = cli("score", "--run", run, "--output", score_out, folder)
    return {"goods": goods, "bad": bad, "pre": pre, "pre_out": pre_out, "score": scored, "score_out": score_out}


@pytest.mark.parametrize("kind", DICOM_KINDS)
def test_bad_dicom_objects(kind, dicom_batch):
    path, expect = dicom_batch["bad"][kind]
    lut = dicom_batch["bad"]["broken VOI LUT"][0]
    # the broken VOI LUT is no failure: the window is used instead, and the manifest says why
    batch = {**dicom_batch, "goods": [*dicom_batch["goods"], lut]}
    _assert_batch_completed(batch, len(dicom_batch["bad"]) - 1)
    if kind == "broken VOI LUT":
        row = _rows(dicom_batch["pre_out"] / "manifest.csv")[str(path)]
        assert row["status"] == "ok" and row["voi"].startswith("window (VOI LUT Sequence unusable: "), row
    else:
        _assert_recorded_failure(dicom_batch, path, expect)
    # every scored DICOM got its SR; scores.csv names images by SOP Instance UID, never by patient
    scores = pd.read_csv(dicom_batch["score_out"] / "scores.csv", keep_default_na=False, dtype=str)
    ok = scores[scores["status"] == "ok"]
    assert len(ok) == 4 and all(Path(p).is_file() for p in ok["sr_path"])
    assert not phi_hits([dicom_batch["pre_out"], dicom_batch["score_out"]],
                        [dicom_batch["pre"].output, dicom_batch["score"].output])
    TALLY.handled(f"dicom: {kind}")


# ----------------------------------------------------------------------------------- checkpoints
def _bad_checkpoint(case: str, run: Path, folder: Path) -> tuple[Path, list[str]]:
    """Write the bad checkpoint of ``case``; returns it and the fragments its error line must hold."""
    from salad_med.config import config_from_dict
    from salad_med.engine.checkpoint import arch_signature

    folder.mkdir(parents=True, exist_ok=True)
    ckpt = torch.load(run / "best.pt", weights_only=True)
    path = folder / f"{case.split(': ')[1].replace(' ', '_')}.pt"
    if case == "checkpoint: truncated":
        data = (run / "best.pt").read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, ["truncated or damaged"]
    if case == "checkpoint: other architecture":  # a real network of another width, consistent in itself
        other = copy.deepcopy(ckpt)
        other["config"]["model"]["latent_dim"] = 32
        other["arch_signature"] = arch_signature(config_from_dict(other["config"]))
        torch.save(other, path)
        return path, ["another architecture", "latent_dim=32", "latent_dim=16"]
    if case == "checkpoint: pickle that runs code":
        sentinel = folder / "code-ran"

        class _Payload:
            def __reduce__(self):
                return (os.system, (f"touch '{sentinel}'",))

        torch.save({"format": "salad-med-checkpoint/2", "model": _Payload()}, path)
        return path, ["could run code"]
    if case == "checkpoint: earlier format":
        old = dict(ckpt, format="salad-med-checkpoint/1")
        torch.save(old, path)
        return path, ["salad-med 0.1", "retrain"]
    if case == "checkpoint: scorer with K >= bank rows":  # K = N: every Eq. 4 score would be exactly 1/N
        rows = int(ckpt["scorer"]["fitted"]["bank_"].shape[0])
        bad = copy.deepcopy(ckpt)
        bad["scorer"]["params"]["k"] = rows
        bad["config"]["score"]["k"] = rows
        torch.save(bad, path)
        return path, ["score.k", f"{rows} normal bank rows"]
    raise AssertionError(case)


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_bad_checkpoints(case, cli, run, root, good_png):
    path, needles = _bad_checkpoint(case, run, root / "checkpoints")
    out = root / "checkpoint-scores" / path.stem
    res = cli("score", "--run", run, "--checkpoint", path, "--output", out, good_png)
    line = assert_error(res, 1, str(path), *needles)
    assert "weights_only" not in line, "never advise loading an unsafe pickle"
    assert not (out / "scores.csv").exists(), "no score may come out of a bad checkpoint"
    assert not (path.parent / "code-ran").exists(), "the checkpoint ran code"
    TALLY.handled(case)


# ------------------------------------------------------------------------------------------ kill -9
def test_kill_preprocess_then_rerun(cli, root):
    """SIGKILL ``salad-med preprocess`` (a real process) mid-batch, rerun: the journal's finished inputs are
    skipped, every input ends done, every output parses, no temporary file is left."""
    folder = root / "kill preprocess in"
    goods = [radiograph_png(folder / "normal" / f"r{i:02d}.png", seed=i, size=64) for i in range(36)]
    radiograph_png(folder / "abnormal" / "a.png", seed=99, size=64)
    (folder / "normal" / "broken.png").write_text("not an image")
    out = root / "kill preprocess out"
    args = ["preprocess", "--dataset", "folder", "--input", str(folder), "--output", str(out), "--size", "32",
            "--set", "preprocess.detect_carrier=false"]
    proc = subprocess.Popen([sys.executable, "-m", "salad_med", *args], env=_python_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def done() -> int:
        return len([p for p in (out / "images").rglob("*.png") if not p.name.startswith(".")]) \
            if (out / "images").is_dir() else 0

    _wait_for(lambda: done() >= 6, proc, "6 preprocessed images")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "killed mid-batch, not finished"
    before = done()
    assert 6 <= before < len(goods) + 1
    assert not (out / "manifest.csv").exists()  # the manifest is written at the end only
    journalled = set()  # inputs the journal records as finished before the kill
    for journal in sorted(out.glob("journal*.jsonl")):
        for text in journal.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a torn last line is not a record
                journalled.add(json.loads(text)["image_id"])

    res = cli(*args)
    assert res.exit_code == 0, res.output
    manifest = _rows(out / "manifest.csv")
    assert sum(r["status"] in ("ok", "skipped") for r in manifest.values()) == len(goods) + 1
    assert manifest[str(folder / "normal" / "broken.png")]["status"] == "failed"
    assert not hidden_files(out), f"temporary files left after the rerun: {hidden_files(out)}"
    assert assert_outputs_parse(out) >= 2 * (len(goods) + 1)
    skipped = int(re.search(r"(\d+) skipped", res.output).group(1))
    # the journal (issue 11.6): the inputs finished before the kill are skipped, not redone
    assert skipped == len(journalled) >= before - 1, (skipped, len(journalled), before)
    assert f"{len(goods) + 1 - skipped} ok" in res.output
    TALLY.handled("kill -9: preprocess, rerun")


_PAUSED_TRAIN = textwrap.dedent("""
    # `salad-med train` whose epoch-{epoch} write of last.pt stops half-way (the test then sends SIGKILL)
    import io, os, sys, time
    import torch

    _save = torch.save
    _marker = sys.argv.pop(1)  # the file to create once half a checkpoint is on disk

    def _paused_save(obj, f, *args, **kwargs):
        target = os.fspath(f) if isinstance(f, (str, os.PathLike)) else f.name  # a path or an open file
        if os.path.basename(target).startswith(".last.") and isinstance(obj, dict) and obj.get("epoch") == {epoch}:
            buf = io.BytesIO()
            _save(obj, buf, *args, **kwargs)
            with open(target, "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                fh.flush()
                os.fsync(fh.fileno())
            open(_marker, "w").close()
            time.sleep(600)
        return _save(obj, f, *args, **kwargs)

    torch.save = _paused_save
    from salad_med.cli.app import main

    sys.argv[0] = "salad-med"
    main()
""")


def test_kill_train_mid_checkpoint_then_resume(cli, root, split, run):
    """SIGKILL ``salad-med train`` while it writes last.pt of epoch 2, then ``--resume``: the run finishes
    exactly as the uninterrupted one, and the half-written checkpoint is not left behind."""
    from salad_med.engine.checkpoint import read_checkpoint

    out = root / "killed run ü"
    marker = root / "paused.marker"
    script = root / "paused_train.py"
    script.write_text(_PAUSED_TRAIN.replace("{epoch}", "2"), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(script), str(marker), "train", "--config", "demo", "--manifest",
                             str(split), "--output", str(out), *_sets(RUN_SETS)],
                            env=_python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(marker.exists, proc, "the paused checkpoint write")
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    temps = hidden_files(out)
    assert [p.name.startswith(".last.") for p in temps] == [True], f"half a checkpoint on disk: {temps}"
    assert read_checkpoint(out / "last.pt")["epoch"] == 1  # the previous last.pt is intact

    res = cli("train", "--config", "demo", "--manifest", split, "--output", out, *_sets(RUN_SETS))
    assert_error(res, 2, str(out), "already holds a run", "--resume", "--overwrite")
    res = cli("train", "--output", out, "--resume")
    assert res.exit_code == 0, res.output
    assert not hidden_files(out), f"temporary files left after the resume: {hidden_files(out)}"
    assert_outputs_parse(out)
    assert pd.read_csv(out / "metrics.csv")["epoch"].tolist() == [1, 2, 3]
    got, ref = read_checkpoint(out / "last.pt"), read_checkpoint(run / "last.pt")
    assert got["epoch"] == ref["epoch"] == 3 and got["best_epoch"] == ref["best_epoch"]
    # exact resume on one machine and thread count: bit-identical in principle; 1e-5 absolute leaves room
    # for a BLAS kernel choice differing between processes and is far below what one epoch of Adam at
    # lr 2e-3 moves a weight (~1e-3)
    for key, value in ref["model"].items():
        torch.testing.assert_close(got["model"][key], value, atol=1e-5, rtol=0, msg=key)
    TALLY.handled("kill -9: train mid-checkpoint, resume")


def test_crash_between_checkpoint_writes(root, split, monkeypatch):
    """A process that dies right after one checkpoint of an improved epoch is written: the run on disk is
    never one whose last.pt names a best epoch whose best.pt does not exist."""
    import salad_med.engine.trainer as trainer
    from salad_med.config import load_config
    from salad_med.engine.checkpoint import read_checkpoint

    class Died(Exception):
        pass

    write = trainer.write_checkpoint
    calls = []

    def dies_after_first_write(state, path):
        calls.append(Path(path).name)
        if len(calls) == 2:  # epoch 1 improves: two checkpoints; the process dies before the second
            raise Died
        return write(state, path)

    monkeypatch.setattr(trainer, "write_checkpoint", dies_after_first_write)
    out = root / "crashed run"
    with pytest.raises(Died):
        trainer.train_from_manifest(load_config("demo", TINY_OVERRIDES), split, out)
    if (out / "last.pt").exists():
        best_epoch = read_checkpoint(out / "last.pt")["best_epoch"]
        assert (out / "best.pt").is_file(), f"last.pt names best epoch {best_epoch} but best.pt was never written"
        assert read_checkpoint(out / "best.pt")["epoch"] == best_epoch
    assert (out / "best.pt").is_file()  # written first: an interrupted epoch loses its last.pt, not its best
    assert not hidden_files(out)
    TALLY.handled("crash between best.pt and last.pt")


# -------------------------------------------------------------------------------- output folders
def test_read_only_output_folder(cli, root, run, good_png):
    ro = root / "read-only"
    with tmpfs(ro, "ro", "size=64k") as mounted:
        if not mounted:
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                pytest.skip("root without mount: a read-only folder cannot be made")
            ro.chmod(0o555)
        try:
            res = cli("score", "--run", run, "--output", ro, good_png)
            line = assert_error(res, 1, str(ro))
            assert "Read-only file system" in line or "Permission denied" in line, line
            res = cli("score", "--run", run, "--output", ro / "sub", good_png)
            line = assert_error(res, 1, str(ro / "sub"))
            assert not list(ro.iterdir())
        finally:
            if not mounted:
                ro.chmod(0o755)
    TALLY.handled("output: read-only folder")


def test_full_disk_file_size_limit(root, run, good_png, seen):
    """``salad-med score`` in a process that may write at most 300 bytes per file (RLIMIT_FSIZE): one
    error line naming scores.csv, exit 1, no scores.csv and no temporary file."""
    out = root / "fsize out"
    inputs = [good_png, *(radiograph_png(root / "inputs" / f"more{i}.png", seed=20 + i) for i in range(3))]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    proc = subprocess.run([sys.executable, "-m", "salad_med", "score", "--run", str(run), "--output", str(out),
                           *map(str, inputs)], env=_python_env(), preexec_fn=limit, capture_output=True,
                          text=True, timeout=600)
    seen.append(proc.stderr + proc.stdout)
    assert proc.returncode == 1, proc.stderr
    line = error_line(proc.stderr)
    assert str(out / "scores.csv") in line and "File too large" in line, line
    assert not (out / "scores.csv").exists() and not hidden_files(out)
    TALLY.handled("output: full disk (file-size limit)")


def test_full_disk_tmpfs(cli, root):
    """``preprocess`` into a 16 KiB file system: the images that fit are written whole, the others are
    failed rows, and the manifest that cannot be written is one error line naming it."""
    folder = root / "full in"
    for i in range(4):
        radiograph_png(folder / "normal" / f"f{i}.png", seed=40 + i, size=64)
    full = root / "full disk"
    with tmpfs(full, "size=16k") as mounted:
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root); the file-size-limit case covers a full disk")
        res = cli("preprocess", "--dataset", "folder", "--input", folder, "--output", full, "--size", 32,
                  "--set", "preprocess.detect_carrier=false")
        assert_error(res, 1, str(full / "manifest.csv"), "No space left on device")
        assert not hidden_files(full)
        assert_outputs_parse(full)
    TALLY.handled("output: full disk (tmpfs)")


def test_file_where_a_folder_is_expected(cli, root, run, split, good_png, image_batch):
    # image_batch writes the "images in" folder preprocess reads: without it the run stops at the missing
    # input (exit 2) before reaching the output check, when this test runs alone
    blocker = root / "blocker"
    blocker.write_text("a file, not a folder")
    for args in (["score", "--run", run, "--output", blocker, good_png],
                 ["preprocess", "--dataset", "folder", "--input", root / "images in", "--output", blocker],
                 ["train", "--config", "demo", "--manifest", split, "--output", blocker, *_sets(TINY_OVERRIDES)],
                 ["evaluate", "--run", run, "--output", blocker / "eval", "--n-boot", 10]):
        res = cli(*args)
        assert_error(res, 1, str(blocker), "not a folder")
    assert blocker.read_text() == "a file, not a folder"
    TALLY.handled("output: a file where a folder is expected")


# ------------------------------------------------------------------------------------ DICOM node
@pytest.fixture
def node(tmp_path, run, seen):
    from salad_med.dicom.node import NodeSettings, ScoringNode
    from salad_med.evaluation.inference import load_run

    started = ScoringNode(NodeSettings(output_dir=tmp_path / "node", allowed_aets=("FAULTSCU",),
                                       ae_title="SALAD", host="127.0.0.1", port=0, batch_size=4),
                          load_run(run).score_paths).start()
    yield started
    started.stop(drain=False, timeout=10)
    seen.extend([started.audit_path.read_text(encoding="utf-8"), started.results_path.read_text(encoding="utf-8")])


def _associate(port: int, calling: str = "FAULTSCU", called: str = "SALAD", sr: bool = False):
    from pynetdicom import AE
    from pynetdicom.sop_class import ComprehensiveSRStorage, ComputedRadiographyImageStorage, Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(ComputedRadiographyImageStorage)
    ae.add_requested_context(Verification)
    if sr:
        ae.add_requested_context(ComprehensiveSRStorage)
    return ae.associate("127.0.0.1", port, ae_title=called)


def _events(node) -> list[dict]:
    from salad_med.dicom.node import iter_audit

    return list(iter_audit(node.audit_path))


def test_node_bad_objects(node, tmp_path):
    import pydicom

    from salad_med.dicom.node import STATUS_DATASET_MISMATCH

    good = pydicom.dcmread(phantom_dicom(tmp_path / "good.dcm", seed=11))
    no_pixels = pydicom.dcmread(phantom_dicom(tmp_path / "nopix.dcm", seed=12))
    del no_pixels.PixelData
    short = pydicom.dcmread(phantom_dicom(tmp_path / "short.dcm", seed=13))
    short.PixelData = short.PixelData[:100]
    flat = pydicom.dcmread(phantom_dicom(tmp_path / "flat.dcm", seed=14))
    flat.PixelData = np.full((flat.Rows, flat.Columns), 700, np.uint16).tobytes()
    assoc = _associate(node.port)
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (no_pixels, good, short, flat)]
    finally:
        assoc.release()
    assert statuses == [STATUS_DATASET_MISMATCH, 0, STATUS_DATASET_MISMATCH, 0]
    assert node.wait_idle(120)
    again = _associate(node.port)  # the node is still up
    assert again.is_established
    again.release()
    refused = {e["sop_instance_uid"]: e["reason"] for e in _events(node) if e["status"] == "refused"}
    assert "missing PixelData" in refused[str(no_pixels.SOPInstanceUID)]
    assert "pixel data truncated" in refused[str(short.SOPInstanceUID)]
    res = node.results().set_index("sop_instance_uid")
    assert res.loc[str(good.SOPInstanceUID), "status"] == "ok"
    assert (node.dirs["sr"] / f"{good.SOPInstanceUID}.dcm").is_file()
    # a flat image decodes but holds nothing to score: a failed row with the reason, and no SR
    assert res.loc[str(flat.SOPInstanceUID), "status"] == "failed"
    assert "constant" in res.loc[str(flat.SOPInstanceUID), "reason"]
    assert not (node.dirs["sr"] / f"{flat.SOPInstanceUID}.dcm").exists()
    assert not hidden_files(node.settings.output_dir)
    assert not phi_hits([node.settings.output_dir])
    TALLY.handled("node: bad objects")


@pytest.mark.parametrize(("case", "calling", "called", "reason"), [
    ("node: wrong called AE title", "FAULTSCU", "NOTSALAD", "called AE title 'NOTSALAD' is not this node's"),
    ("node: unknown calling AE title", "INTRUDER", "SALAD", "calling AE title 'INTRUDER' is not allowed"),
])
def test_node_refuses_wrong_ae_titles(case, calling, called, reason, node):
    assoc = _associate(node.port, calling=calling, called=called)
    assert not assoc.is_established and assoc.is_rejected
    # pynetdicom fires EVT_REJECTED after the A-ASSOCIATE-RJ is sent: the peer can see the rejection before
    # the node's handler has audited it (a fresh clone under load read an empty log), so wait for the record
    deadline = time.monotonic() + 30
    while not (events := [e for e in _events(node) if e["event"] == "association_rejected"]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(events) == 1 and reason in events[0]["reason"]
    assert events[0]["calling_ae"] == calling and events[0]["called_ae"] == called
    assert not list(node.dirs["incoming"].iterdir()) and len(node.results()) == 0
    TALLY.handled(case)


def test_node_refuses_an_sr(node, tmp_path):
    from pynetdicom.sop_class import ComprehensiveSRStorage

    from salad_med.dicom.sr import write_score_sr

    sr = write_score_sr(phantom_dicom(tmp_path / "src.dcm", seed=15), 0.5, tmp_path / "sr.dcm")
    assoc = _associate(node.port, sr=True)
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert str(ComprehensiveSRStorage) not in accepted  # refused at negotiation
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(sr)
    finally:
        assoc.release()
    assert not list(node.dirs["incoming"].iterdir()) and len(node.results()) == 0
    TALLY.handled("node: SR object sent")


# ------------------------------------------------------------------------ scores that mean nothing
def test_score_k_not_below_bank_size(cli, root, split):
    out = root / "k too big"
    res = cli("train", "--config", "demo", "--manifest", split, "--output", out, *_sets(TINY_OVERRIDES),
              "--set", "score.k=15")  # 15 normal training images form the bank
    assert_error(res, 2, "score.k=15", "15 normal training images", "--set score.k=")
    assert not (out / "last.pt").exists()
    TALLY.handled("score: K >= bank size at training")


def test_evaluate_refuses_constant_scores(cli, root, split, run):
    df = pd.read_csv(split)
    test = df["split"] == "test"
    df.loc[test, "source_path"] = df.loc[test, "source_path"].iloc[0]  # every test row: the same image
    manifest = root / "manifests" / "same_test_image.csv"
    manifest.parent.mkdir(exist_ok=True)
    df.to_csv(manifest, index=False)
    out = root / "constant eval"
    res = cli("evaluate", "--run", run, "--manifest", manifest, "--output", out, "--n-boot", 10)
    assert_error(res, 1, "test scores of", "are equal", "no metric is reported")
    assert not (out / "metrics.json").exists() and not (out / "scores.csv").exists()
    TALLY.handled("evaluate: constant scores")


def test_train_on_identical_images(cli, root, split):
    df = pd.read_csv(split)
    df["source_path"] = df["source_path"].iloc[5]
    manifest = root / "manifests" / "identical.csv"
    manifest.parent.mkdir(exist_ok=True)
    df.to_csv(manifest, index=False)
    out = root / "identical run"
    res = cli("train", "--config", "demo", "--manifest", manifest, "--output", out, *_sets(TINY_OVERRIDES))
    assert_error(res, 1, "no epoch gave validation scores that rank the images", "no best.pt written")
    assert not (out / "best.pt").exists() and not hidden_files(out)
    TALLY.handled("train: identical images (no spread)")


def test_train_into_a_finished_run(cli, run, split):
    before = {p.name: p.read_bytes() for p in run.glob("*.pt")}
    res = cli("train", "--config", "demo", "--manifest", split, "--output", run, *_sets(RUN_SETS))
    assert_error(res, 2, str(run), "already holds a run", "--resume", "--overwrite")
    assert {p.name: p.read_bytes() for p in run.glob("*.pt")} == before
    res = cli("train", "--output", run, "--resume")  # a finished run: nothing left to train
    assert res.exit_code == 0 and "for 3 epochs" in res.output, res.output
    TALLY.handled("train: into a finished run")


# ----------------------------------------------------------------------------------- PHI, tally
def test_no_patient_name_in_any_output(root, seen):
    inputs = list((root / "dicom in").rglob("*.dcm"))
    assert inputs and all(FAKE_PATIENT_NAME.encode() in p.read_bytes() for p in inputs[:3]), \
        "the DICOM inputs must carry the name searched for"
    hits = phi_hits([root], seen)
    assert not hits, hits
    assert len(seen) > 20 and not any(m in "\n".join(seen) for m in PHI_MARKERS)
    TALLY.handled("no patient name in any output")


def test_tally(capsys):
    """Print ``fault corpus: handled H / total T`` (on the terminal even when pytest captures output;
    under xdist only with ``-s``)."""
    line = TALLY.summary()
    with capsys.disabled():
        print(f"\n{line}")
    assert TALLY.done, "no fault case ran"
