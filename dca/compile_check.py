"""Compiles every Triton kernel variant the product can launch, to cubin for sm_80 and sm_90a,
on a machine without a GPU, and reports registers, spills and shared memory per variant.

How (no GPU needed): Triton's active driver is replaced by a stand-in whose current target is
`GPUTarget("cuda", 80 or 90, 32)`; `kernel.warmup(...)` then runs the real compiler (TTIR, TTGIR,
LLVM, PTX) and the ptxas that ships inside the triton wheel, whose `-v` report gives registers,
spill stores/loads and the stack frame. Shared memory comes from the compiled kernel's metadata
(what the driver checks at load time).

Which variants: the host functions of `dca.triton_kernels` are called with `meta` tensors (shapes
and strides, no storage) at the geometries below while the module records its launches instead of
running them (`triton_kernels.recording`). Every tile choice of the target's tile lists is
recorded (a tile can be launched when the one before it fails). Launches that Triton would compile
to the same binary (same kernel, argument types and specialisation, constexprs, warps, stages)
are one variant; each variant lists what launches it.

Failures (`problems`): a variant that does not compile; one that needs more shared memory per block
than the target allows; one that collapsed (at most 32 registers with more than 8 KiB of spill
traffic: the register allocator gave up, every access goes to local memory).

Compiles run in a process pool (one process per core): Triton's Python stages are single-threaded
and ptxas is a separate process. Each run uses a fresh Triton cache directory, so every variant is
really compiled and timed.

Entry points: `run_check` (library) and `benchmarks/kernel_compile.py` (the command that writes
benchmarks/results/kernel_compile.json); tests/dca/test_kernel_compile.py runs it in CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field

KiB = 1024


@dataclass(frozen=True, kw_only=True)
class Target:
    """A GPU architecture to compile for."""

    name: str  # "sm_80"
    arch: int  # Triton's capability number: 80, 90
    # Largest dynamic shared memory one block may use (bytes), and where the figure comes from.
    smem_limit: int
    smem_source: str
    # SMs of the reference GPU: the host code sizes split-KV decode grids from it.
    sm_count: int
    gpu: str


# CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": maximum shared
# memory per thread block 163 KB for 8.0 (A100), 227 KB for 9.0 (H100); 99 KB for 8.6/8.9.
TARGETS = {
    "sm_80": Target(name="sm_80", arch=80, smem_limit=163 * KiB, gpu="A100 (108 SMs)", sm_count=108,
                    smem_source="CUDA C++ Programming Guide, compute capability 8.0: 163 KB per block"),
    "sm_90a": Target(name="sm_90a", arch=90, smem_limit=227 * KiB, gpu="H100 SXM (132 SMs)", sm_count=132,
                     smem_source="CUDA C++ Programming Guide, compute capability 9.0: 227 KB per block"),
}
# Consumer/inference Ampere and Ada (A10, L4, RTX 30xx/40xx: compute capability 8.6/8.9) run
# sm_80-class code with 99 KB per block: reported, not a failure of the sm_80 target.
SM86_SMEM_LIMIT = 99 * KiB
COLLAPSE_REGISTERS = 32
COLLAPSE_SPILL_BYTES = 8 * KiB


@dataclass(frozen=True, kw_only=True)
class Geometry:
    """Shapes at which the product launches the kernels."""

    name: str
    heads: int  # query heads (per tensor-parallel rank)
    kv_heads: int
    head_dim: int
    batch: int
    capacity: int  # cache slots per row
    prefill_queries: tuple = (300, 4096)  # one not a multiple of 16, one that is
    decode_queries: tuple = tuple(range(1, 17))
    # (model dtype, KV dtype) pairs launched at this geometry
    combos: tuple = tuple((d, kv) for d in ("bfloat16", "float16", "float32") for kv in ("auto", "int8"))
    packed: bool = True  # also the packed-rows kernels (rows of their own caches)
    used_by: str = ""

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: {self.heads} heads are not a multiple of {self.kv_heads} KV heads")
        bad = [c for c in self.combos if c[0] not in ("bfloat16", "float16", "float32") or c[1] not in ("auto", "int8")]
        if bad:
            raise ValueError(f"{self.name}: unknown (dtype, KV dtype) pairs {bad}")


# Every (dtype, KV dtype) at the production shapes; at the small shapes, what the GPU tests and
# scripts/gpu_check.py launch (other head dims compile the same code with other constants).
GEOMETRIES = (
    Geometry(name="llama2-70b-tp2", heads=32, kv_heads=4, head_dim=128, batch=8, capacity=100_000,
             used_by="Llama-2-70B per rank at tensor parallelism 2 (the production shapes); also every "
                     "head_dim-128 GPU test (float32 kernels, packed rows, int8 store, 70B geometry)"),
    Geometry(name="gpu-test-d64", heads=8, kv_heads=2, head_dim=64, batch=2, capacity=65_536,
             prefill_queries=(40, 2560), combos=(("bfloat16", "auto"), ("bfloat16", "int8")),
             used_by="tests/dca/test_triton_gpu.py 64k prefill; scripts/gpu_check.py CUDA-graph step"),
    Geometry(name="gpu-test-tiny", heads=4, kv_heads=2, head_dim=16, batch=2, capacity=100,
             prefill_queries=(20, 90),
             combos=(("float32", "auto"), ("float32", "int8"), ("bfloat16", "auto"), ("float16", "auto")),
             used_by="tests/dca/test_triton_gpu.py tiny models (generate, low precision, CUDA graphs)"),
)


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One binary: what `kernel.warmup(*args, **options)` compiles.

    args: per kernel argument, a torch dtype name for a tensor ("bfloat16") or an int.
    options: sorted (name, value) pairs: constexprs plus num_warps and num_stages.
    """

    module: str
    kernel: str
    args: tuple
    options: tuple
    key: str
    label: str
    uses: tuple = ()


@dataclass
class _Collected:
    variants: dict = field(default_factory=dict)  # key -> Variant
    order: list = field(default_factory=list)


# --- enumeration ---------------------------------------------------------------------------------


def _spec_of(kernel, args) -> str:
    """Triton's own specialisation of the arguments (what makes two launches one binary)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    parts = []
    for param, arg in zip([p for p in kernel.params if not p.is_constexpr], args):
        if isinstance(arg, str):  # a tensor: its dtype (meta tensors are treated as 16-byte aligned)
            parts.append(f"*{arg}")
        else:
            ty, attr = native_specialize_impl(CUDABackend, arg, False, not param.do_not_specialize, True)
            parts.append(f"{ty}{attr if isinstance(attr, str) else '=' + str(attr)}")
    return ",".join(parts)


def _normalise(arg):
    import torch

    if isinstance(arg, torch.Tensor):
        return str(arg.dtype).removeprefix("torch.")
    if isinstance(arg, bool) or not isinstance(arg, (int, float)):
        raise TypeError(f"unexpected kernel argument {arg!r}")
    return arg


# Arguments whose dtypes tell the variants of a kernel apart (model/cache dtype, output dtype).
_DTYPE_ARGS = {"_store_kernel": (0, 2), "_decode_reduce_kernel": (2,)}


def _label(name: str, args: tuple, opts: tuple) -> str:
    dtypes = [args[i] for i in _DTYPE_ARGS.get(name, (0, 1))]
    shown = {k: v for k, v in opts if k not in ("F64",)}
    return f"{name.strip('_')} {'/'.join(dtypes)} " + " ".join(f"{k}={v}" for k, v in shown.items())


def _record(collected: _Collected, module: str, kernel, args, options: dict, use: str) -> None:
    norm = tuple(_normalise(a) for a in args)
    opts = tuple(sorted(options.items()))
    name = kernel.fn.__name__
    key = f"{name}|{_spec_of(kernel, norm)}|{opts}"
    old = collected.variants.get(key)
    if old is None:
        collected.variants[key] = Variant(module=module, kernel=name, args=norm, options=opts, key=key,
                                          label=_label(name, norm, opts), uses=(use,))
        collected.order.append(key)
    elif use not in old.uses:
        collected.variants[key] = dataclasses.replace(old, uses=old.uses + (use,))


def enumerate_variants(target: Target, geometries=GEOMETRIES, module: str = "dca.triton_kernels") -> list[Variant]:
    """Every variant the host functions of `module` launch at `geometries` on `target`."""
    kernels = importlib.import_module(module)
    collected = _Collected()

    def sink(kernel, args, options, use):
        _record(collected, module, kernel, args, options, use)

    with kernels.recording(arch=target.arch, sm_count=target.sm_count, sink=sink):
        for geometry in geometries:
            _launch_geometry(kernels, geometry)
    return [collected.variants[k] for k in collected.order]


def _launch_geometry(kernels, g: Geometry) -> None:
    """Calls the host functions as the product does at geometry g (meta tensors: nothing runs)."""
    import torch

    from dca import DCAConfig

    meta = torch.device("meta")
    config = DCAConfig(4096)
    i32 = dict(device=meta, dtype=torch.int32)
    for dtype_name, kv in g.combos:
        dtype = getattr(torch, dtype_name)
        cos = torch.empty(config.chunk_size + 1, g.head_dim, device=meta, dtype=dtype)
        scale = torch.empty(g.batch, device=meta, dtype=torch.float32)
        int8 = kv == "int8"
        store_dtype = torch.int8 if int8 else dtype
        k = torch.empty(g.batch, g.kv_heads, g.capacity, g.head_dim, device=meta, dtype=store_dtype)
        v = torch.empty_like(k)
        ks = vs = torch.empty(g.batch, g.kv_heads, g.capacity, device=meta, dtype=torch.float32) if int8 else None
        where = f"{g.name} {dtype_name} kv={kv}"
        for tq in sorted(set(g.prefill_queries) | set(g.decode_queries)):
            # queries as the layer makes them: a (B, T, Hq, D) projection viewed as (B, Hq, T, D)
            q = torch.empty(g.batch, tq, g.heads, g.head_dim, device=meta, dtype=dtype).transpose(1, 2)
            with kernels.recording_use(f"{where} attention tq={tq}"):
                kernels.attention(q, k, v, torch.empty(g.batch, **i32), torch.empty(1, **i32), scale, cos, cos,
                                  config, ks, vs)
            new = torch.empty(g.batch, tq, g.kv_heads, g.head_dim, device=meta, dtype=dtype).transpose(1, 2)
            with kernels.recording_use(f"{where} store tq={tq}"):
                kernels.store(new, new, k, v, cos, cos, torch.empty(g.batch, **i32), torch.empty(1, **i32),
                              config.chunk_len, ks, vs)
        if g.packed and hasattr(kernels, "packed_attention"):
            _launch_packed(kernels, g, dtype, int8, cos, config, where)


def _launch_packed(kernels, g: Geometry, dtype, int8: bool, cos, config, where: str) -> None:
    """One packed forward as the engine runs it: decode rows (one token) and prompt blocks of
    several rows, each row with a cache of its own capacity."""
    import torch

    meta = torch.device("meta")
    q_len = [1, 1, 300, 1, 17][: max(2, g.batch)]
    past = [g.capacity - 2, 5000 % g.capacity, 0, 40, 2560 % g.capacity][: len(q_len)]
    capacities = [max(p + n, 64) for p, n in zip(past, q_len)]
    q_start = [sum(q_len[:r]) for r in range(len(q_len))]
    rows = kernels.PackedRows.build(q_start, q_len, past, [0.1] * len(q_len), meta)
    store = torch.int8 if int8 else dtype
    keys = [torch.empty(1, g.kv_heads, c, g.head_dim, device=meta, dtype=store) for c in capacities]
    values = [torch.empty_like(k) for k in keys]
    scales = [torch.empty(1, g.kv_heads, c, 1, device=meta, dtype=torch.float32) for c in capacities] if int8 else None
    caches = kernels.RowCaches.from_tensors(keys, values, scales, scales)
    t = sum(q_len)
    q = torch.empty(1, t, g.heads, g.head_dim, device=meta, dtype=dtype).transpose(1, 2)
    new = torch.empty(1, t, g.kv_heads, g.head_dim, device=meta, dtype=dtype).transpose(1, 2)
    with kernels.recording_use(f"{where} packed store rows q_len={q_len}"):
        kernels.packed_store(new, new, rows, caches, cos, cos, config.chunk_len)
    with kernels.recording_use(f"{where} packed attention rows q_len={q_len}"):
        kernels.packed_attention(q, rows, caches, cos, cos, config)


# --- compiling -----------------------------------------------------------------------------------


class _StandInDriver:
    """Triton's driver interface as far as compiling needs it: a current target, device 0."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_LINE = re.compile(r"Used (\d+) registers")
_PTXAS_TIME = re.compile(r"Compile time = ([\d.]+) ms")


def parse_ptxas_log(log: str) -> dict:
    """registers, stack frame and spill bytes of the one entry function in a `ptxas -v` log."""
    frame, regs = _PTXAS_LINE.search(log), _REGS_LINE.search(log)
    if frame is None or regs is None:
        raise ValueError(f"no register/spill report in the ptxas log:\n{log[-2000:]}")
    ptxas_ms = _PTXAS_TIME.search(log)
    return dict(registers=int(regs.group(1)), stack_frame_bytes=int(frame.group(1)),
                spill_store_bytes=int(frame.group(2)), spill_load_bytes=int(frame.group(3)),
                ptxas_ms=float(ptxas_ms.group(1)) if ptxas_ms else None)


_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*)")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def sass_loops(sass: str) -> list[dict]:
    """Loops of a disassembled kernel (nvdisasm -c): each backward branch closes one. Per loop, in
    address order: instructions, spill loads (LDL) and stores (STL) and tensor-core instructions
    (HMMA on sm_80, HGMMA on sm_90) of ONE iteration of its body (nested loops included)."""
    labels, pending, code = {}, [], []
    for line in sass.splitlines():
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        inst = _INSTRUCTION.match(line)
        if inst:
            address = int(inst.group(1), 16)
            for name in pending:
                labels[name] = address
            pending = []
            code.append((address, inst.group(2)))
    loops = []
    for address, text in code:
        branch = _BRANCH.search(text)
        if branch and labels.get(branch.group(1), address + 1) < address:
            body = [t for a, t in code if labels[branch.group(1)] <= a <= address]
            if len(body) > 1:  # not the `BRA self` after EXIT
                loops.append(dict(start=hex(labels[branch.group(1)]), instructions=len(body),
                                  spill_loads=sum(1 for t in body if re.search(r"\bLDL\b", t)),
                                  spill_stores=sum(1 for t in body if re.search(r"\bSTL\b", t)),
                                  mma=sum(1 for t in body if "MMA" in t)))
    return loops


def disassemble(cubin: bytes) -> str:
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([knobs.nvidia.nvdisasm.path, "-c", f.name], capture_output=True, text=True,
                              check=True).stdout


_WORKER_TARGET: list = [None]


def _worker_init(extra_path: list[str], cache_dir: str | None) -> None:
    # The real compiler, never the interpreter (tests set TRITON_INTERPRET=1 for their own process).
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = cache_dir or tempfile.mkdtemp(prefix="dca-compile-check-")
    for p in extra_path:
        if p not in sys.path:
            sys.path.insert(0, p)
    import warnings

    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def compile_variant(variant: Variant, target: Target, keep_asm: bool = False) -> dict:
    """Compiles one variant for one target (in this process) -> its row of the table."""
    import torch
    from triton import knobs
    from triton.runtime import driver

    module = importlib.import_module(variant.module)
    kernel = getattr(module, variant.kernel)
    if _WORKER_TARGET[0] != target.arch:  # binders remember the target they were built for
        driver.set_active(_StandInDriver(target.arch))
        _WORKER_TARGET[0] = target.arch
    for jit in _jit_functions(module):
        jit.device_caches.clear()
    args = [getattr(torch, a) if isinstance(a, str) else a for a in variant.args]
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    row = dict(target=target.name, kernel=variant.kernel, label=variant.label, key=variant.key, uses=list(variant.uses),
               module=variant.module, args=list(variant.args), options=dict(variant.options))
    wall, cpu, children = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.warmup(*args, grid=(1,), **dict(variant.options))
    except Exception as error:  # noqa: BLE001 - any compile failure is a result to report
        row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:1500]}")
        return row
    finally:
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        row.update(compile_wall_s=round(time.perf_counter() - wall, 3),
                   compile_cpu_s=round(time.process_time() - cpu + after.ru_utime - children.ru_utime
                                       + after.ru_stime - children.ru_stime, 3))
    try:
        row.update(parse_ptxas_log(log.getvalue()))
    except ValueError as error:
        row.update(ok=False, error=str(error))
        return row
    row.update(ok=True, shared_bytes=int(compiled.metadata.shared), num_warps=compiled.metadata.num_warps,
               num_stages=compiled.metadata.num_stages)
    ptx = compiled.asm["ptx"]
    # Float32 divisions by kind: the int8 store must divide exactly (div.rn), as torch does.
    row["ptx_f32_div"] = {kind: ptx.count(f"div.{kind}.f32") for kind in ("rn", "full", "approx")}
    try:
        row["loops"] = sass_loops(disassemble(compiled.asm["cubin"]))
    except (OSError, subprocess.CalledProcessError) as error:  # the table without loops is still a table
        row["loops_error"] = str(error)[:300]
    if keep_asm:
        row["ptx"] = compiled.asm["ptx"]
    return row


def _jit_functions(module):
    from triton.runtime.jit import JITFunction

    return [v for v in vars(module).values() if isinstance(v, JITFunction)]


def _compile_job(variant: Variant, target: Target, keep_asm: bool) -> dict:
    return compile_variant(variant, target, keep_asm)


def load_on_device(row: dict) -> dict:
    """Compiles (or finds in Triton's cache) the variant of a report row for the current GPU and
    loads it through the real driver: registers and spills as the driver reports them, shared
    memory, or the error that made it fail (a GPU machine only)."""
    import torch

    module = importlib.import_module(row["module"])
    kernel = getattr(module, row["kernel"])
    args = [getattr(torch, a) if isinstance(a, str) else a for a in row["args"]]
    try:
        compiled = kernel.warmup(*args, grid=(1,), **row["options"])
        compiled._init_handles()
        return dict(ok=True, registers=compiled.n_regs, spills=compiled.n_spills, shared_bytes=compiled.metadata.shared)
    except Exception as error:  # noqa: BLE001 - reported per variant
        return dict(ok=False, error=f"{type(error).__name__}: {str(error)[:500]}")


def _cost(variant: Variant) -> int:
    """Rough compile cost (bigger tiles and head dims first: the pool ends evenly)."""
    opts = dict(variant.options)
    return (opts.get("HEAD_DIM", opts.get("BLOCK_D", 16)) * max(opts.get("BLOCK_M", 0), opts.get("BLOCK_R", 0), 16)
            * (2 if "kernel" in variant.kernel and "store" not in variant.kernel else 1))


def one_per_family(variants: list[Variant]) -> list[Variant]:
    """One variant per (kernel, tensor dtypes, constexprs, warps, stages): drops the copies that
    differ only in how Triton specialises integer arguments (divisible by 16, equal to 1)."""
    seen, out = {}, []
    for v in variants:
        family = (v.kernel, tuple(a for a in v.args if isinstance(a, str)), v.options)
        if family in seen:
            seen[family] = dataclasses.replace(seen[family], uses=seen[family].uses + v.uses)
            continue
        seen[family] = v
        out.append(family)
    return [seen[f] for f in out]


def run_check(targets=("sm_80", "sm_90a"), geometries=GEOMETRIES, workers: int | None = None,
              module: str = "dca.triton_kernels", extra_path=(), keep_asm_for=(), progress=None,
              families_only: bool = False, cache_dir: str | None = None) -> dict:
    """Enumerates and compiles every variant for every target. Returns the report (see `problems`).

    targets: names of TARGETS or Target objects (scripts/gpu_check.py passes the GPU it runs on).
    families_only: one variant per family (`one_per_family`), for a quick or a legacy table.
    cache_dir: Triton's cache for the compiles (default: a fresh one per worker, so every
    variant is really compiled and timed)."""
    import triton

    workers = workers or os.cpu_count() or 1
    start = time.perf_counter()
    targets = {t.name: t for t in (TARGETS[t] if isinstance(t, str) else t for t in targets)}
    rows = []
    ctx = _mp_context()
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(list(extra_path), cache_dir)) as pool:
        # Enumerated in the workers too: they import the kernels compiled, whatever the caller's
        # TRITON_INTERPRET (the test suite and scripts/gpu_check.py --cpu-smoke set it).
        listed = {name: pool.submit(enumerate_variants, target, geometries, module) for name, target in targets.items()}
        enumerated = {name: future.result() for name, future in listed.items()}
        if families_only:
            enumerated = {name: one_per_family(variants) for name, variants in enumerated.items()}
        enumerate_s = time.perf_counter() - start
        jobs = [(v, name) for name in targets for v in enumerated[name]]
        jobs.sort(key=lambda job: -_cost(job[0]))
        futures = {pool.submit(_compile_job, v, targets[name], v.kernel in keep_asm_for): (v, name) for v, name in jobs}
        for done in as_completed(futures):
            row = done.result()
            rows.append(row)
            if progress:
                progress(row, len(rows), len(jobs))
    order = {(name, v.key): i for i, (v, name) in enumerate((v, n) for n in targets for v in enumerated[n])}
    rows.sort(key=lambda r: order[(r["target"], r["key"])])
    for row in rows:
        limit = targets[row["target"]].smem_limit
        row["smem_limit"] = limit
        if row.get("ok"):
            row["fits_smem"] = row["shared_bytes"] <= limit
            row["fits_sm86_99KB"] = row["shared_bytes"] <= SM86_SMEM_LIMIT
            row["collapsed"] = (row["registers"] <= COLLAPSE_REGISTERS
                                and max(row["spill_store_bytes"], row["spill_load_bytes"]) > COLLAPSE_SPILL_BYTES)
    return dict(
        triton=triton.__version__, ptxas=ptxas_versions(), workers=workers,
        targets={n: dataclasses.asdict(t) for n, t in targets.items()},
        geometries=[dataclasses.asdict(g) for g in geometries],
        variants_per_target={n: len(enumerated[n]) for n in targets}, families_only=families_only,
        enumerate_s=round(enumerate_s, 2), wall_s=round(time.perf_counter() - start, 2),
        compile_cpu_s=round(sum(r.get("compile_cpu_s", 0.0) for r in rows), 1),
        rows=rows,
    )


def _mp_context():
    import multiprocessing

    # spawn: the workers import dca.triton_kernels with TRITON_INTERPRET unset, whatever the parent did.
    return multiprocessing.get_context("spawn")


def problems(report: dict) -> list[str]:
    """What makes the check fail: a variant that did not compile, one over the target's shared
    memory, one collapsed to local memory."""
    out = []
    for r in report["rows"]:
        where = f"{r['target']} {r['label']}"
        if not r.get("ok"):
            out.append(f"{where}: does not compile: {r.get('error', '?')[:300]}")
            continue
        if not r["fits_smem"]:
            out.append(f"{where}: needs {r['shared_bytes']} bytes of shared memory, the target allows "
                       f"{r['smem_limit']}")
        if r["collapsed"]:
            out.append(f"{where}: collapsed to {r['registers']} registers with {r['spill_store_bytes']} B spill "
                       f"stores / {r['spill_load_bytes']} B spill loads")
    return out


def ptxas_versions() -> dict:
    """`ptxas --version` of the assemblers Triton uses for sm_80 and sm_90a (both in the wheel)."""
    from triton import knobs

    out = {}
    for target, tool in (("sm_80", knobs.nvidia.ptxas), ("sm_90a", knobs.nvidia.ptxas_blackwell)):
        try:
            text = subprocess.run([tool.path, "--version"], capture_output=True, text=True, check=True).stdout
            release = re.search(r"release ([\d.]+), V([\d.]+)", text)
            out[target] = dict(path=os.path.relpath(tool.path, os.path.dirname(os.path.dirname(__import__("triton").__file__))),
                               release=release.group(1) if release else None,
                               version=release.group(2) if release else text.strip()[-80:])
        except (OSError, subprocess.CalledProcessError) as error:
            out[target] = dict(error=str(error))
    return out
