"""Sharded training on 8 host devices, mesh ``(2, 4)`` named ``("data", "model")``.

The checks live in `tests/_sharded.py`, which runs in subprocesses (this pytest process's CPU
backend has 4 devices, fixed when it started), each with half of the core checks or half of the
rest (the slow set); each test here asserts one check's result, and
`test_the_process_exits_cleanly` that each subprocess ended without an abort. The cross-shard
merge itself is checked here, on one device.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile

import _sharded
import filelock
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_softmax_ce.kernels import _blocks, _tile

from jax_softmax_ce._options import Options

SCRIPT = pathlib.Path(__file__).with_name("_sharded.py")
ROOT = SCRIPT.parents[1]


# The README's test command runs a core of the checks, each feature with each implementation
# once; the slow set (CI) runs the rest. Each set runs in two halves, each half by one
# subprocess, once per test run: pytest-xdist's workers share its result through a file (the
# first to need a half runs it, under a lock, having first taken any half of its set that no
# worker has, and the others read it), so that two workers run the two halves side by side and
# no check runs twice, whichever worker gets which test. (xdist's own `--dist loadgroup` no
# longer groups tests on pytest 9.2, whose node ids it can no longer rename.)
CORE = {
    "jit_xla_both",
    "jit_auto_both",
    "jit_pallas_both",
    "vocab_parallel_xla_options",
    "vocab_parallel_pallas_masked",
    "fused_vocab_parallel_xla",
    "fused_vocab_parallel_pallas",
    "explicit_pallas_both",
    "fused_jit_xla",
    "fused_jit_pallas_vd",
    "aux_vocab_parallel_pallas",
    "aux_jit_pallas_both",
    "aux_fused_jit_xla",
    "readme_sharded_training",
}
HALVES = 2
GROUP = {}
for _set in ("core", "rest"):
    _names = [n for n in _sharded.CHECKS if (n in CORE) == (_set == "core")]
    GROUP.update({n: f"{_set}-{i % HALVES}" for i, n in enumerate(_names)})
GROUPS = sorted(set(GROUP.values()))


def slow_unless_core(group: str):
    return [pytest.mark.slow] if group.startswith("rest") else []


def _run_half(group: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    names = [name for name, g in GROUP.items() if g == group]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *names],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=ROOT,
        check=False,
    )
    return {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr}


def _claim(path: pathlib.Path, group: str) -> None:
    """Run ``group`` into ``path`` unless another worker runs it now or has run it."""
    lock = filelock.FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        return
    try:
        if not path.exists():
            path.write_text(json.dumps(_run_half(group)))
    finally:
        lock.release()


@functools.cache
def report(group: str) -> tuple[dict, dict]:
    """``(process, results)`` of the subprocess that runs the checks of ``group``: its return
    code, stdout and stderr, and each check's result by name."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:  # one process: functools.cache runs each half once
        done = _run_half(group)
    else:
        shared = pathlib.Path(tempfile.gettempdir()) / f"jax_softmax_ce-sharded-{run}"
        shared.mkdir(exist_ok=True)
        # This half first, then the other half of its set if no worker has taken it, so that the
        # workers run the halves side by side; then this half's result, once it is done.
        siblings = [g for g in GROUPS if g != group and g.split("-")[0] == group.split("-")[0]]
        for g in (group, *siblings):
            _claim(shared / f"{g}.json", g)
        with filelock.FileLock(str(shared / f"{group}.json") + ".lock"):
            done = json.loads((shared / f"{group}.json").read_text())
    results = {}
    for line in done["stdout"].splitlines():
        if line.startswith("{"):
            result = json.loads(line)
            results[result["check"]] = result
    return done, results


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=slow_unless_core(GROUP[n])) for n in _sharded.CHECKS]
)
def test_check(name):
    done, results = report(GROUP[name])
    assert name in results, f"the check did not report:\n{done['stderr'][-4000:]}"
    assert results[name]["ok"], results[name]["error"]


@pytest.mark.parametrize("group", [pytest.param(g, marks=slow_unless_core(g)) for g in GROUPS])
def test_the_process_exits_cleanly(group):
    done, results = report(group)
    failed = [name for name, result in results.items() if not result["ok"]]
    assert "Fatal Python error" not in done["stderr"], done["stderr"][-4000:]
    assert done["returncode"] == (1 if failed else 0), (done["returncode"], done["stderr"][-4000:])


@pytest.mark.slow
def test_two_processes_as_the_readme_says():
    """The README's multi-host recipe on this host: two processes of 4 CPU devices each, joined
    by `jax.distributed` into one ``(2, 4)`` mesh, each placing its own rows; the logits loss
    under ``jit`` (every implementation) and the fused loss in ``shard_map`` with the classes
    sharded match float64 (`tests/_multihost.py`)."""
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ)
    paths = [str(ROOT), str(SCRIPT.parent), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    script = SCRIPT.with_name("_multihost.py")
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(i), str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        for i in range(2)
    ]
    for i, process in enumerate(processes):
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-4000:]
        reports = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert reports and reports[0]["process"] == i, (out[-2000:], err[-2000:])
        failed = {name: error for name, error in reports[0]["errors"].items() if error}
        assert not failed, failed
        assert set(reports[0]["errors"]) == {"jit_xla", "jit_pallas", "jit_auto", "shard_map_fused"}


@pytest.mark.parametrize("confident", [False, True])
def test_row_states_of_vocabulary_shards_combine_as_one(confident):
    """`_tile.row_state_combine` of four shards' states (in shard order) is the state of the
    whole rows: the same max, the mass besides it to float32 relative accuracy (also where the
    max is in a later shard and the rest of the mass is 1e-13 of it), the same target and
    smoothing terms, and so the same loss as float64."""
    rng = np.random.default_rng(0)
    n, v, shards = 8, 64, 4
    z = rng.normal(size=(n, v)).astype(np.float32)
    labels = rng.integers(0, v, n).astype(np.int32)
    if confident:  # the label is the max by 30, in the last shard
        labels[:] = v - 3
        z[:, v - 3] = z.max(axis=1) + 30.0
    options = Options(label_smoothing=0.1)
    blocks = _blocks.Operands(
        labels=jnp.asarray(labels)[:, None], label_weight=jnp.ones((n, 1), jnp.float32)
    )

    def state(cols, col0):
        init = _tile.row_state_init(n, jnp.float32, smoothing=True)
        return _blocks.forward_step(options, init, jnp.asarray(cols), col0, True, True, blocks)

    width = v // shards
    parts = [state(z[:, i * width : (i + 1) * width], i * width) for i in range(shards)]
    combined = parts[0]
    for part in parts[1:]:
        combined = _tile.row_state_combine(combined, part)
    whole = state(z, 0)
    np.testing.assert_array_equal(combined.lse.m, whole.lse.m)
    z64 = z.astype(np.float64)
    m = z64.max(axis=1, keepdims=True)
    top = np.arange(v) == z64.argmax(axis=1)[:, None]
    r64 = np.where(top, 0.0, np.exp(z64 - m)).sum(axis=1, keepdims=True)  # besides the max
    np.testing.assert_allclose(combined.lse.r, r64, rtol=2e-6)
    for got, want in zip(jax.tree.leaves(combined)[2:], jax.tree.leaves(whole)[2:], strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-5)
    loss, _, _ = _tile.finish(
        combined, jnp.ones((n, 1), jnp.float32), jnp.full((1, 1), v, jnp.float32),
        label_smoothing=0.1, z_loss=0.0,
    )  # fmt: skip
    lse = m + np.log1p(r64)
    want = 0.9 * (lse[:, 0] - z64[np.arange(n), labels]) + 0.1 * np.mean(lse - z64, axis=1)
    np.testing.assert_allclose(loss[:, 0], want, rtol=2e-6)


@pytest.mark.parametrize("confident", [False, True])
def test_monitors_of_vocabulary_shards_combine_as_one(confident):
    """The `_tile.Monitor` part of `_tile.row_state_combine`: four shards' states, each formed
    with its own class ids and moved to global ones (`_tile.offset_argmax`), combine (in shard
    order) into the whole rows' state: the argmax the lowest global id at the max (a tie
    across shards, the max in a later shard), and lse, max_prob, entropy and target_logprob
    as float64, also where the max is in the last shard 30 above the rest, where the first
    shards have no finite logit, and where no shard has one (argmax -1)."""
    rng = np.random.default_rng(1)
    n, v, shards = 8, 64, 4
    width = v // shards
    z = rng.normal(size=(n, v)).astype(np.float32)
    labels = rng.integers(0, v, n).astype(np.int32)
    z[0, [5, 40]] = z[0].max() + 1.0  # a tie across shards 0 and 2: 5
    z[1, [50, 20]] = z[1].max() + 1.0  # across shards 3 and 1: 20
    z[2, :48] = -np.inf  # only the last shard has finite logits (and the label)
    labels[2] = 60
    z[3] = -np.inf  # none has
    if confident:  # the label is the max by 30, in the last shard
        labels[4:] = v - 3
        z[4:, v - 3] = z[4:].max(axis=1) + 30.0
    options = Options(aux=True)
    blocks = _blocks.Operands(
        labels=jnp.asarray(labels)[:, None], label_weight=jnp.ones((n, 1), jnp.float32)
    )

    def state(cols, col0):
        init = _blocks.state_init(options, n, jnp.float32)
        return _blocks.forward_step(options, init, jnp.asarray(cols), col0, True, True, blocks)

    combined = None
    for i in range(shards):
        local = blocks._replace(labels=blocks.labels - i * width)
        part = _blocks.forward_step(
            options,
            _blocks.state_init(options, n, jnp.float32),
            jnp.asarray(z[:, i * width : (i + 1) * width]),
            0,  # this shard's own class ids
            True,
            True,
            local,
        )
        part = part._replace(monitor=_tile.offset_argmax(part.monitor, float(i * width)))
        combined = part if combined is None else _tile.row_state_combine(combined, part)
    whole = state(z, 0)
    got = _tile.monitor_finish(combined.lse, combined.monitor)
    assert got.argmax.dtype == jnp.float32 and got.argmax.shape == (n, 1)
    np.testing.assert_array_equal(got.argmax, _tile.monitor_finish(whole.lse, whole.monitor).argmax)
    z64 = z.astype(np.float64)
    finite = np.isfinite(z64)
    has = finite.any(axis=1)
    want_argmax = np.where(has, np.argmax(np.where(finite, z64, -np.inf), axis=1), -1)
    assert list(want_argmax[:4]) == [5, 20, np.argmax(z64[2]), -1]
    np.testing.assert_array_equal(got.argmax[:, 0], want_argmax)
    m = np.where(has, np.max(np.where(finite, z64, -np.inf), axis=1), 0)[:, None]
    e = np.where(finite, np.exp(np.where(finite, z64 - m, 0)), 0)
    top = np.arange(v) == want_argmax[:, None]
    log_s = np.log1p(np.where(top, 0, e).sum(axis=1, keepdims=True))  # no cancellation at 1
    p = e / np.exp(log_s)
    lse = np.where(has, (m + log_s)[:, 0], -np.inf)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    target = np.where(has, (z64[np.arange(n), labels] - m[:, 0]) - log_s[:, 0], -np.inf)
    np.testing.assert_allclose(got.lse[:, 0], lse, rtol=1e-6)
    np.testing.assert_allclose(got.max_prob[:, 0], np.where(has, p.max(axis=1), 0), rtol=2e-6)
    np.testing.assert_allclose(got.entropy[:, 0], entropy, rtol=2e-5, atol=1e-30)
    np.testing.assert_allclose(got.target_logprob[:, 0], target, rtol=2e-6)
    assert got.argmax[3, 0] == -1 and got.max_prob[3, 0] == 0 and got.entropy[3, 0] == 0
    if confident:  # the entropy of a confident row is ~ 1e-12: relative accuracy kept
        assert np.all(entropy[4:] < 1e-9)


def test_vocab_axis_name_must_name_mesh_axes():
    import jax_softmax_ce as sce

    logits, labels = jnp.zeros((2, 3)), jnp.asarray([0, 1])
    with pytest.raises(TypeError, match="vocab_axis_name"):
        sce.softmax_cross_entropy_with_integer_labels(logits, labels, vocab_axis_name=3)
