"""The worker pool of ``salad-med preprocess --workers N``: a dying worker neither hangs nor loses a run.

Each case runs in a subprocess with a time limit: before the pool was made crash-aware, a worker killed
mid-task (the OS's out-of-memory killer, a crashing decoder) or a worker that could not build the pipeline
left ``multiprocessing.Pool`` waiting forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
#: Generous: both cases take ~5-10 s on 2 cores (forkserver start + a few pools); a hang never ends.
LIMIT_S = 180


def die_on_poison(task: tuple[str, str, str, str]) -> dict:
    """Stand-in for ``_work``: the worker process dies (as if killed) on an input named ``poison*``."""
    if Path(task[1]).name.startswith("poison"):
        os._exit(9)
    return {"image_id": task[0], "status": "ok", "reason": "", "pid": os.getpid()}


def _run(code: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                              timeout=LIMIT_S, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker pool hung (no result within {LIMIT_S} s)")


def test_an_input_that_kills_its_worker_is_a_failed_row_and_every_other_input_is_done():
    code = """
import json
from salad_med.data.preprocess_job import _run_tasks
from tests.salad_med.data.test_preprocess_workers import die_on_poison
if __name__ == "__main__":
    names = ["a", "b", "poison", "c", "d", "e", "f", "g", "h", "i"]
    tasks = [(n, f"/in/{n}.png", f"/out/{n}.png", f"/out/{n}_mask.png") for n in names]
    rows = list(_run_tasks(tasks, 2, ("folder", 32, {}, 8), work=die_on_poison))
    print(json.dumps(rows))
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    by_id = {r["image_id"]: r for r in rows}
    assert len(rows) == 10 and len(by_id) == 10  # every input exactly once
    assert by_id["poison"]["status"] == "failed"
    assert "worker process died" in by_id["poison"]["reason"]
    assert all(r["status"] == "ok" for k, r in by_id.items() if k != "poison")
    assert len({r["pid"] for r in rows if "pid" in r}) >= 2  # they ran in the pool's processes


def test_a_pipeline_the_workers_cannot_build_is_an_error_not_a_hang():
    code = """
from salad_med.data.preprocess_job import _run_tasks
if __name__ == "__main__":
    tasks = [(n, f"/in/{n}.png", f"/out/{n}.png", f"/out/{n}_mask.png") for n in "abc"]
    list(_run_tasks(tasks, 2, ("no-such-dataset", 32, {}, 8)))
"""
    proc = _run(code)
    assert proc.returncode != 0
    assert "could not build the pipeline" in proc.stderr
    assert "no-such-dataset" in proc.stderr
