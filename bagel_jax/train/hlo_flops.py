"""FLOPs of an HLO module with every while loop counted ``trip count`` times.

XLA's cost analysis (``compiled.cost_analysis()``, ``Lowered.cost_analysis()``) visits a while loop's body once,
so a scanned stack of L layers counts as one layer. ``loop_scaled_flops`` runs the same analysis (XLA's
``HloCostAnalysis`` on the host backend: it gives the TPU executable's own number for a TPU-compiled module) on the
whole module and on each loop body, and adds ``trip × body − body`` per loop, innermost first::

    scaled(C) = cost(C) + Σ_{loops W reached from C} (trip_W · scaled(body_W) − cost(body_W))
                        + Σ_{shard_map bodies M reached from C} (shards_M · scaled(M) − cost(M))

Trip counts come from the loop's ``known_trip_count`` backend config, else from its condition ``i < N`` (or
``i <= N``) with ``i`` starting at a constant (jax's scans count 0..N-1). A loop whose count cannot be read counts
once and is listed in ``unknown``. Works on compiled (per-device, after SPMD partitioning) and lowered (global,
before optimisation) HLO text. Pallas kernels (custom calls) count 0, as in XLA.

In lowered (global) HLO a ``shard_map`` region is a call of one chip's body (Shardy's
``xla.sdy.manual_computation_body``): it is counted once per distinct shard (the second sum above),
shards = the largest global / local size ratio of its inputs (chips holding a repeated shard add no model FLOPs);
a region whose inputs cannot be read counts once and is listed in ``unknown``. Compiled HLO has no such regions
(every op is already one chip's).
"""

from __future__ import annotations

import dataclasses
import functools
import re

_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*(->.*)?\{\s*$")
_WHILE = re.compile(r"while\((.*?)\),\s*condition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
_CALLED = re.compile(
    r"(?:to_apply|calls|body|condition|branch_computations|called_computations|true_computation|"
    r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)"
)
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_MANUAL_CALL = re.compile(r"\bcall\((.*?)\),\s*to_apply=%?(xla\.sdy\.manual_computation_body[\w.\-]*)")


@dataclasses.dataclass
class LoopFlops:
    """``flops``: loop-scaled total; ``raw``: XLA's count (each loop body once); ``loops``: (body, trip count)
    of each loop found; ``unknown``: loop bodies whose trip count could not be read (counted once)."""

    flops: float
    raw: float
    loops: list[tuple[str, int]]
    unknown: list[str]


def _split(text: str) -> tuple[dict[str, list[str]], str, str]:
    """HLO module text -> ({computation name: its lines, braces included}, entry name, module header line)."""
    comps: dict[str, list[str]] = {}
    entry, header, cur = "", "", None
    for line in text.splitlines():
        if cur is None:
            if line.startswith("HloModule"):
                header = line
                continue
            m = _COMP_HEAD.match(line.strip()) if line.rstrip().endswith("{") else None
            if m:
                cur = m.group(2)
                comps[cur] = [line]
                if m.group(1):
                    entry = cur
            continue
        comps[cur].append(line)
        if line.strip() == "}":
            cur = None
    return comps, entry, header


def _callees(lines: list[str]) -> set[str]:
    out: set[str] = set()
    for line in lines[1:]:
        for m in _CALLED.finditer(line):
            out.update(n.strip().lstrip("%") for n in m.group(1).strip("{}").split(",") if n.strip())
    return out


def _const(defs: dict[str, str], name: str) -> int | None:
    """The integer constant ``name`` is (through copies / converts), or None."""
    for _ in range(8):
        rhs = defs.get(name.lstrip("%"))
        if rhs is None:
            return None
        m = re.search(r"\bconstant\((-?\d+)\)", rhs)
        if m:
            return int(m.group(1))
        m = re.search(r"\b(?:copy|convert|bitcast)\(%?([\w.\-]+)\)", rhs)
        if not m:
            return None
        name = m.group(1)
    return None


def _defs(lines: list[str]) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in map(_DEF.match, lines[1:]) if m}


def _trip_count(line: str, comps: dict[str, list[str]], caller: list[str]) -> int | None:
    m = _TRIP.search(line)
    if m:
        return int(m.group(1))
    w = _WHILE.search(line)
    cond = comps.get(w.group(2), [])
    cdefs = _defs(cond)
    root = next((ln for ln in cond if ln.strip().startswith("ROOT")), "")
    cm = re.search(r"compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\),\s*direction=(LT|LE)", root)
    if not cm:
        return None
    gte = re.search(r"get-tuple-element\(.*?\),\s*index=(\d+)", cdefs.get(cm.group(1), ""))
    bound = _const(cdefs, cm.group(2))
    if gte is None or bound is None:
        return None
    # the induction variable's start: element `index` of the while's operand tuple in the caller
    start = 0
    cdef = _defs(caller)
    init = cdef.get(w.group(1).strip().lstrip("%"), "")
    tm = re.search(r"\btuple\((.*)\)", init)
    if tm:
        ops = [o.strip() for o in re.sub(r"/\*.*?\*/", "", tm.group(1)).split(",")]
        idx = int(gte.group(1))
        if idx < len(ops):
            got = _const(cdef, ops[idx])
            start = got if got is not None else 0
    return max(bound - start + (cm.group(3) == "LE"), 0)


def _elements(shape: str) -> list[int]:
    """Element counts of the array shapes in an HLO type string (``f32[32,64]{1,0}`` or a tuple of them)."""
    out = []
    for dims in re.findall(r"\b[a-z]\w*\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n)
    return out


def _manual_shards(call_args: str, defs: dict[str, str]) -> int | None:
    """Distinct shards a ``shard_map`` body runs on: the largest global / local element ratio over the inputs of
    the ``xla.sdy.GlobalToLocalShape`` custom call that feeds the body (chips that repeat a shard, e.g. over an
    axis the inputs are replicated on, compute nothing new); None if not found."""
    name = call_args.split(",")[0].strip().lstrip("%")
    for _ in range(4):
        rhs = defs.get(name)
        if rhs is None:
            return None
        g2l = re.match(r"(.*?)\s+custom-call\((.*?)\),.*GlobalToLocalShape", rhs)
        if g2l:
            local = _elements(g2l.group(1))
            operands = [x.strip().lstrip("%") for x in g2l.group(2).split(",") if x.strip()]
            full = [(_elements(defs.get(o, "").split(" ")[0]) or [0])[0] for o in operands]
            if len(full) != len(local) or not all(full) or not all(local):
                return None
            return max(f // n for f, n in zip(full, local))
        m = re.search(r"\bget-tuple-element\(%?([\w.\-]+)\)", rhs)
        if not m:
            return None
        name = m.group(1)
    return None


def _module(header: str, comps: dict[str, list[str]], root: str) -> str:
    """A module whose entry is ``root``, holding every computation ``root`` reaches."""
    seen, todo = set(), [root]
    while todo:
        n = todo.pop()
        if n in seen or n not in comps:
            continue
        seen.add(n)
        todo.extend(_callees(comps[n]))
    head = "HloModule " + (header.split()[1].rstrip(",") if len(header.split()) > 1 else "m")  # no aliases, layouts
    body = []
    for n in (c for c in comps if c in seen):  # the module's own order: callees before callers
        lines = list(comps[n])
        if n == root:
            lines[0] = "ENTRY " + lines[0].lstrip().removeprefix("ENTRY").lstrip()
        else:
            lines[0] = lines[0].lstrip().removeprefix("ENTRY").lstrip()
        body.append("\n".join(lines))
    return re.sub(r",?\s*stack_frame_id=\d+", "", head + "\n\n" + "\n\n".join(body) + "\n")  # frames live in the header


def _cost(module_text: str) -> float:
    import jax
    import jaxlib._hlo as hlo
    from jax._src.lib import _jax

    client = jax.devices("cpu")[0].client
    return float(_jax.hlo_module_cost_analysis(client, hlo.hlo_module_from_text(module_text)).get("flops", 0.0))


def loop_scaled_flops(text: str) -> LoopFlops:
    """FLOPs of the HLO module ``text`` (``compiled.as_text()`` or ``lowered.as_text(dialect="hlo")``) with each
    while loop's body counted trip-count times."""
    comps, entry, header = _split(text)
    if not entry:
        raise ValueError("HLO text without an ENTRY computation")
    loops: list[tuple[str, int]] = []
    unknown: list[str] = []

    @functools.cache
    def cost(name: str) -> float:
        return _cost(re.sub(r"stack_frame_id=\d+", "", text) if name == entry else _module(header, comps, name))

    @functools.cache
    def reached(name: str) -> tuple[tuple[tuple[str, int | None], ...], tuple[tuple[str, int | None], ...]]:
        """The loops and the ``shard_map`` bodies reached from ``name`` through plain calls, without entering a loop's
        or a ``shard_map``'s body: ((body, trip count), ...), ((body, distinct shards), ...)."""
        loops, manual, seen, todo = [], [], set(), [name]
        while todo:
            n = todo.pop()
            if n in seen or n not in comps:
                continue
            seen.add(n)
            defs = None
            for line in comps[n][1:]:
                w = _WHILE.search(line)
                if w:
                    loops.append((w.group(3), _trip_count(line, comps, comps[n])))
                    continue
                m = _MANUAL_CALL.search(line)
                if m:
                    defs = _defs(comps[n]) if defs is None else defs
                    manual.append((m.group(2), _manual_shards(m.group(1), defs)))
                    continue
                for c in _CALLED.finditer(line):
                    todo.extend(x.strip().lstrip("%") for x in c.group(1).strip("{}").split(",") if x.strip())
        return tuple(loops), tuple(manual)

    @functools.cache
    def scaled(name: str) -> float:
        total = cost(name)
        whiles, regions = reached(name)
        for body, trip in whiles:
            if trip is None:
                unknown.append(body)
                trip = 1
            loops.append((body, trip))
            total += trip * scaled(body) - cost(body)
        for body, shards in regions:
            if shards is None:
                unknown.append(body)
                shards = 1
            total += shards * scaled(body) - cost(body)
        return total

    raw = cost(entry)
    return LoopFlops(scaled(entry), raw, loops, unknown)
