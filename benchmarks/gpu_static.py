"""Ahead-of-time GPU checks of the Triton step: compiled here, for sm_80 and sm_90, no GPU.

    python -m benchmarks.gpu_static                          # every variant, sm_80 and sm_90
    python -m benchmarks.gpu_static --arch 90 --markdown out.md --json out.json

Every kernel specialisation the optimizer can launch (parameter dtype; Z and v in that
dtype, or bfloat16 with stochastic rounding; int32 or int64 chunk table; with or without
``torch.amp.GradScaler``'s ``inv_scale``/``found_inf``; with or without coupled channel
groups; a missing momentum buffer does not specialise: the launcher passes Z's pointer,
never read) is compiled with Triton's own tool
chain (``triton.compile`` for ``GPUTarget("cuda", arch, 32)``, then the bundled ``ptxas``
and ``cuobjdump``, which need no driver), exactly as the launcher compiles it. Per
variant the table shows:

- **regs**, **stack**, **spill** (``STL``/``LDL`` instructions in the SASS) and **smem**
  (shared memory, bytes) of the cubin;
- per path of the kernel (``kernels/triton_step.py``: the l1/"none" stream, the one-row
  group stream, aligned group rows, scalar group rows), the global loads and stores of W,
  g, Z and v in the PTX and how many are 128-bit vectors. Accesses are attributed to a
  stream by the kernel argument their address derives from, and to a path by the call
  site the PTX line info names.

The coupled-norms kernel (``_coupled_norms_kernel``, the second launch of a step with coupled
groups) is compiled too, every dtype and index type; resources only (no main stream).

These figures are static: what the compiler emitted, not what a GPU measured.
:func:`problems` is what the test (``tests/test_gpu_static.py``) and ``--check`` enforce.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from slbi_triton.kernels import abi

from benchmarks.param_sets import PARAM_SETS, penalty_of
from benchmarks.tables import render

# Triton and the kernel module are imported inside the functions that need them: main()
# first turns the interpreter off (under TRITON_INTERPRET=1, @triton.jit functions are
# interpreter stand-ins that cannot be compiled).

ARCHS = (80, 90)
"""Compute capabilities checked: A100 (sm_80) and H100/H200 (sm_90)."""
MAX_REGISTERS = 128
"""At most this many registers per thread (4 blocks of 128 threads per SM)."""
VECTOR_BITS = 128
STREAMS = {"params_ptr": "W", "grads_ptr": "g", "z_ptr": "Z", "momentum_ptr": "v"}
"""Kernel arguments of the main streams, and their names."""
SCALAR_PATH = "rows, scalar"
"""The path that is scalar by design (group sizes that are not a multiple of the vector)."""

_SHORT = {
    torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64",
}
"""Short dtype names: Triton's spelling in pointer signatures, also used in the labels."""


@dataclass(frozen=True)
class Variant:
    """One specialisation of the kernel, as the launcher produces it."""

    dtype: torch.dtype
    state_dtype: torch.dtype
    stochastic_rounding: bool
    index_dtype: torch.dtype
    amp: bool
    coupled: bool = False

    @property
    def bucket(self) -> str:
        """``"fp32"``, ``"fp32/bf16-sr"`` (state dtype, stochastic rounding), ..."""
        if not self.stochastic_rounding:
            return _SHORT[self.dtype]
        return f"{_SHORT[self.dtype]}/{_SHORT[self.state_dtype]}-sr"

    @property
    def label(self) -> str:
        return f"{self.bucket} {_SHORT[self.index_dtype]}{' amp' if self.amp else ''}" + (
            " coupled" if self.coupled else "")


def variants() -> list[Variant]:
    """Every variant the optimizer can launch (bfloat16 state: float32/bfloat16/float16
    buckets; float64 buckets keep float64 state)."""
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        states = [(dtype, False)] + ([] if dtype == torch.float64 else [(torch.bfloat16, True)])
        for state_dtype, rounding in states:
            for index_dtype in (torch.int32, torch.int64):
                for amp in (False, True):
                    for coupled in (False, True):
                        out.append(Variant(dtype, state_dtype, rounding, index_dtype, amp, coupled))
    return out


def quick_jobs() -> list[tuple[Variant, int]]:
    """The CI subset, as (variant, capability): on sm_90 each bucket kind with the
    cheapest and the widest specialisation (int32 table, no GradScaler, no coupled
    groups; int64 table, GradScaler and coupled groups), on sm_80 the widest."""
    chosen = [v for v in variants() if (v.index_dtype == torch.int64) == v.amp == v.coupled]
    return [(v, 90) for v in chosen] + [(v, 80) for v in chosen if v.amp]


# -- compiling ---------------------------------------------------------------------------------


def _pointer_types(variant: Variant) -> dict[str, torch.dtype]:
    """The dtype behind each pointer argument, as ``triton_step.launch`` passes them
    (absent GradScaler inputs are replaced by the float64 hyper-parameter table)."""
    amp_dtype = torch.float32 if variant.amp else torch.float64
    return {
        "params_ptr": variant.dtype, "grads_ptr": variant.dtype, "z_ptr": variant.state_dtype,
        "momentum_ptr": variant.state_dtype, "group_norms_ptr": abi.norm_dtype(variant.dtype),
        "chunks_ptr": variant.index_dtype, "slot_flags_ptr": torch.int32, "hparams_ptr": torch.float64,
        "rng_ptr": torch.int64, "inv_scale_ptr": amp_dtype, "found_inf_ptr": amp_dtype,
        # Without coupled groups the launcher passes the chunk table (never read).
        "norm_index_ptr": variant.index_dtype,
    }


def compile_variant(variant: Variant, capability: int) -> Any:
    """``triton.compile`` the step for ``variant`` and compute capability ``capability``."""
    from slbi_triton.kernels import triton_step

    constants = {
        **triton_step.kernel_constants(variant.dtype),
        "HAS_INV_SCALE": variant.amp, "HAS_FOUND_INF": variant.amp,
        "STOCHASTIC_ROUNDING": variant.stochastic_rounding, "HAS_COUPLING": variant.coupled,
    }
    return compile_kernel(triton_step._slbi_bucket_kernel, _pointer_types(variant), constants, capability)


def compile_kernel(kernel: Any, pointers: dict[str, torch.dtype], constants: dict[str, Any], capability: int):
    """``triton.compile`` ``kernel`` with these pointer dtypes and constants (other
    arguments: 32-bit integers) for compute capability ``capability``."""
    import triton
    from slbi_triton.kernels import triton_step
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    signature = {n: "constexpr" if n in constants else "*" + _SHORT[pointers[n]] if n in pointers else "i32"
                 for n in names}
    # Torch allocations are 16-byte aligned: the JIT specialises the pointers on it.
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers}
    source = ASTSource(kernel, signature, {(names.index(n),): v for n, v in constants.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options=dict(triton_step.LAUNCH_OPTIONS))


def _cuobjdump() -> str:
    import triton

    try:
        return triton.knobs.nvidia.cuobjdump.path
    except AttributeError:  # older Triton: the bundled binary
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def cubin_resources(cubin: bytes) -> dict[str, int]:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` (``cuobjdump -res-usage``) and ``SPILL``,
    the local-memory stores and loads (``STL``/``LDL``) in the SASS."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        usage = subprocess.run([_cuobjdump(), "-res-usage", str(path)], capture_output=True, text=True,
                               check=True, timeout=60).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", str(path)], capture_output=True, text=True,
                              check=True, timeout=60).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    resources = {key: int(found.get(key, 0)) for key in ("REG", "STACK", "SHARED", "LOCAL")}
    resources["SPILL"] = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\s", sass))
    return resources


# -- reading the PTX ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """One global load or store of a main stream in the PTX."""

    stream: str  # "W", "g", "Z" or "v"
    kind: str  # "ld" or "st"
    bits: int  # bits per thread moved by the instruction
    path: str  # the kernel path it belongs to ("?" when the line info names none)


_REGISTER = re.compile(r"%[a-z]+\d+")
_PARAM_LOAD = re.compile(r"ld\.param\.\w+\s+(%[a-z]+\d+),\s*\[\w+_param_(\d+)\]")
_LOC = re.compile(r"\.loc\s+(\d+)\s+(\d+)\s+\d+(?:,.*?inlined_at\s+(\d+)\s+(\d+)\s+\d+)?")
_FILE = re.compile(r'\.file\s+(\d+)\s+"([^"]+)"')


def _split_instruction(line: str) -> tuple[str, list[str], list[str]] | None:
    """``(opcode, destination registers, source registers)`` of one PTX instruction line."""
    text = line.split("//", 1)[0].strip().rstrip(";").strip()
    text = re.sub(r"^@!?%\w+\s+", "", text)
    if not text or text.startswith((".", "$", "{", "}")) or " " not in text.replace("\t", " "):
        return None
    opcode, operands = re.split(r"\s+", text, maxsplit=1)
    if opcode.startswith(("st.", "bra", "bar", "ret")):
        return opcode, [], _REGISTER.findall(operands)
    first, _, rest = operands.partition("}") if operands.startswith("{") else operands.partition(",")
    return opcode, _REGISTER.findall(first), _REGISTER.findall(rest)


def register_roots(ptx: str) -> dict[str, set[int]]:
    """The kernel arguments (by index) each PTX register's value derives from."""
    roots: dict[str, set[int]] = {}
    edges = []
    for line in ptx.splitlines():
        loaded = _PARAM_LOAD.search(line)
        if loaded:
            roots.setdefault(loaded.group(1), set()).add(int(loaded.group(2)))
            continue
        parsed = _split_instruction(line)
        if parsed and parsed[1]:
            edges.append((parsed[1], parsed[2]))
    changed = True
    while changed:  # loop-carried registers need a fixed point
        changed = False
        for dests, sources in edges:
            union = set().union(*(roots.get(s, ()) for s in sources))
            for dest in dests:
                known = roots.setdefault(dest, set())
                if not union <= known:
                    known |= union
                    changed = True
    return roots


def _access_bits(opcode: str) -> int:
    vector = re.search(r"\.v(\d)", opcode)
    element = re.search(r"\.[bfsu](\d+)$", opcode)
    return (int(vector.group(1)) if vector else 1) * (int(element.group(1)) if element else 0)


def path_call_sites(kernel: Any) -> dict[int, str]:
    """Source line of each path's call in the kernel body → the path's name."""
    function = kernel.fn
    source = textwrap.dedent(inspect.getsource(function))
    first_line = inspect.getsourcelines(function)[1]
    sites = {}
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id == "_rows":
            scalar = any(isinstance(a, ast.Name) and a.id == "SCALAR_COLS" for a in node.args)
            sites[first_line + node.lineno - 1] = SCALAR_PATH if scalar else "rows, aligned"
        elif node.func.id == "_stream":
            group = any(isinstance(a, ast.Constant) and a.value is True for a in node.args)
            sites[first_line + node.lineno - 1] = "group, one row" if group else "l1/none"
    return sites


def ptx_accesses(ptx: str, kernel: Any) -> list[Access]:
    """The main-stream global loads and stores of ``ptx``, compiled from ``kernel``."""
    pointer_args = [n for i, n in enumerate(kernel.arg_names) if not kernel.params[i].is_constexpr]
    streams = {i: STREAMS[n] for i, n in enumerate(pointer_args) if n in STREAMS}
    # By name: Triton's cache keys on the source, not its path, so a PTX may come from the
    # same file in another checkout (the line numbers are the same: the source is).
    kernel_file = Path(inspect.getsourcefile(kernel.fn)).name
    files = {int(i): Path(p).name == kernel_file for i, p in _FILE.findall(ptx)}
    sites = path_call_sites(kernel)
    roots = register_roots(ptx)
    path = "?"
    accesses = []
    for line in ptx.splitlines():
        loc = _LOC.search(line)
        if loc:
            if loc.group(3) is None:
                path = "?"  # code of the kernel body itself
            elif files.get(int(loc.group(3))) and int(loc.group(4)) in sites:
                path = sites[int(loc.group(4))]
            continue
        parsed = _split_instruction(line)
        if not parsed or not parsed[0].startswith(("ld.global", "st.global")):
            continue
        address = re.search(r"\[([^\]]*)\]", line)
        registers = _REGISTER.findall(address.group(1)) if address else []
        origin = set().union(*(roots.get(r, ()) for r in registers))
        named = [streams[i] for i in sorted(origin) if i in streams]
        if named:
            accesses.append(Access(named[0], parsed[0][:2], _access_bits(parsed[0]), path))
    return accesses


# -- the report --------------------------------------------------------------------------------


@dataclass
class StaticRow:
    """The static figures of one (variant, architecture)."""

    arch: str
    variant: str
    regs: int | None = None
    stack: int | None = None
    spill: int | None = None
    smem: int | None = None
    kernel: str = "step"  # or "coupled norms" (resources only)
    paths: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> {"vector": n, "all": n}
    expected_bits: dict[str, int] = field(default_factory=dict)  # stream -> widest access it allows
    streams: dict[str, list[str]] = field(default_factory=dict)  # path -> streams seen ("W ld", ...)
    error: str | None = None

    @property
    def vector_share(self) -> tuple[int, int]:
        """128-bit main-stream accesses and all main-stream accesses, outside the scalar path."""
        counts = [c for p, c in self.paths.items() if p != SCALAR_PATH]
        return sum(c["vector"] for c in counts), sum(c["all"] for c in counts)


def expected_bits(variant: Variant) -> dict[str, int]:
    """The access width each stream should reach on the vector paths: ``ALIGN`` elements
    per thread (``triton_step.kernel_constants``) of its dtype, so 128 bits, except Z and v
    of a float32 bucket with bfloat16 state (64)."""
    from slbi_triton.kernels import triton_step

    align = int(triton_step.kernel_constants(variant.dtype)["ALIGN"])
    params, state = 8 * align * variant.dtype.itemsize, 8 * align * variant.state_dtype.itemsize
    return {"W": params, "g": params, "Z": state, "v": state}


def analyse(variant: Variant, capability: int) -> StaticRow:
    """Compile ``variant`` for ``capability`` and read its resources and accesses."""
    from slbi_triton.kernels import triton_step

    row = StaticRow(f"sm_{capability}", variant.label, expected_bits=expected_bits(variant))
    compiled = _compiled_into(row, lambda: compile_variant(variant, capability))
    if compiled is None:
        return row
    for access in ptx_accesses(compiled.asm["ptx"], triton_step._slbi_bucket_kernel):
        counts = row.paths.setdefault(access.path, {"vector": 0, "all": 0})
        counts["all"] += 1
        counts["vector"] += access.bits == VECTOR_BITS
        seen = row.streams.setdefault(access.path, [])
        if access.bits >= row.expected_bits[access.stream] and f"{access.stream} {access.kind}" not in seen:
            seen.append(f"{access.stream} {access.kind}")
    return row


def _compiled_into(row: StaticRow, compile_it: Any) -> Any:
    """``compile_it()``, its resources written into ``row``; ``None`` (and ``row.error``)
    when it fails: a failed compile is a finding, reported per row."""
    try:
        compiled = compile_it()
        resources = cubin_resources(compiled.asm["cubin"])
    except Exception as exc:
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}"
        return None
    row.regs, row.spill = resources["REG"], resources["SPILL"]
    row.stack = resources["STACK"] + resources["LOCAL"]
    row.smem = max(resources["SHARED"], int(getattr(compiled.metadata, "shared", 0)))
    return compiled


_WANTED = ("W ld", "g ld", "Z ld", "v ld", "W st", "Z st", "v st")


def problems(row: StaticRow) -> list[str]:
    """What is wrong with ``row``: a failed compile, spills, more than ``MAX_REGISTERS``
    registers, or a vector path that lost a stream's full-width access."""
    if row.error:
        return [f"compile failed: {row.error}"]
    found = []
    if row.stack or row.spill:
        found.append(f"spills: {row.stack} B stack, {row.spill} STL/LDL")
    if row.regs is not None and row.regs > MAX_REGISTERS:
        found.append(f"{row.regs} registers > {MAX_REGISTERS}")
    if row.kernel != "step":
        return found
    vector_paths = [p for p in row.paths if p not in (SCALAR_PATH, "?")]
    if len(vector_paths) < 3:
        found.append(f"vector paths found: {vector_paths}")
    for path in vector_paths:
        missing = [s for s in _WANTED if s not in row.streams.get(path, [])]
        if missing:
            found.append(f"{path}: no full-width {', '.join(missing)}")
    if "?" in row.paths:
        found.append(f"{row.paths['?']['all']} main-stream accesses outside any path")
    return found


def vector_share(shapes: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> float:
    """The share of a parameter set's elements (penalty ``"auto"``) on a vector path: all
    but those of groups whose size is not a multiple of the kernel's ``ALIGN``."""
    from slbi_triton.kernels import triton_step

    align = int(triton_step.kernel_constants(dtype)["ALIGN"])
    total = scalar = 0
    for _, shape in shapes:
        numel = math.prod(shape)
        total += numel
        if penalty_of(shape) == "group" and math.prod(shape[1:]) % align:
            scalar += numel
    return 1.0 - scalar / total if total else 1.0


def run(jobs: Iterable[tuple[Variant, int]]) -> list[StaticRow]:
    """Analyse every (variant, capability); each compile takes about a second."""
    return [analyse(variant, capability) for variant, capability in jobs]


COUPLED_NORM_JOBS = [(dtype, index, capability) for capability in ARCHS
                     for dtype in (torch.float32, torch.float64) for index in (torch.int32, torch.int64)]
"""(norm dtype, index dtype, capability) of every compile of ``_coupled_norms_kernel``."""


def analyse_coupled_norms(dtype: torch.dtype, index_dtype: torch.dtype, capability: int) -> StaticRow:
    """Compile the coupled-norms kernel (with ``found_inf``, its widest form) and read its
    resources."""
    from slbi_triton.kernels import triton_step

    row = StaticRow(f"sm_{capability}", f"coupled norms {_SHORT[dtype]} {_SHORT[index_dtype]}",
                    kernel="coupled norms")
    pointers = {"group_norms_ptr": dtype, "coupled_offsets_ptr": index_dtype, "coupled_rows_ptr": index_dtype,
                "coupled_scale_ptr": dtype, "found_inf_ptr": torch.float32}
    constants = {"BLOCK": triton_step.COUPLED_BLOCK, "HAS_FOUND_INF": True}
    kernel = triton_step._coupled_norms_kernel
    _compiled_into(row, lambda: compile_kernel(kernel, pointers, constants, capability))
    return row


def row_json(row: StaticRow) -> dict:
    """``row`` as JSON, with its problems and its vector share."""
    vector, total = row.vector_share
    return {**asdict(row), "vector_accesses": vector, "accesses": total, "problems": problems(row)}


COLUMNS = ("arch", "variant", "regs", "spill", "smem", "128-bit W/g/Z/v (vector paths)", "scalar-rows path",
           "verdict")


def _cells(row: StaticRow) -> list[str]:
    if row.error:
        return [row.arch, row.variant, "-", "-", "-", "-", "-", "FAIL: " + row.error[:60]]
    vector, total = row.vector_share
    scalar = row.paths.get(SCALAR_PATH, {"vector": 0, "all": 0})
    narrow = [s for s, bits in row.expected_bits.items() if bits < VECTOR_BITS]
    share = f"{vector}/{total}" + (f" ({'/'.join(narrow)} 64-bit)" if narrow else "")
    found = problems(row)
    return [row.arch, row.variant, str(row.regs), f"{row.stack} B, {row.spill} instr", str(row.smem), share,
            f"{scalar['all']} scalar", "ok" if not found else "FAIL: " + "; ".join(found)]


def table(rows: Sequence[StaticRow], markdown: bool = False) -> str:
    """One line per (arch, variant)."""
    return render(COLUMNS, [_cells(r) for r in rows], markdown)


SHARE_SETS = ("resnet18", "resnet50", "vit_b16")


def share_line() -> str:
    """Which share of each set's elements takes a vector path, per bucket dtype."""
    parts = []
    for name in SHARE_SETS:
        shares = {_SHORT[d]: vector_share(PARAM_SETS[name](), d) for d in (torch.float32, torch.bfloat16)}
        parts.append(f"{name} " + "/".join(f"{100 * v:.2f}%" for v in shares.values()))
    return "# elements on a vector path (fp32/bf16 buckets, penalty auto): " + ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; with ``--check``, exit 1 when a variant has a problem."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_static", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="80 or 90 (default both)")
    parser.add_argument("--quick", action="store_true", help="the CI subset of variants (ignores --arch)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a variant has a problem")
    args = parser.parse_args(argv)
    # Compiling needs real @triton.jit functions: under TRITON_INTERPRET=1 (as in
    # `make test`) they are interpreter stand-ins. Triton is first imported below.
    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    jobs = quick_jobs() if args.quick else [(v, c) for c in args.arch or ARCHS for v in variants()]
    archs = ARCHS if args.quick else args.arch or ARCHS
    rows = run(jobs) + [analyse_coupled_norms(*job) for job in COUPLED_NORM_JOBS if job[2] in archs]
    print(f"# Triton {triton.__version__}, static (compiled, not run): {len(rows)} variants", flush=True)
    print(table(rows), flush=True)
    print(share_line(), flush=True)
    if args.json:
        args.json.write_text(json.dumps([row_json(r) for r in rows], indent=1))
    if args.markdown:
        args.markdown.write_text(table(rows, markdown=True) + "\n")
    failed = [r for r in rows if problems(r)]
    return 1 if args.check and failed else 0


if __name__ == "__main__":
    sys.exit(main())
