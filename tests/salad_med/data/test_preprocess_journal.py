"""``salad-med preprocess`` journal (issue 11.6): a run killed with SIGKILL resumes where it stopped.

A real ``kill -9`` of a preprocess subprocess mid-run, then a rerun: the inputs journalled with
verified outputs are skipped, the rest (and any journalled output that was altered, and a torn
journal line) are redone. The journal of one shard lets any later run (another shard, unsharded)
skip what that shard finished.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from salad_med.cli.app import app
from salad_med.data.preprocess_job import Journal, journal_file_name, read_journals
from salad_med.synthetic.phantom import PhantomSpec, make_phantom, write_png
from tests.conftest import python_env

runner = CliRunner()
SIZE = 64


def _phantoms(root: Path, n: int) -> None:
    for i in range(n):
        spec = PhantomSpec(height=96, width=80, carrier=None, markers=False, anomaly=None)
        write_png(make_phantom(spec, seed=500 + i).image, root / "normal" / f"p{i:03d}.png")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines() if path.is_file() else []


def _complete(path: Path) -> list[dict]:
    out = []
    for line in _lines(path):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _cli(*args) -> object:
    return runner.invoke(app, ["preprocess", *map(str, args)])


@pytest.mark.slow
def test_kill_9_midway_then_rerun_skips_only_verified_outputs(tmp_path):
    """SIGKILL after >= 6 journalled inputs; the rerun skips exactly those whose files verify."""
    root, out = tmp_path / "in", tmp_path / "out"
    n = 60
    _phantoms(root, n)
    env = python_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "salad_med", "preprocess", "--dataset", "folder", "--input", str(root),
           "--output", str(out), "--size", str(SIZE), "--workers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    journal = out / journal_file_name()
    deadline = time.monotonic() + 180
    try:
        while len(_lines(journal)) < 6:
            assert proc.poll() is None, f"preprocess ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
            assert time.monotonic() < deadline, "no journal lines within 180 s (is the journal written?)"
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.csv").exists(), "killed before the end: no manifest yet"
    done = _complete(journal)
    assert 6 <= len(done) < n, len(done)
    assert len({r["image_id"] for r in done}) == len(done)
    # every journalled output is in place and complete (the line is written after the rename)
    for rec in done:
        for key in ("output", "mask"):
            path = out / rec[key]
            assert path.stat().st_size == rec[f"{key}_size"]
            Image.open(path).load()
    # sabotage: one journalled image truncated after the fact, and a line torn by a kill
    victim = done[0]
    bad = out / victim["output"]
    bad.write_bytes(bad.read_bytes()[: victim["output_size"] // 2])
    with open(journal, "a", encoding="utf-8") as fh:
        fh.write('{"v": 1, "image_id": "normal/p05')
    before = {r["image_id"]: (out / r["output"]).stat().st_mtime_ns for r in done[1:]}

    result = _cli("--dataset", "folder", "--input", root, "--output", out, "--size", SIZE, "--workers", 1)
    assert result.exit_code == 0, result.output
    skipped = len(done) - 1
    assert f"{skipped} skipped" in result.stdout and f"{n - skipped} ok" in result.stdout, result.stdout
    m = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("image_id")
    assert (m["status"] != "failed").all() and len(m) == n
    assert m.loc[victim["image_id"], "status"] == "ok"  # the truncated output was redone, not trusted
    assert {i for i in m.index if m.loc[i, "status"] == "skipped"} == set(before)
    assert all((out / "images" / f"{i}.png").stat().st_mtime_ns == t for i, t in before.items())
    for i in m.index:  # every output complete, the manifest columns filled from the journal
        assert np.asarray(Image.open(m.loc[i, "output_path"])).shape == (SIZE, SIZE)
        assert float(m.loc[i, "mask_fraction"]) > 0 and int(m.loc[i, "orig_height"]) == 96
    # the journal now verifies every input (the torn line closed, new lines after it)
    from salad_med.config import Config
    from salad_med.data.preprocess_job import _settings, _settings_hash

    cfg = Config()
    cfg.preprocess.size = SIZE
    assert set(read_journals(out, _settings_hash(_settings(cfg, "folder")))) == set(m.index)


def test_journal_of_a_shard_lets_any_later_run_resume(tmp_path):
    """Shard 1/2 finished, shard 2/2 never run: the unsharded run skips shard 1's inputs."""
    root, out = tmp_path / "in", tmp_path / "out"
    _phantoms(root, 8)
    first = _cli("--dataset", "folder", "--input", root, "--output", out, "--size", SIZE, "--shard", "1/2")
    assert first.exit_code == 0, first.output
    shard1 = pd.read_csv(out / "manifest.shard-1-of-2.csv", keep_default_na=False)
    k = int((shard1["status"] == "ok").sum())
    assert 0 < k < 8 and len(_complete(out / journal_file_name((1, 2)))) == k
    again = _cli("--dataset", "folder", "--input", root, "--output", out, "--size", SIZE)
    assert again.exit_code == 0, again.output
    assert f"{k} skipped" in again.stdout and f"{8 - k} ok" in again.stdout, again.stdout
    # other settings: nothing journalled under them, everything redone
    other = _cli("--dataset", "folder", "--input", root, "--output", out, "--size", 48)
    assert other.exit_code == 0 and "8 ok" in other.stdout and "0 skipped" in other.stdout, other.stdout


def test_journal_appends_after_a_torn_line(tmp_path):
    path = tmp_path / "journal.jsonl"
    path.write_text('{"v": 1, "image_id": "a"}\n{"v": 1, "ima', encoding="utf-8")
    with Journal(path) as j:
        j.append({"v": 1, "image_id": "b"})
    assert [r["image_id"] for r in _complete(path)] == ["a", "b"]
    with Journal(path, fresh=True) as j:
        j.append({"v": 1, "image_id": "c"})
    assert [r["image_id"] for r in _complete(path)] == ["c"]
