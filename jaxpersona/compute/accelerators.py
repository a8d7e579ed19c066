"""Accelerator specs for plans and rooflines, slice names (``v5e-64``, ``v5p-8``, ``8xh100``), and what this host
has: the TPU and CUDA runtimes installed, TPU chips on its PCI bus (no JAX backend is started to find out).

Peaks are the vendors' dense bf16 figures (Cloud TPU pages; NVIDIA's H100/H200 SXM data sheets), HBM bandwidth
and the per-chip interconnect bandwidth (ICI for TPUs, NVLink for GPUs), both directions together as the
vendors quote them; a ring collective moves data one way, so :func:`link_bytes_per_s` is half of it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import re
from pathlib import Path

from jaxpersona import errors

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    platform: str  # "tpu" or "gpu"
    memory: int  # bytes of HBM per device
    bf16_flops: float  # dense bf16 FLOP/s per device
    hbm_bytes_per_s: float
    link_bidir_bytes_per_s: float  # ICI / NVLink, per chip, both directions
    topology: str | None = None  # libtpu's name of the chip generation ("v5e"), TPUs only
    cores_per_chip: int = 1  # how a slice name counts (v5p-8 = 4 chips of 2 TensorCores)

    @property
    def link_bytes_per_s(self) -> float:
        return self.link_bidir_bytes_per_s / 2


ACCELERATORS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("v4", "tpu", 32 * GIB, 275e12, 1228e9, 600e9, "v4", 2),
    Accelerator("v5e", "tpu", 16 * GIB, 197e12, 819e9, 400e9, "v5e", 1),
    Accelerator("v5p", "tpu", 95 * GIB, 459e12, 2765e9, 1200e9, "v5p", 2),
    Accelerator("v6e", "tpu", 32 * GIB, 918e12, 1638e9, 800e9, "v6e", 1),
    Accelerator("h100", "gpu", 80 * 10**9, 989e12, 3.35e12, 900e9),
    Accelerator("h200", "gpu", 141 * 10**9, 989e12, 4.8e12, 900e9),
    Accelerator("a100-80gb", "gpu", 80 * 10**9, 312e12, 2.039e12, 600e9),
    Accelerator("a100-40gb", "gpu", 40 * 10**9, 312e12, 1.555e12, 600e9),
    Accelerator("l4", "gpu", 24 * 10**9, 121e12, 300e9, 64e9),
)}

# TPU slice shapes libtpu knows, by chip count (2-D tori for v5e/v6e, 3-D for v4/v5p)
_TOPOLOGY_2D = {1: "1x1", 2: "1x2", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_TOPOLOGY_3D = {1: "1x1x1", 2: "1x2x1", 4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
                256: "4x8x8"}


def accelerator(name: str) -> Accelerator:
    try:
        return ACCELERATORS[name.lower()]
    except KeyError:
        raise errors.InputError(f"unknown accelerator {name!r}; known: {sorted(ACCELERATORS)}") from None


def topology_name(acc: Accelerator, chips: int) -> str:
    """libtpu's topology name of ``chips`` chips of ``acc`` (``"v5e:8x8"``)."""
    table = _TOPOLOGY_3D if acc.name in ("v4", "v5p") else _TOPOLOGY_2D
    if chips not in table:
        raise errors.MeshError(f"no {acc.name} slice of {chips} chips; slices: {sorted(table)} chips")
    return f"{acc.topology}:{table[chips]}"


def host_bounds(acc: Accelerator, chips: int) -> tuple[int, int, int] | None:
    """libtpu's ``chips_per_host_bounds`` for a slice smaller than one host (4 chips): the slice itself (libtpu
    refuses ``v5e:1x1`` against its default 2x2x1 host); None for a slice of whole hosts."""
    if chips >= 4:
        return None
    dims = [int(x) for x in topology_name(acc, chips).split(":")[1].split("x")]
    return (dims + [1, 1, 1])[:3]  # type: ignore[return-value]


def parse_slice(text: str) -> tuple[Accelerator, int]:
    """``"v5e-64"`` (64 chips), ``"v5p-8"`` (TensorCores: 4 chips), ``"8xh100"`` or ``"h200"`` (1) ->
    ``(accelerator, chips)``."""
    t = text.strip().lower()
    m = re.fullmatch(r"(\d+)x([a-z0-9-]+)", t)
    if m:
        return accelerator(m.group(2)), int(m.group(1))
    m = re.fullmatch(r"(v\d+[a-z]?)-(\d+)", t)
    if m:
        acc = accelerator(m.group(1))
        n = int(m.group(2))
        if n % acc.cores_per_chip:
            raise errors.InputError(f"slice {text!r}: {acc.name} slices count TensorCores ({acc.cores_per_chip} per chip)")
        return acc, n // acc.cores_per_chip
    if t in ACCELERATORS:
        return ACCELERATORS[t], 1
    raise errors.InputError(f"slice {text!r}: write it as v5e-64, v5p-8 (TensorCores), 8xh100 or h200")


# --- this host ------------------------------------------------------------------------------------
def libtpu_available() -> bool:
    """libtpu is installed (the ``aot`` extra: deviceless TPU compiles; on a TPU host, the TPU runtime)."""
    return importlib.util.find_spec("libtpu") is not None


def cuda_plugin_installed() -> bool:
    return any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))


def tpu_chips_on_pci() -> bool:
    """Whether a TPU chip is on the PCI bus, by JAX's own detection (Google's vendor id and the TPU device ids it
    knows); where that function is not there (another JAX), any Google PCI device counts, to be safe."""
    try:
        from jax._src.hardware_utils import num_available_tpu_chips_and_device_id
    except ImportError:
        pass
    else:
        return num_available_tpu_chips_and_device_id()[0] > 0
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == "0x1ae0":
                return True
        except OSError:
            continue
    return False
