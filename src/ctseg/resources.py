"""Memory guards: estimate what a training step or an inference will need before starting, and refuse
with the estimate, the memory available and the setting to lower (instead of being killed by the kernel).

The estimates are analytic (nothing is allocated to make them) and deliberately simple:

- parameters: float32 weights (x4 in training: weights, gradients, two Adam moments);
- activations per pixel of the network input, per sample: each network's own estimate
  (`ctseg.registry.NetworkEntry.memory`, e.g. `ctseg.models.unet.memory_estimate`); training doubles them
  for the gradients. A network registered with UNKNOWN_MEMORY has no estimate: its checks are skipped;
- inference adds the network-resolution probabilities (classes x z x S x S float32, once per
  ensemble accumulator) and the full-resolution label map.

Available memory: free GPU memory (`torch.cuda.mem_get_info`) on CUDA; on the CPU the least of Linux
`MemAvailable`, the address space left under `ulimit -v` (RLIMIT_AS minus this process's VmSize) and the
container's cgroup memory limit minus its usage (v2 `memory.max`, v1 `memory.limit_in_bytes`); None when
none of them can be read (no check).
"""
from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

from ctseg.config import ExperimentConfig, ModelConfig
from ctseg.errors import CtsegError
from ctseg.registry import NETWORKS, MemoryEstimate

log = logging.getLogger(__name__)

GIB = 2**30


def _proc_field(path: str, name: str) -> int | None:
    """A 'Name:  N kB' field of a /proc file, in bytes."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _address_space_left() -> int | None:
    """Bytes this process may still map under RLIMIT_AS (`ulimit -v`), or None without a limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    used = _proc_field("/proc/self/status", "VmSize")
    return max(0, soft - (used or 0))


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _cgroup_memory_left() -> int | None:
    """The cgroup's memory limit minus its usage (v2, then v1), or None without a limit."""
    try:
        paths = [line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()
                 if line.count(":") >= 2]
    except OSError:
        paths = []
    root = Path("/sys/fs/cgroup")
    candidates = [(root / p.lstrip("/") / "memory.max", root / p.lstrip("/") / "memory.current") for p in paths]
    candidates += [(root / "memory.max", root / "memory.current")]
    candidates += [(root / "memory" / p.lstrip("/") / "memory.limit_in_bytes",
                    root / "memory" / p.lstrip("/") / "memory.usage_in_bytes") for p in paths]
    candidates += [(root / "memory" / "memory.limit_in_bytes", root / "memory" / "memory.usage_in_bytes")]
    for limit_path, usage_path in candidates:
        limit, usage = _read_int(limit_path), _read_int(usage_path)
        if limit is not None and usage is not None:
            return max(0, limit - usage) if limit < 2**60 else None  # v1 says "no limit" with ~2**63
    return None


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes, or None when it cannot be known (see the module doc)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    known = [v for v in (_proc_field("/proc/meminfo", "MemAvailable"), _address_space_left(), _cgroup_memory_left())
             if v is not None]
    return min(known) if known else None


def _estimate(model: ModelConfig, num_classes: int, in_channels: int = 1) -> MemoryEstimate | None:
    """The network's own estimate (`ctseg.registry.NetworkEntry.memory`); None, with a warning, when its entry
    says the memory need is unknown (UNKNOWN_MEMORY): the checks are then skipped, not guessed."""
    entry = NETWORKS.get_entry(model.arch)
    if entry.memory is None:
        log.warning("network %r has no memory estimate: memory checks are skipped", model.arch)
        return None
    return entry.memory(model, num_classes, in_channels)


def parameter_count(model: ModelConfig, num_classes: int, in_channels: int = 1) -> float:
    """Approximate number of weights (float, so that absurd configurations do not overflow); 0 when unknown."""
    est = _estimate(model, num_classes, in_channels)
    return est.parameters if est is not None else 0.0


def activation_values_per_pixel(model: ModelConfig, num_classes: int) -> float:
    """Activations kept by one forward pass, per sample and per pixel (voxel) of the network input; 0 when unknown."""
    est = _estimate(model, num_classes)
    return est.activations_per_pixel if est is not None else 0.0


def training_step_bytes(cfg: ExperimentConfig, num_classes: int) -> float:
    """Estimated peak bytes of one training step of `cfg` (an ExperimentConfig)."""
    s = cfg.preprocess.in_plane_size
    if cfg.model.dim == "2d":
        batch, pixels = cfg.train.batch_size_2d, float(s) * s
    else:
        batch, pixels = cfg.train.batch_size_3d, float(cfg.preprocess.num_slices) * s * s
    activations = 2.0 * activation_values_per_pixel(cfg.model, num_classes) * pixels * batch * 4
    return activations + 4.0 * 4 * parameter_count(cfg.model, num_classes)


def inference_bytes(cfg: ExperimentConfig, num_classes: int, n_models: int, shape_zyx: tuple[int, int, int],
                    batch_size: int | None, probabilities: bool) -> float:
    """Estimated peak bytes of `ctseg.inference.predict.predict_volume` on a (z, y, x) volume."""
    z, h, w = (float(v) for v in shape_zyx)
    s = float(cfg.preprocess.in_plane_size)
    if cfg.model.dim == "2d":
        per_pass = float(batch_size or 32) * s * s
    else:
        per_pass = float(batch_size or 2) * cfg.preprocess.num_slices * s * s
    network = z * s * s * 4 * (1 + num_classes * (1 + (2 if n_models > 1 else 0)))
    full = z * h * w * (4 + 2 + (2 * num_classes if probabilities else 0)) + 64 * 2**20
    forward = activation_values_per_pixel(cfg.model, num_classes) * per_pass * 4
    return network + full + forward + 4.0 * parameter_count(cfg.model, num_classes) * n_models



def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd saves for backward during one forward of `model` on `x`: what the memory estimators'
    `activations_per_pixel` models (checked in tests/test_models.py, measured in benchmarks/bench_models.py)."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return total

def check_memory(needed: float, device: torch.device, what: str, lower: str, path: str | Path | None = None) -> None:
    """CtsegError when `needed` bytes exceed the memory available on `device`."""
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise CtsegError(f"{what} needs about {needed / GIB:,.1f} GiB but {available / GIB:,.1f} GiB are available "
                         f"on {device}; lower {lower}", path)
