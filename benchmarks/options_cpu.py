"""The options against optax on this host: time and temporary memory, option by option.

    python -m benchmarks.options_cpu [--rounds R] [--repeats K] [--quick] [--note TEXT]

For bfloat16 and float32 logits ``[2048, 32768]`` (``--quick``: ``[64, 1024]``),
``jit(value_and_grad)`` of the mean loss, ours (the default implementation) against the way an
optax user writes the same loss:

- ``integer``: integer labels; optax's ``softmax_cross_entropy_with_integer_labels``.
- ``label_smoothing``: integer labels smoothed by 0.1; optax's ``softmax_cross_entropy`` of
  ``smooth_labels(one_hot(labels), 0.1)``.
- ``probability``: probability labels (a softmax of random logits, in the logits' dtype); optax's
  ``softmax_cross_entropy``.
- ``where``: integer labels with a class mask ``[1, V]`` (its last ``V / 32`` classes off);
  optax's ``where=``, broadcast to the logits.
- ``temperature``: integer labels, ``T = 2``; optax on ``logits / 2``.
- ``logit_softcap``: integer labels, cap 30; optax on ``30 tanh(logits / 30)``.

Each case first checks that both sides compute the same loss (the relative difference of the
mean loss and the largest difference of a gradient entry, recorded as ``agreement``). The cases
run interleaved in rounds (so that a busy machine slows each alike). Every
implementation's compiled temporary memory comes from XLA's buffer assignment. Raw JSON (every
repeat) goes to ``benchmarks/results/options_cpu.json`` (``options_cpu_quick.json`` with
``--quick``), with a Markdown table beside it. Only ratios within one run are meaningful.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import optax

from jax_softmax_ce import _benchmark
from jax_softmax_ce import cross_entropy as ce

RESULTS = pathlib.Path(__file__).parent / "results"
SHAPE = (2048, 32768)
QUICK_SHAPE = (64, 1024)
NOTE = (
    "Only ratios measured in the same run (interleaved rounds) are meaningful; say with --note "
    "whether anything else ran on the machine."
)


def cases(v: int) -> dict:
    """``{case: (ours, optax's)}``: each ``f(logits, labels, extra) -> per-example losses``,
    ``labels`` integer or probability as the case needs (`problem`), ``extra`` the class mask."""
    ints = ce.softmax_cross_entropy_with_integer_labels
    o_ints = optax.softmax_cross_entropy_with_integer_labels

    def smoothed(z, y, _):
        onehot = jax.nn.one_hot(y, v, dtype=z.dtype)
        return optax.softmax_cross_entropy(z, optax.smooth_labels(onehot, 0.1))

    return {
        "integer": (lambda z, y, _: ints(z, y), lambda z, y, _: o_ints(z, y)),
        "label_smoothing": (lambda z, y, _: ints(z, y, label_smoothing=0.1), smoothed),
        "probability": (
            lambda z, q, _: ce.softmax_cross_entropy(z, q),
            lambda z, q, _: optax.softmax_cross_entropy(z, q),
        ),
        "where": (
            lambda z, y, m: ints(z, y, where=m),
            lambda z, y, m: o_ints(z, y, where=jnp.broadcast_to(m, z.shape)),
        ),
        "temperature": (
            lambda z, y, _: ints(z, y, temperature=2.0),
            lambda z, y, _: o_ints(z / 2.0, y),
        ),
        "logit_softcap": (
            lambda z, y, _: ints(z, y, logit_softcap=30.0),
            lambda z, y, _: o_ints(30.0 * jnp.tanh(z / 30.0), y),
        ),
    }


def problem(case: str, key, n: int, v: int, dtype) -> tuple:
    """``(logits, labels, mask)`` of a case; a label is never a masked class."""
    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k1, (n, v), jnp.float32).astype(dtype)
    if case == "probability":
        labels = jax.nn.softmax(jax.random.normal(k2, (n, v)), axis=-1).astype(dtype)
    else:
        labels = jax.random.randint(k2, (n,), 0, v - masked(v))
    mask = jnp.arange(v)[None, :] < v - masked(v)
    return logits, labels, mask


def masked(v: int) -> int:
    """The classes masked off at the end of the vocabulary in the ``where`` case."""
    return v // 32


def objective(per_example):
    return jax.value_and_grad(lambda z, y, m: jnp.mean(per_example(z, y, m)))


def measure(*, shape, rounds: int, repeats: int, note: str) -> dict:
    n, v = shape
    load_before = os.getloadavg()[0]
    table = cases(v)
    measured = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        dname = jnp.dtype(dtype).name
        nbytes = n * v * jnp.dtype(dtype).itemsize
        keys = jax.random.split(jax.random.key(0), _benchmark.copies_for(nbytes, at_most=3))
        args = {c: [problem(c, k, n, v, dtype) for k in keys] for c in table}
        fns = {
            (c, who): objective(f)
            for c, pair in table.items()
            for who, f in zip(("ours", "optax"), pair, strict=True)
        }
        memory = {k: _benchmark.compiled_memory(f, *args[k[0]][0]) for k, f in fns.items()}
        jitted = {k: jax.jit(f) for k, f in fns.items()}
        # The two sides compute the same loss: its value and gradient on the first arguments.
        agree = {}
        for c in table:
            (l_ours, g_ours), (l_optax, g_optax) = (
                jitted[c, who](*args[c][0]) for who in ("ours", "optax")
            )
            agree[c] = {
                "loss_rel_diff": abs(float(l_ours) - float(l_optax)) / abs(float(l_optax)),
                "grad_max_abs_diff": _benchmark.max_abs_error(g_ours, g_optax),
            }
        seconds: dict = {k: [] for k in fns}
        for _ in range(rounds):
            for k, f in jitted.items():
                seconds[k] += _benchmark.time_calls(f, args[k[0]], repeats=repeats).seconds
        measured[dname] = {
            c: {
                who: {
                    "time": _benchmark.Timing(tuple(seconds[c, who])).as_dict(),
                    "memory": memory[c, who],
                }
                for who in ("ours", "optax")
            }
            | {"agreement": agree[c]}
            for c in table
        }
    return {
        **_benchmark.environment(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.options_cpu",
        "note": note,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
        "problem": {"n": n, "v": v, "reduction": "mean", "masked_classes": masked(v)},
        "implementation": "default",
        "rounds": rounds,
        "repeats_per_round": repeats,
        "measured": measured,
    }


def markdown(record: dict) -> str:
    p = record["problem"]
    lines = [
        f"# Options against optax, `jit(value_and_grad(mean loss))`, [{p['n']}, {p['v']}]",
        "",
        f"{record['date']}, {record.get('device_kind', '')}, jax {record['versions']['jax']}, "
        f"load average {record['loadavg_1min_before']:.2f} before, "
        f"{record['loadavg_1min_after']:.2f} after. From `options_cpu.json`.",
        "",
        "| dtype | case | ours ms | optax ms | time vs optax | ours temp MiB | optax temp MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for dname, by_case in record["measured"].items():
        for case, r in by_case.items():
            ours, theirs = r["ours"], r["optax"]
            t_ours, t_theirs = ours["time"]["median_s"], theirs["time"]["median_s"]
            lines.append(
                f"| {dname} | {case} | {1e3 * t_ours:.1f} | {1e3 * t_theirs:.1f} | "
                f"{t_ours / t_theirs:.2f}x | {ours['memory']['temp_bytes'] / 2**20:.1f} | "
                f"{theirs['memory']['temp_bytes'] / 2**20:.1f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help=f"logits {QUICK_SHAPE}")
    parser.add_argument("--note", default=NOTE)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    record = measure(
        shape=QUICK_SHAPE if args.quick else SHAPE,
        rounds=args.rounds,
        repeats=args.repeats,
        note=args.note,
    )
    stem = "options_cpu_quick" if args.quick else "options_cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(record))
    print(markdown(record))
    print(f"wrote {args.out / (stem + '.json')}")


if __name__ == "__main__":
    main()
