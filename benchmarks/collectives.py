"""The collectives of a compiled program, read from its HLO text: what crosses devices.

`collectives` lists every ``all-gather``, ``all-reduce``, ``reduce-scatter``, ``all-to-all`` and
``collective-permute`` (and their asynchronous ``-start`` forms) of
``jax.jit(f).lower(...).compile().as_text()`` with the bytes of its result per device and the
size of its device groups; `bytes_crossing` sums what each device sends (an estimate: a ring
all-gather or reduce-scatter sends ``(k - 1) / k`` of the gathered result, a ring all-reduce
twice that, an all-to-all ``(k - 1) / k`` of its operand and a permute all of it). The sharding
tests use them to prove that no logits-sized array is gathered; `benchmarks.sharded_bytes`
reports them as the goal's number.
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
    """

    kind: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    result_bytes: int
    group_size: int

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


def collectives(hlo_text: str, num_devices: int) -> list[Collective]:
    """The collectives of a compiled program's HLO text (``compiled.as_text()``) for
    ``num_devices`` devices (the group size of a collective whose groups are not written out)."""
    found = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if match is None:
            continue
        kind = match["kind"]
        arrays = _arrays(match["shape"])
        if match["start"] and len(arrays) > 1 and kind != "all-reduce":
            # An asynchronous start returns (operands, results, ...): keep the results.
            arrays = arrays[len(arrays) // 2 :]
        size = sum(_BYTES[d] * math.prod(dims) for d, dims in arrays)
        found.append(Collective(kind, tuple(arrays), size, _group_size(line, kind, num_devices)))
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
    """The bytes that one device sends per run of the program, summed over its collectives."""
    return sum(c.bytes_sent for c in collectives(hlo_text, num_devices))
