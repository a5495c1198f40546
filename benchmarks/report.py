"""Markdown tables and PNG plots from one harness record (the JSON that `run` writes)."""

from __future__ import annotations

import pathlib
from typing import Any

PASS_NAMES = {"forward": "forward", "forward_backward": "forward+backward"}


def _header(record: dict[str, Any]) -> list[str]:
    grid = record["grid"]
    shape = f"N={grid['n']}" + (f", D={grid['d']}" if "d" in grid else "")
    copy = record["calibration"]["copy"]["bytes_per_s"]
    matmul = ", ".join(
        f"{name} {m['flop_per_s'] / 1e9:.0f} GFLOP/s"
        for name, m in record["calibration"]["matmul"].items()
    )
    lines = [
        f"# {record['suite']} on {record['platform']} ({record['device_kind']}, "
        f"{record['host']['cpu']})",
        "",
        f"{record['date']}; jax {record['versions']['jax']}"
        + (f", torch {record['versions']['torch']}" if "torch" in record["versions"] else "")
        + f"; {shape}; median of {record['repeats']} after {record['warmup']} warm-up calls.",
        f"Measured copy bandwidth {copy / 1e9:.1f} GB/s; measured matmul {matmul}.",
        f"Command: `{record['command']}`",
    ]
    if "note" in record:
        lines += ["", f"Note: {record['note']}"]
    return [*lines, ""]


def _cell_time(row) -> str:
    return f"{1e3 * row['time']['median_s']:.2f}"


def _cell_memory(row) -> str:
    memory = row["memory"]
    temp = memory.get("temp_bytes")
    peak = memory.get("device_peak_bytes")
    parts = []
    if temp is not None:
        parts.append(f"{temp / 2**20:.1f}")
    if peak is not None:
        parts.append(f"peak {peak / 2**20:.0f}")
    return " / ".join(parts) or "-"


def _cell_throughput(row) -> str:
    t = row["throughput"]
    if "fraction_of_copy" in t:
        return f"{t['bytes_per_s'] / 1e9:.1f} GB/s ({100 * t['fraction_of_copy']:.0f}% of copy)"
    return f"{t['flop_per_s'] / 1e9:.1f} GFLOP/s ({100 * t['fraction_of_matmul']:.0f}% of matmul)"


def _section(
    record: dict[str, Any], dtype: str, pass_: str, skipped: dict[tuple[str, str], list[str]]
) -> list[str]:
    """The table of one dtype and pass: rows are implementations, one line per V. Cases that did
    not run go into ``skipped`` with their reason."""
    rows = [r for r in record["results"] if r["dtype"] == dtype and r["pass"] == pass_]
    rows.sort(key=lambda r: r["v"])  # a run may measure one V first (run.py --first-v)
    lines = [
        "| implementation | V | median ms | vs optax | temp MiB | throughput | loss max rel err |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    optax_time = {
        r["v"]: r["time"]["median_s"]
        for r in rows
        if r["implementation"].startswith("optax") and r["status"] == "ok"
    }
    for r in rows:
        if r["status"] != "ok":
            why = (r["implementation"], f"{r['status']}: {r['reason']}")
            skipped.setdefault(why, []).append(f"{dtype} {PASS_NAMES[pass_]} V={r['v']}")
            continue
        ratio = (
            f"{r['time']['median_s'] / optax_time[r['v']]:.2f}x" if r["v"] in optax_time else "-"
        )
        lines.append(
            f"| {r['implementation']} | {r['v']} | {_cell_time(r)} | {ratio} "
            f"| {_cell_memory(r)} | {_cell_throughput(r)} "
            f"| {r['errors'].get('loss_max_rel_error', float('nan')):.1e} |"
        )
    return lines


def markdown(record: dict[str, Any]) -> str:
    """One table per dtype and pass, then what was not measured and why."""
    lines = _header(record)
    results = record["results"]
    skipped: dict[tuple[str, str], list[str]] = {}  # (implementation, why) -> its cases
    for dtype in dict.fromkeys(r["dtype"] for r in results):
        for pass_ in dict.fromkeys(r["pass"] for r in results):
            lines += [f"## {dtype}, {PASS_NAMES[pass_]}", ""]
            lines += _section(record, dtype, pass_, skipped)
            lines.append("")
    if skipped:
        lines += ["## Not measured", ""]
        lines += [f"- {name}: {why} ({', '.join(cases)})" for (name, why), cases in skipped.items()]
        lines.append("")
    return "\n".join(lines)


# The README shows, for each results file present, one table (bf16 forward+backward, the case
# the goals are about) between markers, regenerated from the JSON by `python -m
# benchmarks.report` so that no number in it is typed by hand.
README_TABLES = ("ce_cpu", "linear_cpu", "ce_gpu", "linear_gpu", "compiled_memory")
README_CASE = ("bfloat16", "forward_backward")


def readme_table(record: dict[str, Any], source: str) -> str:
    """The README's table for one harness record: its date, device and bf16 forward+backward."""
    dtype, pass_ = README_CASE
    grid = record["grid"]
    shape = f"N={grid['n']}" + (f", D={grid['d']}" if "d" in grid else "")
    lines = [
        f"{record['suite']} on {record['device_kind']} ({record['host']['cpu']}), "
        f"{record['date'][:10]}, jax {record['versions']['jax']}; {dtype}, "
        f"{PASS_NAMES[pass_]}, {shape}, mean loss. From `{source}`.",
        "",
    ]
    skipped: dict[tuple[str, str], list[str]] = {}
    lines += _section(record, dtype, pass_, skipped)
    return "\n".join(lines)


def update_readme(readme: pathlib.Path, results: pathlib.Path) -> str:
    """README text with every marked table regenerated from ``results``; a table whose JSON is
    absent keeps a line that says so."""
    import json

    text = readme.read_text()
    for name in README_TABLES:
        start, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
        if start not in text:
            continue
        path = results / f"{name}.json"
        source = f"benchmarks/results/{path.name}"
        if path.exists() and name == "compiled_memory":
            body = compiled_memory_table(json.loads(path.read_text()), source)
        elif path.exists():
            body = readme_table(json.loads(path.read_text()), source)
        elif name.endswith("_gpu"):
            body = f"**Not measured yet**: no session so far has had a GPU (no `{name}.json`)."
        else:
            body = f"Not measured yet: no `{name}.json` in `benchmarks/results/`."
        i = text.index(start) + len(start)
        j = text.index(end, i)
        text = f"{text[:i]}\n{body}\n{text[j:]}"
    return text


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate README.md's benchmark tables.")
    root = pathlib.Path(__file__).resolve().parent.parent
    parser.add_argument("--readme", type=pathlib.Path, default=root / "README.md")
    parser.add_argument("--results", type=pathlib.Path, default=root / "benchmarks" / "results")
    args = parser.parse_args(argv)
    args.readme.write_text(update_readme(args.readme, args.results))
    print(f"updated {args.readme}")


def plots(record: dict[str, Any], stem: pathlib.Path) -> list[pathlib.Path]:
    """``<stem>_time.png`` and ``<stem>_memory.png``: against V, one line per implementation,
    one panel per dtype and pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in record["results"] if r["status"] == "ok"]
    if not results:
        return []
    dtypes = list(dict.fromkeys(r["dtype"] for r in results))
    passes = list(dict.fromkeys(r["pass"] for r in results))
    metrics = {
        "time": ("median time (ms)", lambda r: 1e3 * r["time"]["median_s"]),
        "memory": ("JAX temp / torch peak (MiB)", lambda r: _memory_mib(r)),
    }
    written = []
    for metric, (label, value) in metrics.items():
        fig, axes = plt.subplots(
            len(passes), len(dtypes), figsize=(5 * len(dtypes), 3.6 * len(passes)), squeeze=False
        )
        for i, pass_ in enumerate(passes):
            for j, dtype in enumerate(dtypes):
                ax = axes[i][j]
                rows = [r for r in results if r["dtype"] == dtype and r["pass"] == pass_]
                for name in dict.fromkeys(r["implementation"] for r in rows):
                    points = [
                        (r["v"], value(r))
                        for r in rows
                        if r["implementation"] == name and value(r) is not None
                    ]
                    if points:
                        ax.plot(*zip(*sorted(points), strict=True), marker="o", label=name)
                ax.set_xscale("log", base=2)
                ax.set_xlabel("V (classes)")
                ax.set_ylabel(label)
                ax.set_title(f"{record['suite']}, {dtype}, {PASS_NAMES[pass_]}")
                ax.grid(True, alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(
            f"{record['platform']} ({record['device_kind']}), {record['date'][:10]}", fontsize=9
        )
        fig.tight_layout()
        path = stem.with_name(f"{stem.name}_{metric}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _memory_mib(row) -> float | None:
    memory = row["memory"]
    value = memory.get("temp_bytes")
    if value is None:
        value = memory.get("device_peak_bytes")
    return None if value is None else value / 2**20


def _mib(x: int) -> str:
    return f"{x / 2**20:.1f}"


def compiled_memory_table(record: dict, source: str) -> str:
    """`benchmarks.compiled_memory`'s table: temporary memory (MiB and % of the logits) per
    implementation and target."""
    target_names = list(dict.fromkeys(r["target"] for r in record["results"]))
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    lines = [
        f"Compiled for each target on a CPU host, {record['date'][:10]} ({versions}); bf16, "
        f"value_and_grad of the mean loss; temporary memory in MiB (% of the bf16 logits). "
        f"From `{source}`.",
    ]
    for case, info in record["cases"].items():
        shape = " x ".join(f"{k}={v}" for k, v in info["shape"].items())
        title = "logits loss" if case == "logits" else "fused linear loss"
        lines += [
            "",
            f"{title}, {shape} (logits {_mib(info['logits_bytes'])} MiB):",
            "",
            "| implementation | " + " | ".join(target_names) + " |",
            "|---|" + "---:|" * len(target_names),
        ]
        rows = {
            (r["implementation"], r["target"]): r for r in record["results"] if r["case"] == case
        }
        for name in dict.fromkeys(name for name, _ in rows):
            cells = []
            for target in target_names:
                r = rows.get((name, target))
                if r is None:
                    cells.append("")
                elif r["status"] != "ok":
                    cells.append(r["status"])
                else:
                    cells.append(f"{_mib(r['temp_bytes'])} ({100 * r['temp_fraction']:.2f}%)")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    missing = {r["implementation"]: r["reason"] for r in record["results"] if r["status"] != "ok"}
    if missing:
        lines += ["", *(f"- {name}: {reason}" for name, reason in missing.items())]
    return "\n".join(lines)


def compiled_memory_plot(record: dict, path: pathlib.Path) -> None:
    """Temporary memory per implementation, one panel per case, one bar group per target."""
    import matplotlib
    import numpy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(record["cases"])
    fig, axes = plt.subplots(1, len(cases), figsize=(7 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        ok = [r for r in record["results"] if r["case"] == case and r["status"] == "ok"]
        temp = {(r["implementation"], r["target"]): r["temp_bytes"] / 2**20 for r in ok}
        names = list(dict.fromkeys(r["implementation"] for r in ok))
        target_names = list(dict.fromkeys(r["target"] for r in ok))
        width = 0.8 / max(len(names), 1)
        for k, name in enumerate(names):
            values = [temp.get((name, t), 0.0) for t in target_names]
            positions = numpy.arange(len(target_names)) + k * width
            ax.bar(positions, numpy.maximum(values, 1e-2), width, label=name)
        logits = record["cases"][case]["logits_bytes"] / 2**20
        ax.axhline(logits, color="k", linestyle="--", linewidth=0.8, label="the logits")
        goal = record["goals_by_case"][case]
        ax.axhline(goal * logits, color="g", linestyle=":", linewidth=0.8, label="goal")
        ax.set_yscale("log")
        ax.set_xticks(numpy.arange(len(target_names)) + 0.4 - width / 2, target_names)
        ax.set_ylabel("compiled temporary memory (MiB)")
        ax.set_title(f"{case}: value_and_grad, bf16")
        ax.legend(fontsize=7)
    fig.suptitle(f"compiled for each target on a CPU host, {record['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
