"""The collectives of a compiled program, read from its HLO text: what crosses devices.

`collectives` lists every ``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all`` and
``collective-permute`` (and their asynchronous ``-start`` forms) of
``jax.jit(f).lower(...).compile().as_text()`` with the bytes of its result per device and the
size of its device groups; `bytes_crossing` sums what each device sends (an estimate: a ring
all-gather or reduce-scatter sends ``(k - 1) / k`` of the gathered result, a ring all-reduce
twice that, an all-to-all ``(k - 1) / k`` of its operand and a permute all of it), each times
the runs of the computation that holds it: a collective in a ``while`` body runs once per trip
(the loop's ``known_trip_count``, as XLA writes it; nested loops multiply). The sharding tests use
them to prove that no logits-sized array is gathered; `benchmarks.sharded_bytes` reports them as
the goal's number.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}
_BYTES.update({"f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8})
_OP = re.compile(
    r"=\s*(?P<shape>\([^=]*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
    r"(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"(?P<dtype>[a-z]+[0-9]*)\[(?P<dims>[0-9,]*)\]")
_IOTA_GROUPS = re.compile(r"replica_groups=\[(?P<dims>[0-9,]+)\]<=")
_LIST_GROUPS = re.compile(r"replica_groups=\{\{(?P<first>[0-9,]*)\}")
_MESH_GROUPS = re.compile(r"replica_groups=mesh\[(?P<axes>[^\]]*)\][^{]*\{(?P<over>[^}]*)\}")
_PAIRS = re.compile(r"source_target_pairs=\{")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[^\s(]+)\s*\(.*\{\s*$")
_WHILE = re.compile(r"\swhile\(")
_LOOP_PARTS = re.compile(r"(?:body|condition)=%(?P<name>[^\s,]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(?P<n>[0-9]+)"\}')
_NAME = re.compile(r"%(?P<name>[^\s,(){}]+)")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of a compiled program.

    Attributes:
      kind: ``"all-gather"``, ``"all-reduce"``, ``"reduce-scatter"``, ``"all-to-all"`` or
        ``"collective-permute"``.
      shapes: the ``(dtype, dims)`` of each array of its result (several for a tuple).
      result_bytes: the bytes of its result on one device (for an asynchronous ``-start``,
        of the arrays it produces, not of its operands).
      group_size: how many devices each of its groups spans (2 for a permute).
      runs: how many times it runs per run of the program (the trip counts of the loops that
        hold it; a loop whose trip count XLA does not know counts once).
    """

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    result_bytes: int
    group_size: int
    runs: int = 1

    @property
    def bytes_sent(self) -> float:
        """What one device sends for it (ring algorithms)."""
        k = self.group_size
        if k <= 1:
            return 0.0
        if self.kind == "all-reduce":
            return 2.0 * self.result_bytes * (k - 1) / k
        if self.kind == "reduce-scatter":
            return float(self.result_bytes * (k - 1))
        if self.kind == "collective-permute":
            return float(self.result_bytes)
        return self.result_bytes * (k - 1) / k


def _arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (m["dtype"], tuple(int(d) for d in m["dims"].split(",") if d))
        for m in _ARRAY.finditer(shape)
        if m["dtype"] in _BYTES
    ]


def _group_size(line: str, kind: str, num_devices: int) -> int:
    if kind == "collective-permute" and _PAIRS.search(line):
        return 2
    named = _MESH_GROUPS.search(line)
    if named:
        sizes = dict(re.findall(r"'([^']+)'=([0-9]+)", named["axes"]))
        return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", named["over"]))
    iota = _IOTA_GROUPS.search(line)
    if iota:
        return int(iota["dims"].split(",")[-1])
    listed = _LIST_GROUPS.search(line)
    if listed and listed["first"]:
        return len(listed["first"].split(","))
    return num_devices


def _runs(lines: list[str]) -> list[int]:
    """How many times each line's computation runs per run of the program.

    HLO text writes every computation before those that call it, the entry last: walked
    backwards, each computation's runs are known before it passes them on to its callees,
    times the trip count for a ``while`` loop's body and condition."""
    owner, order, calls = [], [], {}
    for line in lines:
        header = _COMPUTATION.match(line)
        if header:
            order.append(header["name"])
            calls[header["name"]] = []
        elif order and line[:1].isspace():
            loop = _WHILE.search(line)
            trips = _TRIP_COUNT.search(line) if loop else None
            loop_parts = set(_LOOP_PARTS.findall(line)) if loop else set()
            for name in _NAME.findall(line):
                factor = int(trips["n"]) if trips and name in loop_parts else 1
                calls[order[-1]].append((name, factor))
        owner.append(order[-1] if order else None)
    runs = dict.fromkeys(order, 0)
    if order:
        runs[order[-1]] = 1
    for name in reversed(order):
        for callee, factor in calls[name]:
            if callee in runs and callee != name:
                runs[callee] += runs[name] * factor
    return [max(runs.get(name, 1), 1) if name else 1 for name in owner]


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """The collectives of a compiled program's HLO text (``compiled.as_text()``) for
    ``num_devices`` devices (the group size of a collective whose groups are not written out)."""
    found = []
    lines = hlo_text.splitlines()
    for line, runs in zip(lines, _runs(lines), strict=True):
        match = _OP.search(line)
        if match is None:
            continue
        kind = match["kind"]
        arrays = _arrays(match["shape"])
        if match["start"] and len(arrays) > 1 and kind != "all-reduce":
            # An asynchronous start returns (operands, results, ...): keep the results.
            arrays = arrays[len(arrays) // 2 :]
        size = sum(_BYTES[d] * math.prod(dims) for d, dims in arrays)
        group = _group_size(line, kind, num_devices)
        found.append(Collective(kind, tuple(arrays), size, group, runs))
    return found


def largest_gather(hlo_text: str, num_devices: int) -> int:
    """The largest number of elements in one array that an all-gather (or all-to-all) of the
    program produces; 0 where there is none."""
    sizes = [
        math.prod(dims)
        for c in collectives(hlo_text, num_devices)
        if c.kind in ("all-gather", "all-to-all")
        for _, dims in c.shapes
    ]
    return max(sizes, default=0)


def bytes_crossing(hlo_text: str, num_devices: int) -> float:
    """The bytes that one device sends per run of the program, summed over its collectives
    and their runs."""
    return sum(c.bytes_sent * c.runs for c in collectives(hlo_text, num_devices))
