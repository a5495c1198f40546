"""Sharded training on 8 host devices, mesh ``(2, 4)`` named ``("data", "model")``.

The checks live in `tests/_sharded.py`, which one subprocess runs (this pytest process's CPU
backend has 4 devices, fixed when it started); each test here asserts one check's result, and
`test_the_process_exits_cleanly` that the subprocess ended without an abort.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import _sharded
import pytest

SCRIPT = pathlib.Path(__file__).with_name("_sharded.py")
ROOT = SCRIPT.parents[1]


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
        check=False,
    )
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["check"]] = result
    return done, results


# What issue 16 asks and is not done yet, each with the reason; strict, so that a fix shows.
OPEN = {
    name: "the fused loss's XLA loops slice a vocabulary-sharded projection, which XLA's "
    "partitioner gathers (and the gradients come back replicated): no partitioning rule yet"
    for name in ("fused_jit_xla", "fused_jit_xla_vd", "fused_explicit_xla")
}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=OPEN[n], strict=True)) if n in OPEN else n
        for n in _sharded.CHECKS
    ],
)
def test_check(report, name):
    done, results = report
    assert name in results, f"the check did not report:\n{done.stderr[-4000:]}"
    assert results[name]["ok"], results[name]["error"]


def test_the_process_exits_cleanly(report):
    done, results = report
    failed = [name for name, result in results.items() if not result["ok"] and name not in OPEN]
    failed += [name for name in OPEN if not results.get(name, {"ok": False})["ok"]]
    assert "Fatal Python error" not in done.stderr, done.stderr[-4000:]
    assert done.returncode == (1 if failed else 0), (done.returncode, done.stderr[-4000:])
