"""Where a jitted step's time goes, op by op: XLA's compiled HLO (FLOPs and bytes of every top-level
op, dots counted from their shapes) joined with a ``jax.profiler`` trace (time of every thunk).

    table = profile_ops(jitted_fn, args, steps=3)
    print(format_table(table, peak_flops=gemm_rate(...), peak_bytes=copy_rate()))

``profile_ops`` lowers and compiles ``jitted_fn`` for ``args``, runs it ``steps`` times under
``jax.profiler.trace`` and sums each top-level HLO instruction's thunk time (XLA:CPU runs every
fusion, dot and copy as one thunk named after the instruction; independent thunks may run on two
threads at once, so the op times can add up to more than the step). FLOPs: ``2 * prod(out) *
prod(contracting)`` per dot (inside fusions too); bytes: the op's operands plus its result. Ops
inside ``while`` loops are timed as the loop.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_HEADER = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$")


class HloOp(NamedTuple):
    """One instruction of the compiled HLO: ``shape`` its result (the first array of a tuple),
    ``flops`` its dots' multiply-adds x 2, ``bytes`` operands + result, ``what`` the tail of its
    ``op_name`` metadata (the JAX operation it came from)."""

    name: str
    opcode: str
    shape: str
    flops: float
    bytes: float
    what: str


def _array_bytes(type_text: str) -> tuple[float, list]:
    """Total bytes of the arrays in an HLO type (an array or a tuple) and the first array's dims."""
    total, first = 0.0, None
    for dtype, dims in _SHAPE.findall(type_text):
        size = [int(d) for d in dims.split(",") if d]
        n = 1
        for d in size:
            n *= d
        total += n * DTYPE_BYTES.get(dtype, 4)
        first = size if first is None else first
    return total, first or []


def _split_instruction(line: str):
    """``%name = TYPE opcode(operands), attrs`` -> (name, type, opcode, operands, attrs) or None."""
    match = _INSTRUCTION.match(line)
    if not match:
        return None
    rest = line[match.end():]
    if rest.startswith("("):  # tuple type: up to its matching parenthesis
        depth = 0
        for end, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                break
        type_text, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        type_text, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth, end = 1, 0
    for end, ch in enumerate(rest):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            break
    return match.group(1), type_text, opcode, rest[:end], rest[end + 1:]


def _dims(attrs: str, key: str) -> list:
    match = re.search(key + r"=\{([\d,]*)\}", attrs)
    return [int(d) for d in match.group(1).split(",") if d] if match else []


def parse_hlo(text: str) -> dict:
    """``{instruction name: HloOp}`` of the ENTRY computation of compiled HLO text; a fusion's FLOPs
    are those of the dots in the computation it calls."""
    computations, current, entry = {}, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(1), [])
            entry = header.group(1) if line.startswith("ENTRY") else entry
            continue
        parsed = _split_instruction(line) if current is not None else None
        if parsed:
            current.append(parsed)

    def flops_of(instructions, shapes=None) -> float:
        shapes = shapes if shapes is not None else {name: _array_bytes(t)[1] for name, t, *_ in instructions}
        total = 0.0
        for name, type_text, opcode, operands, attrs in instructions:
            if opcode == "dot":
                lhs = shapes.get(operands.split(",")[0].strip().lstrip("%").split(" ")[-1].lstrip("%"), [])
                contracting = 1
                for d in _dims(attrs, "lhs_contracting_dims"):
                    contracting *= lhs[d] if d < len(lhs) else 1
                out = 1
                for d in shapes[name]:
                    out *= d
                total += 2.0 * out * contracting
            elif opcode == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", attrs)
                total += flops_of(computations.get(called.group(1), [])) if called else 0.0
        return total

    ops, sizes = {}, {}
    entry_shapes = {name: _array_bytes(type_text)[1] for name, type_text, *_ in computations.get(entry, [])}
    for name, type_text, opcode, operands, attrs in computations.get(entry, []):
        out_bytes, dims = _array_bytes(type_text)
        sizes[name] = out_bytes
        in_bytes = sum(sizes.get(o.strip().split(" ")[-1].lstrip("%"), 0.0) for o in operands.split(","))
        what = re.search(r'op_name="([^"]*)"', attrs)
        what = "/".join(what.group(1).split("/")[-2:]) if what else ""
        flops = flops_of([(name, type_text, opcode, operands, attrs)], entry_shapes)
        shape = f"{type_text.split('[')[0].lstrip('(')}[{','.join(map(str, dims))}]"
        ops[name] = HloOp(name, opcode, shape, flops, out_bytes + in_bytes, what)
    return ops


def trace_times(fn, args, steps: int) -> dict:
    """``{event name: total ns}`` over ``steps`` calls of ``fn(*args)`` under ``jax.profiler``."""
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        try:
            out = None
            for _ in range(steps):
                out = fn(*args)
            jax.block_until_ready(out)
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        if not files:
            raise RuntimeError(f"jax.profiler wrote no trace under {logdir}")
        data = jax.profiler.ProfileData.from_file(files[0])
    times = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                times[event.name] += event.duration_ns
    return times


class OpTime(NamedTuple):
    op: HloOp
    ms: float  # per call of the profiled function


def profile_ops(jitted, args, steps: int = 3, carries: bool = False) -> tuple[list, dict]:
    """(``[OpTime]`` sorted by time, summary) of ``jitted(*args)``: every top-level HLO op of its
    compiled program with its thunk time per call. ``carries``: ``jitted(carry, *rest) -> (carry,
    out)`` with ``args[0]`` the carry (a step that donates it), threaded through the calls. Summary:
    ``step_ms`` (wall, median of ``steps`` untraced calls), ``ops_ms`` (sum of op times), ``flops``
    (XLA's count for the program), ``dot_flops`` (the dots' count here), ``num_ops``."""
    compiled = jitted.lower(*args).compile()
    ops = parse_hlo(compiled.as_text())
    state = {"args": tuple(args)}

    def call():
        out = jitted(*state["args"])
        if carries:
            state["args"] = (out[0],) + state["args"][1:]
        return out

    jax.block_until_ready(call())
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(call())
        walls.append(time.perf_counter() - start)
    times = trace_times(call, (), steps)
    rows = sorted((OpTime(op, times.get(name, 0) / 1e6 / steps) for name, op in ops.items()),
                  key=lambda r: -r.ms)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    summary = {"step_ms": 1e3 * sorted(walls)[len(walls) // 2], "ops_ms": sum(r.ms for r in rows),
               "flops": float(cost.get("flops", 0.0)) if cost else 0.0,
               "dot_flops": sum(op.flops for op in ops.values()), "num_ops": len(ops)}
    return rows, summary


def gemm_rate(rows: int, inner: int, cols: int, reps: int = 5) -> float:
    """FLOP/s of XLA's ``[rows, inner] x [inner, cols]`` f32 matmul here (best of ``reps`` rounds)."""
    a = jnp.ones((rows, inner), jnp.float32) / inner
    b = jnp.ones((inner, cols), jnp.float32)
    matmul = jax.jit(jnp.dot)
    jax.block_until_ready(matmul(a, b))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, b))
        best = min(best, time.perf_counter() - start)
    return 2.0 * rows * inner * cols / best


def copy_rate(num_bytes: int = 64 << 20, reps: int = 5) -> float:
    """Bytes/s (read + write) of an XLA elementwise pass over ``num_bytes`` of f32 here (best of ``reps``)."""
    x = jnp.ones((num_bytes // 4,), jnp.float32)
    scale = jax.jit(lambda v: v * 1.5)
    jax.block_until_ready(scale(x))
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(scale(x))
        best = min(best, time.perf_counter() - start)
    return 2.0 * num_bytes / best


def format_table(rows, summary: dict, peak_flops: float, peak_bytes: float, top: int = 25) -> str:
    """A markdown table of the ``top`` ops by time: time per call, share of the op total, GFLOP,
    achieved GFLOP/s and % of ``peak_flops`` (dots), MB moved and % of ``peak_bytes``; then the rest
    summed."""
    total = max(summary["ops_ms"], 1e-9)
    lines = ["| op | from | result | ms | % | GFLOP | GFLOP/s | % peak FLOP/s | MB | GB/s | % peak B/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows[:top]:
        op, sec = r.op, max(r.ms, 1e-6) / 1e3
        flop_cells = (f"{op.flops / 1e9:.3f} | {op.flops / sec / 1e9:.0f} | {100 * op.flops / sec / peak_flops:.0f}"
                      if op.flops else "- | - | -")
        lines.append(f"| {op.name} | {op.what or op.opcode} | {op.shape} | {r.ms:.2f} | {100 * r.ms / total:.1f} | "
                     f"{flop_cells} | {op.bytes / 1e6:.1f} | {op.bytes / sec / 1e9:.1f} | "
                     f"{100 * op.bytes / sec / peak_bytes:.0f} |")
    rest = rows[top:]
    if rest:
        rest_ms = sum(r.ms for r in rest)
        lines.append(f"| ({len(rest)} more ops) | | | {rest_ms:.2f} | {100 * rest_ms / total:.1f} | "
                     f"{sum(r.op.flops for r in rest) / 1e9:.3f} | | | {sum(r.op.bytes for r in rest) / 1e6:.1f} | | |")
    return "\n".join(lines)


def kind_of(op: HloOp) -> str:
    """A coarse class of an op for ``time_by_kind``."""
    if op.flops:
        return "dots (GEMM)"
    if op.opcode in ("while", "conditional", "call"):
        return "loops (solvers)"
    if op.opcode in ("copy", "transpose") or op.name.startswith(("copy", "transpose")) or "transpose" in op.what:
        return "copies / transposes"
    if op.opcode in ("concatenate", "dynamic-update-slice", "pad"):
        return "concatenates"
    if op.opcode == "fusion":
        return "elementwise / reduce fusions"
    return "other"


def time_by_kind(rows) -> dict:
    """``{kind: {'ms', 'gflop', 'mb', 'ops'}}`` summed over ``rows`` (``profile_ops``)."""
    out = {}
    for r in rows:
        entry = out.setdefault(kind_of(r.op), {"ms": 0.0, "gflop": 0.0, "mb": 0.0, "ops": 0})
        entry["ms"] += r.ms
        entry["gflop"] += r.op.flops / 1e9
        entry["mb"] += r.op.bytes / 1e6
        entry["ops"] += 1
    return out
