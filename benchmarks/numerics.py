"""Loss and gradient accuracy against float64 at confident predictions (issue 15).

    python -m benchmarks.numerics [--quick] [--out DIR]

Logits ``[len(MARGINS) * len(SPREADS), V]``: in each row the label's logit is ``margin`` above
the runner-up at 0 (``1 - p_t`` far below float32's epsilon from margin 17 on), the other logits
normal below it with a standard deviation from flat to peaked, the label at a random position.
Each implementation computes the per-example losses and the logits gradient of their sum in one
``jit`` call, in float32, bfloat16 and float16, for V in {3, 1000, 32000}, without options and
with ``label_smoothing=0.1, z_loss=1e-4``. The float64 truth is ``tests/numpy_reference.py``
(imported from the repository, not copied), evaluated on the logits rounded to the dtype.

Per case and margin (the worst of the margin's rows): the loss's relative error; the gradient's
relative error per entry, over entries with ``|g| >= 1e-30`` (XLA on the CPU flushes subnormals);
the gradient's error relative to the size of its terms (``c p_k - a_k`` can cancel to any size
with options); the target entry's relative error; for 16-bit dtypes the distance in units in the
last place from the float64 gradient rounded to the dtype.

Ours: ``"xla"``, ``"reference"``, ``Pallas(schedule="tpu"|"gpu", interpret=True)`` and the fused
``linear_softmax_cross_entropy`` on ``I @ logits`` (identity inputs ``[N, N]``, the logits as
the ``[D, V]`` weight, whose gradient is then the logits gradient; V <= 4096 only). Peers: optax
and PyTorch, with the options they have (label smoothing; neither has a z-loss: recorded as
unsupported, and measured against the reference without it).

Writes ``numerics_<platform>[_quick].json`` (everything measured), ``.md`` (generated summary)
and ``.png`` (error against margin) to ``benchmarks/results/`` or ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import pathlib
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jax_softmax_ce as sce
from jax_softmax_ce import _benchmark

REPO = pathlib.Path(__file__).resolve().parent.parent
REFERENCE = "tests/numpy_reference.py"
RESULTS = REPO / "benchmarks" / "results"

MARGINS = (0, 1, 2, 5, 10, 20, 30, 40, 50, 60)
SPREADS = (0.5, 1.0, 2.0, 4.0)  # the other logits' standard deviation: flat to peaked
VOCABULARIES = (3, 1000, 32000)
QUICK_MARGINS = (0, 10, 30, 60)
QUICK_VOCABULARIES = (3, 1000)
DTYPES = ("float32", "bfloat16", "float16")
QUICK_DTYPES = ("float32", "bfloat16")
OPTIONS = {"plain": {}, "options": {"label_smoothing": 0.1, "z_loss": 1e-4}}
FUSED_MAX_V = 4096  # the fused loss runs on I @ logits: measured for small vocabularies only
TINY = 1e-30  # XLA on the CPU flushes float32 subnormals: smaller entries are not judged
# Issue 15's goals, metric <= bound, by dtype and option set. With options a float32 gradient
# entry is a difference c p_k - a_k that may cancel to any size: it is judged against its terms.
_SIXTEEN_BIT_GOALS = {"loss_rel": 1e-6, "ulps": 1}
GOALS = {
    "float32": {
        "plain": {"loss_rel": 1e-6, "grad_rel": 1e-5},
        "options": {"loss_rel": 1e-6, "grad_terms": 1e-5},
    },
    "bfloat16": {"plain": _SIXTEEN_BIT_GOALS, "options": _SIXTEEN_BIT_GOALS},
    "float16": {"plain": _SIXTEEN_BIT_GOALS, "options": _SIXTEEN_BIT_GOALS},
}


def _numpy_reference():
    """``tests/numpy_reference.py``, the one float64 reference, imported by its path."""
    path = REPO / REFERENCE
    spec = importlib.util.spec_from_file_location("numpy_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


numpy_reference = _numpy_reference()


def confident_logits(num_classes: int, margins, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``[len(margins) * len(SPREADS), V]`` float64 logits, margin by margin, and their labels."""
    return numpy_reference.confident_logits(num_classes, margins, SPREADS, seed=seed)


ulps = numpy_reference.ulps


def library_state() -> dict[str, Any]:
    """Where ``jax_softmax_ce`` was imported from, its git commit, and the library files that
    differ from that commit (the measured code is the commit only when there are none)."""
    package = pathlib.Path(sce.__file__).resolve().parent
    state: dict[str, Any] = {"path": str(package)}
    try:
        git = ["git", "-C", str(package.parent)]
        state["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            [
                *git,
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                "jax_softmax_ce",
                "kernels",
                REFERENCE,
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        state["modified"] = [line[3:] for line in changed.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        state["commit"] = None
    return state


# (logits in the dtype, int32 labels, options) -> (per-example losses, gradient of their sum)
Run = Callable[[jax.Array, np.ndarray, dict[str, float]], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class Candidate:
    name: str
    ours: bool
    run: Run
    supports: tuple[str, ...] = ("label_smoothing", "z_loss")
    max_v: int | None = None
    labels_note: str | None = None


def _loss_and_grad(loss_of, x):
    """``(loss, d sum(loss) / d x)`` of a per-example loss function, jitted."""

    def total(x):
        loss = loss_of(x)
        return jnp.sum(loss), loss

    grad, loss = jax.jit(jax.grad(total, has_aux=True))(x)
    return loss, grad


def _ours_logits(implementation) -> Run:
    def run(logits, labels, opts):
        return _loss_and_grad(
            lambda z: sce.softmax_cross_entropy_with_integer_labels(
                z, labels, implementation=implementation, **opts
            ),
            logits,
        )

    return run


def _ours_fused(implementation) -> Run:
    def run(logits, labels, opts):
        inputs = jnp.eye(logits.shape[0], dtype=logits.dtype)
        return _loss_and_grad(  # the weight [D = N, V] is the logits: I @ w
            lambda w: sce.linear_softmax_cross_entropy(
                inputs, w, labels, implementation=implementation, **opts
            ),
            logits,
        )

    return run


def _optax(optax) -> Run:
    def run(logits, labels, opts):
        if opts:
            targets = optax.smooth_labels(
                jax.nn.one_hot(labels, logits.shape[1]), opts["label_smoothing"]
            )
            return _loss_and_grad(lambda z: optax.softmax_cross_entropy(z, targets), logits)
        return _loss_and_grad(
            lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels), logits
        )

    return run


def _torch(torch) -> Run:
    def run(logits, labels, opts):
        host = np.array(logits.astype(jnp.float32))  # exact: the values are already rounded
        z = torch.from_numpy(host).to(getattr(torch, str(logits.dtype))).requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(
            z, torch.from_numpy(labels).long(), reduction="none", **opts
        )
        loss.sum().backward()
        return loss.detach().float().numpy(), z.grad.float().numpy()

    return run


def candidates() -> list[Candidate]:
    """Ours, then the peers that are installed (a missing peer is a `Candidate` that raises)."""
    pallas = {s: sce.Pallas(schedule=s, interpret=True) for s in ("tpu", "gpu")}
    found = [
        Candidate("xla", True, _ours_logits("xla")),
        Candidate("reference", True, _ours_logits("reference")),
        Candidate("pallas-tpu", True, _ours_logits(pallas["tpu"])),
        Candidate("pallas-gpu", True, _ours_logits(pallas["gpu"])),
        Candidate("linear:xla", True, _ours_fused("xla"), max_v=FUSED_MAX_V),
        Candidate("linear:pallas-tpu", True, _ours_fused(pallas["tpu"]), max_v=FUSED_MAX_V),
        Candidate("linear:pallas-gpu", True, _ours_fused(pallas["gpu"]), max_v=FUSED_MAX_V),
    ]
    for name, wrap, note in (
        (
            "optax",
            _optax,
            "label_smoothing: optax.smooth_labels(jax.nn.one_hot(labels, V)) "
            "(float32) into optax.softmax_cross_entropy",
        ),
        ("torch", _torch, "label_smoothing: F.cross_entropy(..., label_smoothing=e)"),
    ):
        try:
            module = importlib.import_module(name)
        except ImportError as e:
            reason = f"{name} is not installed: {e}"

            def run(*_, reason=reason):
                raise ImportError(reason)

            found.append(Candidate(name, False, run, ()))
            continue
        found.append(Candidate(name, False, wrap(module), ("label_smoothing",), None, note))
    return found


def _per_margin(per_row: np.ndarray, n_margins: int) -> list:
    """The worst row of each margin, rounded to 3 digits; None where a value was not finite
    (JSON has no infinity) or nothing was judged."""
    worst = per_row.reshape(n_margins, len(SPREADS)).max(axis=1)
    return [float(f"{x:.3g}") if np.isfinite(x) else None for x in worst]


def _row_max(values: np.ndarray, judged: np.ndarray) -> np.ndarray:
    """Per row, the max of ``values`` over judged entries (inf for NaN); NaN where none is."""
    values = np.where(np.isnan(values), np.inf, values)
    worst = np.where(judged, values, -np.inf).max(axis=1)
    return np.where(judged.any(axis=1), worst, np.nan)


def errors(loss, grad, exact, labels, dtype: str, n_margins: int) -> dict[str, list | None]:
    """The metrics of one case, margin by margin, against ``exact`` (a numpy_reference.Result)."""
    loss = np.asarray(loss, np.float64)
    grad = np.asarray(grad, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        loss_rel = np.abs(loss - exact.loss) / np.abs(exact.loss)
        loss_rel = np.where(loss == exact.loss, 0.0, loss_rel)
        judged = np.abs(exact.dlogits) >= TINY
        diff = np.abs(grad - exact.dlogits)
        rel = diff / np.abs(exact.dlogits)
        terms = diff / exact.dlogits_terms
    rows = np.arange(len(labels))
    target = np.zeros_like(judged)
    target[rows, labels] = True
    out = {
        "loss_rel": _per_margin(
            _row_max(loss_rel[:, None], np.ones((len(rows), 1), bool)), n_margins
        ),
        "grad_rel": _per_margin(_row_max(rel, judged), n_margins),
        "grad_terms": _per_margin(_row_max(terms, judged), n_margins),
        "target_rel": _per_margin(_row_max(rel, judged & target), n_margins),
        "ulps": None,
    }
    if dtype != "float32":
        distance = ulps(grad, exact.dlogits, jnp.dtype(dtype)).astype(np.float64)
        if not np.isfinite(grad).all():
            distance = np.where(np.isfinite(grad), distance, np.inf)
        worst = _row_max(distance, np.ones_like(judged))
        out["ulps"] = [None if np.isinf(x) else int(x) for x in worst.reshape(n_margins, -1).max(1)]
    return out


def measure(candidate: Candidate, problem, exact, dtype: str, n_margins: int) -> dict[str, Any]:
    """One case: its status and, when it ran, its metrics by margin."""
    logits, labels, opts = problem
    try:
        loss, grad = candidate.run(logits, labels, opts)
    except NotImplementedError as e:
        return {"status": "refused", "reason": f"NotImplementedError: {e}"}
    except ImportError as e:
        return {"status": "skipped", "reason": str(e)}
    except Exception as e:  # recorded, and the run goes on
        lines = traceback.format_exception_only(type(e), e)
        return {"status": "failed", "reason": "".join(lines).strip()[-500:]}
    loss = np.asarray(jnp.asarray(loss).astype(jnp.float32), np.float64)
    grad = np.asarray(jnp.asarray(grad).astype(jnp.float32), np.float64)
    return {"status": "ok", **errors(loss, grad, exact, labels, dtype, n_margins)}


def run(*, quick: bool) -> dict[str, Any]:
    margins = QUICK_MARGINS if quick else MARGINS
    vocabularies = QUICK_VOCABULARIES if quick else VOCABULARIES
    dtypes = QUICK_DTYPES if quick else DTYPES
    found = candidates()
    env = _benchmark.environment()  # after the peers' imports, so that it records their versions
    plan = [
        (c, v, dtype, option_set)
        for v in vocabularies
        for dtype in dtypes
        for option_set in OPTIONS
        for c in found
        if c.max_v is None or v <= c.max_v
    ]
    cases, references, problems = [], {}, {}
    started = time.perf_counter()
    progress = tqdm(plan, unit="case", mininterval=5)
    for candidate, v, dtype, option_set in progress:
        progress.set_description(f"V={v} {dtype} {option_set} {candidate.name}", refresh=False)
        if (v, dtype) not in problems:
            raw, labels = confident_logits(v, margins)
            problems[v, dtype] = jnp.asarray(raw, dtype), labels
        logits, labels = problems[v, dtype]
        case = {
            "implementation": candidate.name,
            "ours": candidate.ours,
            "dtype": dtype,
            "v": v,
            "options": option_set,
        }
        opts = OPTIONS[option_set]
        applied = {k: x for k, x in opts.items() if k in candidate.supports}
        if applied != opts:
            case["applied"] = applied
            case["unsupported"] = {k: x for k, x in opts.items() if k not in applied}
        key = (v, dtype, tuple(applied.items()))
        if key not in references:
            widened = np.asarray(logits.astype(jnp.float32), np.float64)
            references[key] = numpy_reference.cross_entropy(
                widened, labels, integer=True, **applied
            )
        start = time.perf_counter()
        result = measure(candidate, (logits, labels, applied), references[key], dtype, len(margins))
        case.update(result, seconds=round(time.perf_counter() - start, 2))
        if candidate.ours and result["status"] == "ok":
            case["above_goals"] = above_goals(case, margins)
        cases.append(case)
    notes = [
        f"The fused loss (linear:*) runs on I @ logits, measured for V <= {FUSED_MAX_V} only.",
        "Peers have no z-loss: their 'options' cases apply label_smoothing only and are compared "
        "with the float64 reference without the z-loss ('applied', 'unsupported').",
        "Per-entry relative errors are over entries with |g| >= 1e-30 of the float64 gradient; "
        "ulps over every entry.",
        "Metrics are lists over 'margins', each the worst of that margin's rows (one per spread).",
        "Pallas runs in interpret mode here. The interpreter runs the TPU schedule on float16, "
        "which the compiled TPU schedule refuses (Mosaic loads no float16 vectors).",
    ]
    notes += [f"{c.name}: {c.labels_note}" for c in found if c.labels_note]
    return {
        **env,
        "library": library_state(),
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
        "margins": list(margins),
        "spreads": list(SPREADS),
        "shapes": {"rows": len(margins) * len(SPREADS), "v": list(vocabularies)},
        "dtypes": list(dtypes),
        "options": OPTIONS,
        "tiny": TINY,
        "goals": GOALS,
        "notes": notes,
        "metrics": {
            "loss_rel": "max |loss - exact| / |exact|",
            "grad_rel": "max per-entry |g - exact| / |exact|, |exact| >= tiny",
            "grad_terms": "max per-entry |g - exact| / (size of the terms of exact), "
            "|exact| >= tiny",
            "target_rel": "|g_t - exact_t| / |exact_t| at the label, |exact_t| >= tiny",
            "ulps": "16-bit dtypes: max ulps from exact rounded to the dtype, every entry",
        },
        "cases": cases,
    }


def above_goals(case: dict[str, Any], margins) -> list[str]:
    """The goals that one measured case misses, as sentences ("margin 40: ulps 2 > 1")."""
    misses = []
    for metric, goal in GOALS[case["dtype"]][case["options"]].items():
        for margin, value in zip(margins, case[metric], strict=True):
            if value is None:
                misses.append(f"margin {margin}: {metric} not finite")
            elif value > goal:
                misses.append(f"margin {margin}: {metric} {value:.3g} > {goal:g}")
    return misses


def _fmt(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.1e}"


def _worst(values) -> float | int | None:
    values = [x for x in values if x is not None]
    return max(values) if values else None


# The summary's columns, (option set, metric): per-entry relative errors mean little in 16 bits
# (entries below the dtype's range round to 0), where the distance in ulps is the goal.
TABLE_COLUMNS = {
    "float32": [
        ("plain", "loss_rel"),
        ("options", "loss_rel"),
        ("plain", "grad_rel"),
        ("options", "grad_terms"),
        ("plain", "target_rel"),
    ],
    "16-bit": [
        ("plain", "loss_rel"),
        ("options", "loss_rel"),
        ("plain", "ulps"),
        ("options", "ulps"),
    ],
}


def _select(cases, name: str, dtype: str, option_set: str) -> list[dict[str, Any]]:
    return [
        c
        for c in cases
        if c["implementation"] == name and c["dtype"] == dtype and c["options"] == option_set
    ]


def markdown(record: dict[str, Any]) -> str:
    """The generated summary: worst per implementation and dtype, float32 by margin, our cases
    above the goals, and what was not measured."""
    ok = [c for c in record["cases"] if c["status"] == "ok"]
    names = list(dict.fromkeys(c["implementation"] for c in record["cases"]))
    library = record["library"]
    commit = (library["commit"] or "unknown")[:12]
    modified = library.get("modified")
    lines = [
        f"# Numerics on {record['platform']} ({record['device_kind']})",
        "",
        f"{record['date']}, jax {record['versions']['jax']}"
        + "".join(
            f", {k} {record['versions'][k]}" for k in ("optax", "torch") if k in record["versions"]
        )
        + f"; `{record['command']}`, {record['seconds']:.0f} s. Logits "
        f"[{record['shapes']['rows']}, V], V in {record['shapes']['v']}, margins "
        f"{record['margins']}, {len(record['spreads'])} rows per margin (spreads "
        f"{record['spreads']}); options: {record['options']['options']}. Generated from the "
        "JSON beside this file by `python -m benchmarks.numerics`.",
        "",
        f"The library at commit {commit}"
        + (f", with changes to {', '.join(modified)}." if modified else ", unmodified."),
        "",
        *[f"- {note}" for note in record["notes"]],
    ]
    for dtype in record["dtypes"]:
        columns = TABLE_COLUMNS["float32" if dtype == "float32" else "16-bit"]
        lines += [
            "",
            f"## {dtype}: the worst over V, margins and rows",
            "",
            "| implementation | " + " | ".join(f"{m} ({o})" for o, m in columns) + " |",
            "|---|" + "---:|" * len(columns),
        ]
        for name in names:
            sel = {o: _select(ok, name, dtype, o) for o in OPTIONS}
            if any(sel.values()):
                worst = [_fmt(_worst(x for c in sel[o] for x in c[m])) for o, m in columns]
                lines.append(f"| {name} | " + " | ".join(worst) + " |")
    margins = record["margins"]
    lines += [
        "",
        "## float32, no options: the gradient's max per-entry relative error by margin (worst V)",
        "",
        "| implementation | " + " | ".join(str(m) for m in margins) + " |",
        "|---|" + "---:|" * len(margins),
    ]
    for name in names:
        sel = _select(ok, name, "float32", "plain")
        if sel:
            by_margin = [_fmt(_worst(c["grad_rel"][i] for c in sel)) for i in range(len(margins))]
            lines.append(f"| {name} | " + " | ".join(by_margin) + " |")
    goals = "; ".join(
        f"{dtype} {option_set}: " + ", ".join(f"{k} <= {v:g}" for k, v in bounds.items())
        for dtype, by_options in record["goals"].items()
        for option_set, bounds in by_options.items()
    )
    lines += ["", "## Our cases above the goals", "", f"Goals: {goals}.", ""]
    missed = [c for c in ok if c["ours"] and c["above_goals"]]
    if not missed:
        lines.append("None: every measured case of ours meets the goals at every margin.")
    for case in missed:
        lines.append(
            f"- {case['implementation']}, {case['dtype']}, V={case['v']}, {case['options']}: "
            + "; ".join(case["above_goals"])
        )
    not_ok = [c for c in record["cases"] if c["status"] != "ok"]
    lines += ["", "## Not measured", ""]
    if not not_ok:
        lines.append("Every case in the plan ran.")
    for case in not_ok:
        lines.append(
            f"- {case['implementation']}, {case['dtype']}, V={case['v']}, {case['options']}: "
            f"{case['status']}: {case['reason']}"
        )
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: pathlib.Path) -> None:
    """Error against margin, worst over V: one column per dtype, one row per option set. float32
    shows the gradient's per-entry relative error (relative to its terms with options), 16-bit
    dtypes the ulps from the rounded float64 gradient."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in record["cases"] if c["status"] == "ok"]
    names = list(dict.fromkeys(c["implementation"] for c in ok))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    floor = 1e-10
    fig, axes = plt.subplots(
        2, len(record["dtypes"]), figsize=(5 * len(record["dtypes"]), 8.5), squeeze=False
    )
    for row, option_set in enumerate(OPTIONS):
        for col, dtype in enumerate(record["dtypes"]):
            ax = axes[row][col]
            if dtype == "float32":
                metric = "grad_rel" if option_set == "plain" else "grad_terms"
                goal, label = 1e-5, f"{metric} (0 drawn at {floor:g})"
                ax.set_yscale("log")
            else:
                metric, goal, label = "ulps", 1, "max ulps"
                ax.set_yscale("symlog", linthresh=1)
            for name in names:
                sel = [
                    c
                    for c in ok
                    if c["implementation"] == name
                    and c["dtype"] == dtype
                    and c["options"] == option_set
                ]
                if not sel:
                    continue
                ys = [_worst(c[metric][i] for c in sel) for i in range(len(record["margins"]))]
                if dtype == "float32":
                    ys = [None if y is None else max(y, floor) for y in ys]
                ys = [np.nan if y is None else y for y in ys]
                ours = sel[0]["ours"]
                ax.plot(
                    record["margins"],
                    ys,
                    label=name,
                    color=colours[name],
                    linestyle="-" if ours else "--",
                    marker="o" if ours else "x",
                    markersize=3,
                )
            ax.axhline(goal, color="black", linewidth=0.8, linestyle=":", label="goal")
            peers = " (peers: label smoothing only)" if OPTIONS[option_set] else ""
            ax.set_title(f"{dtype}, {option_set}{peers}")
            ax.set_xlabel("margin of the label's logit over the runner-up")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(f"Gradient error against float64, worst over V in {record['shapes']['v']}")
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5))
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> list[pathlib.Path]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.numerics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="margins 0, 10, 30, 60; V 3, 1000")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv)
    record = run(quick=args.quick)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / (f"numerics_{record['platform']}" + ("_quick" if args.quick else ""))
    written = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    written[0].write_text(json.dumps(record, separators=(",", ":")) + "\n")
    written[1].write_text(markdown(record))
    if not args.no_plot:
        written.append(stem.with_suffix(".png"))
        plot(record, written[-1])
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
