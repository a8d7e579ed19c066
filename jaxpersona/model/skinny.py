"""A CPU kernel for float32 matmuls against one layer of a stacked weight, read in place.

``matmul(x, stack, layer)`` is ``x @ stack[layer]`` (``x [..., K]``, ``stack [L, K, N]``, ``layer`` an int32
scalar, e.g. the layer scan's counter) -> ``[..., N]``. A decode step is a handful of rows against every weight
of the model; inside the layer scan XLA:CPU copies each layer's slice out of the stacked weights before its
dot, and its dot (as torch's) streams a weight at ~9 GB/s at 16 rows on a 2-core Xeon. The kernel
(``skinny_matmul.cc``, an XLA FFI custom call) reads the layer where it lies at ~16 GB/s for few rows, and from
32 rows on multiplies packed panels of the weight at XLA's rate or a little above (a layer's 7 projections: 2.1x
XLA's speed at 16 rows, 1.04x at 1024; ``scripts/bench_matmul.py``). Used by every decode step of the
library's generation and the server's.

Numerics: each output is a fixed-order fp32 sum (parts of K, each in order, then added), the same for any
number of rows, batch or thread count, and for either path; it differs from XLA's dot in the last bits (~1e-6
relative), as two BLAS libraries do. It is built on first use with the system's C++ compiler (``g++ -O3
-march=native``, into ``<cache>/kernels/``) and needs an x86-64 CPU with AVX-512F; anything else (no compiler,
another CPU, a GPU or TPU, ``JAXPERSONA_CPU_KERNEL=0``) leaves :func:`available` False, and callers keep XLA's
dot. Gradients flow (its JVP uses XLA's dots); under ``vmap`` the batch becomes more rows of one call (the
same numbers as one call per element).

The package's other CPU kernel, :mod:`jaxpersona.model.cache_attention` (a decode step's attention over the
carried cache), is built into the same library (:data:`KERNELS`) and shares :func:`available`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxpersona import errors
from jaxpersona.model import registry

TARGET = "jaxpersona_skinny_matmul"
SOURCE = Path(__file__).with_name("skinny_matmul.cc")
# every CPU kernel of the package, built into one library: (source, FFI target, handler symbol)
ATTENTION_TARGET = "jaxpersona_cache_attention"  # jaxpersona.model.cache_attention's
KERNELS = ((SOURCE, TARGET, "JpSkinnyMatmul"),
           (Path(__file__).with_name("cache_attention.cc"), ATTENTION_TARGET, "JpCacheAttention"))
HEADER = Path(__file__).with_name("kernel_items.h")  # included by both (how their work is shared out)
ENV = "JAXPERSONA_CPU_KERNEL"  # "0": never use the kernel
FEW_ROWS = 128  # the server's prefill calls use the kernel up to this many rows (where it beats XLA's dot by 1.1-1.2x)
_state: dict[str, str] = {}


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def library_path() -> Path:
    """Where the built kernels for these sources, jaxlib and machine live (``<cache>/kernels/``)."""
    sources = b"".join(src.read_bytes() for src in (*(k[0] for k in KERNELS), HEADER))
    key = hashlib.sha256(sources + jax.lib.__version__.encode() + platform.machine().encode()
                         + platform.node().encode()).hexdigest()[:16]
    return registry.cache_dir() / "kernels" / f"skinny_matmul-{key}.so"


def _build(out: Path) -> None:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++) on PATH")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", f"-I{jax.ffi.include_dir()}",
           *(str(src) for src, _, _ in KERNELS), "-o", tmp]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-800:]}")
        os.replace(tmp, out)  # atomic: a concurrent build of the same key leaves one complete file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def available() -> bool:
    """Whether the kernel is built, loaded and registered for this process (builds it on first call)."""
    if os.environ.get(ENV, "1") == "0":
        _state["reason"] = f"{ENV}=0"
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        _state["reason"] = f"needs x86-64 with AVX-512F (this CPU: {platform.machine()})"
        return False
    try:
        path = library_path()
        if not path.exists():
            _build(path)
        lib = ctypes.cdll.LoadLibrary(str(path))
        if not lib.jp_skinny_supported():
            _state["reason"] = "this CPU has no AVX-512F"
            return False
        for _, target, symbol in KERNELS:
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        _state["reason"] = str(e)
        return False
    return True


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True or was not asked)."""
    return _state.get("reason")


def for_decode() -> bool:
    """Whether the library's decode steps read their float32 projections with the kernel: a CPU backend with one
    device (a mesh shards the weights; the kernel has no partitioning rule) and the kernel :func:`available`."""
    return jax.default_backend() == "cpu" and jax.device_count() == 1 and available()


def applies(x: jax.Array, stack: jax.Array) -> bool:
    """Whether ``matmul(x, stack, layer)`` may use the kernel: float32 both, the kernel available."""
    return x.dtype == jnp.float32 and stack.dtype == jnp.float32 and available()


def _sliced(x: jax.Array, stack: jax.Array, layer: jax.Array) -> jax.Array:
    """``x @ stack[layer]`` by XLA (the slice is a copy on a CPU)."""
    return x @ jax.lax.dynamic_index_in_dim(stack, layer, 0, keepdims=False)


@jax.custom_batching.custom_vmap
def _call(x: jax.Array, stack: jax.Array, layer: jax.Array) -> jax.Array:
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((*x.shape[:-1], stack.shape[2]), jnp.float32))
    return call(x, stack, layer)


@_call.def_vmap
def _call_vmap(axis_size: int, in_batched: list[bool], x: jax.Array, stack: jax.Array,
               layer: jax.Array) -> tuple[jax.Array, bool]:
    """A batch of ``x`` against one weight: the batch becomes more rows of one call (a row's numbers do not
    depend on the rows beside it, so this equals one call per element, bit for bit). A batched weight or layer
    (not a decode step's case): one call per element."""
    if not in_batched[1] and not in_batched[2]:
        return _call(x, stack, layer), True
    return map_batched(_call, (x, stack, layer), in_batched), True


def map_batched(call: Callable[..., jax.Array], args: tuple[jax.Array, ...], in_batched: list[bool]) -> jax.Array:
    """A kernel's vmap rule when the batch cannot join one call: ``call`` once per element of the batched
    ``args`` (``lax.map``); unbatched arguments are read as they are."""
    mapped = tuple(a for a, b in zip(args, in_batched) if b)

    def one(m: tuple[jax.Array, ...]) -> jax.Array:
        it = iter(m)
        return call(*(next(it) if b else a for a, b in zip(args, in_batched)))

    return jax.lax.map(one, mapped)


@jax.custom_jvp
def _kernel(x: jax.Array, stack: jax.Array, layer: jax.Array) -> jax.Array:
    return _call(x, stack, layer.astype(jnp.int32))


@_kernel.defjvp
def _kernel_jvp(primals, tangents):  # type: ignore[no-untyped-def]
    x, stack, layer = primals
    dx, dstack, _ = tangents
    return _kernel(x, stack, layer), _sliced(dx, stack, layer) + _sliced(x, dstack, layer)


def matmul(x: jax.Array, stack: jax.Array, layer: jax.Array | int) -> jax.Array:
    """``x [..., K] @ stack[layer] [K, N]`` -> ``[..., N]`` float32, with the kernel where :func:`applies` (on a
    CPU; elsewhere XLA's dot of the slice)."""
    if stack.ndim != 3 or x.ndim < 1 or x.shape[-1] != stack.shape[1]:
        raise errors.ShapeMismatchError(f"skinny.matmul: x {tuple(x.shape)} against a stack {tuple(stack.shape)}; "
                                        "needs x [..., K] and stack [L, K, N]")
    layer = jnp.asarray(layer, jnp.int32)
    if not applies(x, stack):
        return _sliced(x, stack, layer)
    return jax.lax.platform_dependent(x, stack, layer, cpu=_kernel, default=_sliced)
