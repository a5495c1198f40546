"""Smoke tests of the main job and the benchmark harness on one tiny case each.

They run the real commands in subprocesses (the harness must not inherit this suite's x64 and
warning settings) and check the JSON they write. Nothing is asserted about time.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jax_softmax_ce import _benchmark

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_main_job_self_check_and_table(tmp_path):
    out = tmp_path / "main.json"
    result = _run(
        "-m", "jax_softmax_ce", "--n", "32", "--v", "300", "--dtype", "float32",
        "--repeats", "2", "--json", str(out),
    )  # fmt: skip
    assert "Self-check passed." in result.stdout
    assert "| optax |" in result.stdout
    header = (
        "| grad max abs err | grad max rel err | fwd+bwd ms: median [min, max] | time vs optax |"
    )
    assert header in result.stdout
    assert "grad rel err" in result.stdout  # in the self-check's lines
    record = json.loads(out.read_text())
    assert len(record["load_average_1min"]) == 2
    for field in ("date", "command", "platform", "device_kind", "versions", "rows"):
        assert field in record
    assert record["self_check_failures"] == []
    rows = {row["name"]: row for row in record["rows"]}
    xla = rows["jax_softmax_ce:xla"]
    assert xla["status"] == "ok"
    assert len(xla["time"]["repeats_s"]) == 2
    assert xla["memory"]["temp_bytes"] >= 0
    assert xla["errors"]["loss_max_rel_error"] < 1e-5
    assert xla["errors"]["grad_max_rel_error"] < 1e-5


def test_harness_tiny_case(tmp_path):
    _run(
        "-m", "benchmarks.run", "--suite", "all", "--device", "cpu", "--quick",
        "--n", "16", "--d", "8", "--v", "64", "--dtypes", "float32",
        "--passes", "forward_backward", "--repeats", "2", "--warmup", "1", "--out", str(tmp_path),
        "--only", "optax", "jax_softmax_ce:xla", "jax_softmax_ce:pallas", "torch:F.cross_entropy",
        "liger:LigerCrossEntropyLoss", "optax:x@w", "jax_softmax_ce.linear:xla",
        "jax_softmax_ce.linear:pallas", "cce:linear_cross_entropy",
    )  # fmt: skip
    for suite in ("ce", "linear"):
        record = json.loads((tmp_path / f"{suite}_cpu_quick.json").read_text())
        for field in ("date", "command", "device_kind", "versions", "calibration", "results"):
            assert field in record
        assert record["versions"]["jax"]
        assert record["calibration"]["copy"]["bytes_per_s"] > 0
        assert (tmp_path / f"{suite}_cpu_quick.md").read_text().startswith("# ")
        assert (tmp_path / f"{suite}_cpu_quick_time.png").stat().st_size > 0
        by_name = {r["implementation"]: r for r in record["results"]}
        for result in by_name.values():
            assert result["status"] in ("ok", "skipped", "failed")
            if result["status"] != "ok":
                assert result["reason"]
        assert not [r for r in by_name.values() if r["status"] == "failed"]
        ours = by_name["jax_softmax_ce:xla" if suite == "ce" else "jax_softmax_ce.linear:xla"]
        assert ours["status"] == "ok"
        assert len(ours["time"]["repeats_s"]) == 2
        assert ours["memory"]["temp_bytes"] >= 0
        assert "throughput" in ours


def test_reference_cross_entropy_matches_a_direct_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7))
    labels = np.array([0, 6, 3, 3, -100])
    loss, grad = _benchmark.reference_cross_entropy(logits, labels, ignore_index=-100)
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = -np.log(p[np.arange(4), labels[:4]])
    np.testing.assert_allclose(loss[:4], expected, rtol=1e-12)
    assert loss[4] == 0 and not grad[4].any()
    np.testing.assert_allclose(grad[:4].sum(1), 0, atol=1e-12)


def test_reference_cross_entropy_keeps_relative_accuracy_at_confident_rows():
    """The main job's float64 reference forms ``1 - p`` at the max without cancellation: at a
    margin of 60 its target entry is ``-r / (1 + r)``, not 0, and every entry and loss agrees
    with the tests' NumPy reference, with and without options."""
    import numpy_reference

    rng = np.random.default_rng(0)
    logits = -np.abs(rng.normal(0.0, 2.0, (6, 50)))
    labels = np.array([3, 7, 0, 49, 11, 20])
    logits[np.arange(6), labels] = [0.0, 1.0, 10.0, 30.0, 45.0, 60.0]
    logits[0, 5] = 0.0  # a tie at the max
    for options in ({}, {"label_smoothing": 0.1, "z_loss": 1e-3}):
        loss, grad = _benchmark.reference_cross_entropy(logits, labels, **options)
        exact = numpy_reference.cross_entropy(logits, labels, integer=True, **options)
        np.testing.assert_allclose(loss, exact.loss, rtol=1e-13, atol=0)
        error = np.abs(grad - exact.dlogits) / exact.dlogits_terms
        assert error.max() <= 1e-13
        if not options:
            np.testing.assert_allclose(grad, exact.dlogits, rtol=1e-12, atol=0)
            assert grad[5, labels[5]] < 0 and loss[5] > 0


def test_numerics_quick(tmp_path):
    """`python -m benchmarks.numerics --quick`: the record holds every metric by margin, and
    every float32 case of ours meets issue 15's goals."""
    _run("-m", "benchmarks.numerics", "--quick", "--out", str(tmp_path))
    (path,) = tmp_path.glob("numerics_*_quick.json")
    record = json.loads(path.read_text())
    for field in ("date", "versions", "margins", "spreads", "shapes", "options", "goals", "cases"):
        assert field in record
    assert path.with_suffix(".md").read_text().startswith("# Numerics")
    assert path.with_suffix(".png").stat().st_size > 0
    ours = {"xla", "reference", "pallas-tpu", "pallas-gpu", "linear:xla", "linear:pallas-tpu",
            "linear:pallas-gpu"}  # fmt: skip
    measured = {c["implementation"] for c in record["cases"] if c["status"] == "ok"}
    assert ours | {"optax"} <= measured
    f32 = [c for c in record["cases"] if c["ours"] and c["dtype"] == "float32"]
    assert {c["implementation"] for c in f32} == ours and {c["v"] for c in f32} == {3, 1000}
    for case in f32:
        assert case["status"] == "ok" and case["above_goals"] == [], case
        for metric in ("loss_rel", "grad_rel", "grad_terms", "target_rel"):
            assert len(case[metric]) == len(record["margins"])
        assert max(case["loss_rel"]) <= 1e-6
        judged = "grad_rel" if case["options"] == "plain" else "grad_terms"
        assert max(case[judged]) <= 1e-5, case
    bf16 = [c for c in record["cases"] if c["ours"] and c["dtype"] == "bfloat16"]
    assert bf16 and all(len(c["ulps"]) == len(record["margins"]) for c in bf16)


def test_options_cpu_quick(tmp_path):
    """`python -m benchmarks.options_cpu --quick`: every case measured for both sides, with
    their memory, and in float32 ours and optax's agree (so the comparison is of one loss)."""
    _run("-m", "benchmarks.options_cpu", "--quick", "--rounds", "1", "--repeats", "2",
         "--out", str(tmp_path))  # fmt: skip
    record = json.loads((tmp_path / "options_cpu_quick.json").read_text())
    for field in ("date", "versions", "problem", "loadavg_1min_before", "measured"):
        assert field in record
    cases = {"integer", "label_smoothing", "probability", "where", "temperature", "logit_softcap"}
    assert set(record["measured"]) == {"bfloat16", "float32"}
    for dtype, by_case in record["measured"].items():
        assert set(by_case) == cases
        for case in by_case.values():
            for who in ("ours", "optax"):
                assert len(case[who]["time"]["repeats_s"]) == 2
                assert case[who]["memory"]["temp_bytes"] >= 0
            if dtype == "float32":
                assert case["agreement"]["loss_rel_diff"] < 1e-6, case
                assert case["agreement"]["grad_max_abs_diff"] < 1e-6, case
    table = (tmp_path / "options_cpu_quick.md").read_text()
    assert table.startswith("# Options against optax") and "| float32 | where |" in table


def test_linear_cpu_script_and_filter_count(tmp_path):
    """The fused-linear CPU benchmark runs and records the filter; its NumPy tile count is
    checked on logits whose softmax is known: ``x = I`` and ``W = 60 I`` make ``p`` one-hot at
    the row's own class to within ``e^-60``, so the gradient ``p - onehot(label)`` is nonzero
    only where a row's label differs from its own class."""
    out = tmp_path / "linear.json"
    _run(
        "benchmarks/linear_cpu.py", "--shapes", "40x16x600", "--labels", "zipf",
        "--repeats", "1", "--block-n", "16", "--block-v", "128", "--out", str(out),
        "--methods", "ours_xla", "ours_xla_filter", "materialised_optax",
    )  # fmt: skip
    record = json.loads(out.read_text())
    assert record["goals"] is None and record["labels"] == "zipf"
    entry = {e["method"]: e for e in record["runs"][0]["results"]}["ours_xla_filter"]
    assert 0.0 <= entry["filter"]["skipped_tile_fraction"] <= 1.0
    assert entry["filter"]["max_abs_diff_d_weight"] <= entry["filter"]["max_abs_d_weight"]

    from benchmarks import linear_cpu
    from jax_softmax_ce import BlockSizes

    eye = np.eye(8)
    blocks = BlockSizes(4, 2)  # 2 row blocks x 4 vocabulary blocks
    fraction, tiles = linear_cpu.filter_skip_fraction(eye, 60 * eye, np.arange(8), 1e-6, blocks)
    assert (fraction, tiles) == (1.0, 8)  # every label is its row's argmax: nothing to keep
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 0])  # row 7 (row block 1) wants class 0, not 7:
    fraction, _ = linear_cpu.filter_skip_fraction(eye, 60 * eye, labels, 1e-6, blocks)
    assert fraction == 6 / 8  # tiles (1, 0) and (1, 3) are kept


def _result(name, suite, shape, median_s, *, status="ok", temp=0, output=0, peak=None, frac=None):
    result = {"implementation": name, "suite": suite, "dtype": "bfloat16",
              "pass": "forward_backward", "status": status, **shape}  # fmt: skip
    if status != "ok":
        return {**result, "reason": "not installed"}
    memory = {"temp_bytes": temp, "output_bytes": output, "device_peak_bytes": peak}
    throughput = {"fraction_of_copy": frac} if frac is not None else {}
    return {**result, "time": {"median_s": median_s}, "memory": memory, "throughput": throughput}


def test_gpu_goals_read_from_harness_json(tmp_path):
    """`benchmarks.goals` on a hand-made harness record whose ratios are known."""
    from benchmarks import goals

    ce_shape, lin_shape = {"n": 8, "v": 100}, {"n": 8, "d": 4, "v": 100}
    gradient = 8 * 100 * 2
    ce = {"results": [
        _result("optax", "ce", ce_shape, 3.0),
        _result("jax_softmax_ce:pallas", "ce", ce_shape, 1.0, peak=gradient, frac=0.9),
        _result("jax_softmax_ce:xla", "ce", ce_shape, 2.0, temp=10**6, output=gradient, frac=0.5),
        _result("liger:LigerCrossEntropyLoss", "ce", ce_shape, 1.5),
        _result("probe:mosaic_gpu", "ce", ce_shape, 2.0, peak=gradient, frac=0.85),
        _result("optax", "ce", {"n": 8, "v": 200}, 100.0),  # another case: ignored
    ]}  # fmt: skip
    linear = {"results": [
        _result("optax:x@w", "linear", lin_shape, 1.0, temp=1000),
        _result("jax_softmax_ce.linear:xla", "linear", lin_shape, 1.1, temp=10),
        _result("jax_softmax_ce.linear:pallas", "linear", lin_shape, 0, status="skipped"),
        _result("liger:LigerFusedLinearCrossEntropyLoss", "linear", lin_shape, 1.0),
    ]}  # fmt: skip
    (tmp_path / "ce.json").write_text(json.dumps(ce))
    (tmp_path / "linear.json").write_text(json.dumps(linear))
    summary = goals.summarise(
        tmp_path / "ce.json", tmp_path / "linear.json", ce_shape=ce_shape, linear_shape=lin_shape
    )
    pallas, xla = summary["ce"]["jax_softmax_ce:pallas"], summary["ce"]["jax_softmax_ce:xla"]
    assert pallas["bandwidth_fraction_of_copy"]["pass"] is True
    assert pallas["speedup_vs_optax"]["value"] == 3.0 and pallas["speedup_vs_optax"]["pass"]
    assert pallas["time_vs_liger"]["value"] == 1.0 / 1.5 and pallas["time_vs_liger"]["pass"]
    assert pallas["extra_memory_vs_gradient_plus_rows"]["pass"] is True
    assert xla["bandwidth_fraction_of_copy"]["pass"] is False
    assert xla["speedup_vs_optax"]["value"] == 1.5 and not xla["speedup_vs_optax"]["pass"]
    assert xla["time_vs_liger"]["pass"] is False
    assert xla["extra_memory_vs_gradient_plus_rows"]["pass"] is False  # temp + output > bound
    probe = summary["ce"]["probe:mosaic_gpu"]  # the Mosaic GPU probe, against the same goals
    assert probe["bandwidth_fraction_of_copy"]["value"] == 0.85
    assert probe["speedup_vs_optax"]["value"] == 1.5 and not probe["speedup_vs_optax"]["pass"]
    fused = summary["linear"]["jax_softmax_ce.linear:xla"]
    np.testing.assert_allclose(fused["time_vs_materialised"]["value"], 1.1)
    assert fused["time_vs_materialised"]["pass"] is True
    assert fused["temp_memory_vs_materialised"]["value"] == 0.01
    assert fused["time_vs_liger"]["pass"] is False  # 1.1 s against 1.0 s
    skipped = summary["linear"]["jax_softmax_ce.linear:pallas"]["time_vs_materialised"]
    assert skipped["pass"] is None and "skipped" in skipped["reason"]
    assert goals.summarise(tmp_path / "no.json", tmp_path / "linear.json")["ce"] is None


def test_readme_tables_are_generated_from_the_results():
    """The README's benchmark tables are exactly what `python -m benchmarks.report` makes of the
    committed JSON: no number in them is typed by hand, and none is stale."""
    from benchmarks import report

    readme = REPO / "README.md"
    assert "<!-- table:ce_cpu -->" in readme.read_text()
    assert report.update_readme(readme, REPO / "benchmarks" / "results") == readme.read_text()


def test_harness_measures_first_v_first_and_keeps_to_its_budget(tmp_path):
    _run(
        "-m", "benchmarks.run", "--suite", "ce", "--device", "cpu", "--quick", "--n", "8",
        "--v", "32", "64", "--dtypes", "float32", "bfloat16", "--passes", "forward",
        "--repeats", "1", "--warmup", "0", "--out", str(tmp_path), "--no-plots",
        "--only", "jax_softmax_ce:xla", "--first-v", "64", "--budget-s", "0",
    )  # fmt: skip
    record = json.loads((tmp_path / "ce_cpu_quick.json").read_text())
    order = [(r["v"], r["dtype"]) for r in record["results"]]
    assert order == [(64, "float32"), (64, "bfloat16"), (32, "float32"), (32, "bfloat16")]
    assert record["budget_s"] == 0
    for result in record["results"]:
        assert result["status"] == "skipped" and "time budget of 0 s" in result["reason"]


def test_gpu_session_script_runs_end_to_end_on_cpu(tmp_path):
    """The one-call device session, dry-run on the CPU with a tiny grid: its files come back
    in ``OUT`` as the device tool returns them, and ``unpack`` puts the results where the
    README's tables are generated from. With ``SESSION_S=240`` no time is left for the tests."""
    import os

    out, results = tmp_path / "out", tmp_path / "results"
    out.mkdir()
    results.mkdir()
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "SESSION_S": "240",
        "BENCH_ARGS": "--n 16 --d 8 --v 64 --dtypes bfloat16 --passes forward_backward "
        "--repeats 1 --warmup 0 --no-plots --only optax jax_softmax_ce:xla optax:x@w "
        "jax_softmax_ce.linear:xla",
    }
    script = str(REPO / "benchmarks" / "gpu_session.sh")
    session = subprocess.run(
        ["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert session.returncode == 0, session.stdout[-3000:] + session.stderr[-3000:]
    returned = sorted(p.name for p in out.iterdir())
    assert returned == ["device.txt", "goals_cpu.md", "gpu_session.tar.gz", "session.log"]
    log = (out / "session.log").read_text()
    assert "== bench" in log and "== goals" in log and "== tests" not in log

    # Into the committed results (no folder named), unpack takes a GPU run only.
    refused = subprocess.run(
        ["bash", script, "unpack", str(out)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1 and "nothing copied" in refused.stderr

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- table:ce_cpu -->\nold\n<!-- /table:ce_cpu -->\n")
    unpack = subprocess.run(
        ["bash", script, "unpack", str(out), str(results), str(readme)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unpack.returncode == 0, unpack.stdout[-3000:] + unpack.stderr[-3000:]
    for name in ("ce_cpu.json", "linear_cpu.json", "goals_cpu.json", "gpu_session.log"):
        assert (results / name).exists(), name
    record = json.loads((results / "ce_cpu.json").read_text())
    assert [r["status"] for r in record["results"]] == ["ok", "ok"]
    table = readme.read_text()
    assert "old" not in table and "| jax_softmax_ce:xla | 64 |" in table


def test_compiled_memory_table_and_plot(tmp_path):
    """`benchmarks.report` renders a compiled-memory record, hand-made with known numbers, as
    the README's table (MiB and % of the logits per target, the reason where a case did not
    compile) and a plot."""
    from benchmarks import report

    record = {
        "date": "2026-12-03T00:00:00+00:00",
        "versions": {"jax": "0.10.2"},
        "cases": {"logits": {"shape": {"N": 2, "V": 3}, "logits_bytes": 100 * 2**20}},
        "goals_by_case": {"logits": 0.01},
        "results": [
            {"implementation": "optax", "target": "v5e", "case": "logits", "status": "ok",
             "temp_bytes": 2**20, "temp_fraction": 0.01},
            {"implementation": "ours", "target": "h100", "case": "logits", "status": "failed",
             "reason": "NotImplementedError: x"},
        ],
    }  # fmt: skip
    table = report.compiled_memory_table(record, "x.json")
    assert "| implementation | v5e | h100 |" in table
    assert "| optax | 1.0 (1.00%) |  |" in table and "| ours |  | failed |" in table
    assert "- ours: NotImplementedError: x" in table
    report.compiled_memory_plot(record, tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 0


_LOOPS_HLO = """HloModule loops

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %inner_sum = f32[8]{0} all-reduce(%x), replica_groups={{0,1}}, to_apply=%add
}

%inner_cond (q: (s32[], f32[8])) -> pred[] {
  %q = (s32[], f32[8]{0}) parameter(0)
}

%outer_body (r: (s32[], f32[8])) -> (s32[], f32[8]) {
  %r = (s32[], f32[8]{0}) parameter(0)
  %inner = (s32[], f32[8]{0}) while(%r), condition=%inner_cond, body=%inner_body, \
backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[8]{0} get-tuple-element(%inner), index=1
  %gathered = f32[16]{0} all-gather(%y), replica_groups={{0,1}}, dimensions={0}
}

%outer_cond (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]{0}) parameter(0)
}

ENTRY %main (t: (s32[], f32[8])) -> f32[4] {
  %t = (s32[], f32[8]{0}) parameter(0)
  %outer = (s32[], f32[8]{0}) while(%t), condition=%outer_cond, body=%outer_body, \
backend_config={"known_trip_count":{"n":"5"}}
  %z = f32[4]{0} constant({1, 2, 3, 4})
  ROOT %last = f32[4]{0} all-reduce(%z), replica_groups={{0,1}}, to_apply=%add
}
"""


def test_collectives_count_every_run_of_a_loop():
    """A collective in a loop's body is counted once per trip, nested loops multiplying: the
    inner all-reduce 3 x 5 times, the all-gather 5 times, the entry's all-reduce once."""
    from benchmarks import collectives

    found = collectives.collectives(_LOOPS_HLO, 2)
    assert [(c.kind, c.result_bytes, c.group_size, c.runs) for c in found] == [
        ("all-reduce", 32, 2, 15),
        ("all-gather", 64, 2, 5),
        ("all-reduce", 16, 2, 1),
    ]
    # A ring all-reduce sends twice (k - 1) / k of its result, an all-gather (k - 1) / k.
    assert collectives.bytes_crossing(_LOOPS_HLO, 2) == 32 * 15 + 32 * 5 + 16


def test_gpu_tune_quick(tmp_path):
    """`benchmarks.gpu_tune --quick`, interpreted on the CPU: every configuration of its plan
    (optax, the logits kernel's blocks and a warp count, the fused loss's tiles with both
    backward schedules) is timed, none failed, and the record says where it ran."""
    out = tmp_path / "tune.json"
    _run("-m", "benchmarks.gpu_tune", "--quick", "--out", str(out), "--deadline-s", "250")
    record = json.loads(out.read_text())
    assert record["interpret"] is True and record["platform"] == "cpu"
    results = record["results"]
    assert not [r for r in results if "median_s" not in r], results
    assert all(r["median_s"] > 0 and len(r["repeats_s"]) == 5 for r in results)
    kinds = {(r["suite"], r["blocks"] is None, r.get("num_warps"), r.get("accumulator_bytes"))
             for r in results}  # fmt: skip
    assert kinds == {
        ("ce", True, None, None),
        ("ce", False, None, None),
        ("ce", False, 2, None),
        ("linear", True, None, None),
        ("linear", False, None, None),
        ("linear", False, None, 1),
    }
