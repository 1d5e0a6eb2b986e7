"""Memory guards: estimate what a training step or an inference will need before starting, and refuse
with the estimate, the memory available and the setting to lower (instead of being killed by the kernel).

The estimates are analytic (nothing is allocated to make them) and deliberately simple:

- parameters: float32 weights (x4 in training: weights, gradients, two Adam moments);
- activations per pixel of the network input, per sample: MS-D Net keeps the input, every layer's
  output, its normalised and its activated copy (1 + 3 x depth x width values) plus the logits;
  U-Net keeps 3 values (convolution, norm, activation) per feature per convolution in the encoder
  and the decoder, each stage at 1/4 of the pixels of the one above (1/8 where 3D pooling also
  halves z); training doubles them for the gradients;
- inference adds the network-resolution probabilities (classes x z x S x S float32, once per
  ensemble accumulator) and the full-resolution label map.

Available memory: free GPU memory (`torch.cuda.mem_get_info`) on CUDA, else Linux `MemAvailable`
(None elsewhere: no check).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ctseg.config import ModelConfig
from ctseg.errors import CtsegError

GIB = 2**30


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory on `device` in bytes, or None when it cannot be known."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _unet_stages(model: ModelConfig) -> list[tuple[int, float]]:
    """(features, fraction of the input pixels) per U-Net stage."""
    u = model.unet
    cap = u.max_features if u.max_features is not None else (512 if model.dim == "2d" else 320)
    stages, fraction = [], 1.0
    for s in range(u.n_stages):
        stages.append((min(u.base_features * 2**s, cap), fraction))
        fraction /= 8.0 if (model.dim == "3d" and s < u.z_pool_stages) else 4.0
    return stages


def parameter_count(model: ModelConfig, num_classes: int, in_channels: int = 1) -> float:
    """Approximate number of weights (float, so that absurd configurations do not overflow)."""
    k = 27.0 if model.dim == "3d" else 9.0
    if model.arch == "msd":
        m = model.msd
        layers = sum(float(in_channels + i * m.width) for i in range(min(m.depth, 10)))  # exact start ...
        if m.depth > 10:  # ... then the closed form of sum_i (in + i w) for the remaining layers
            n0, n1 = 10.0, float(m.depth)
            layers += in_channels * (n1 - n0) + m.width * (n1 * (n1 - 1) - n0 * (n0 - 1)) / 2.0
        return layers * m.width * k + (in_channels + float(m.depth) * m.width) * num_classes
    total, previous = 0.0, float(in_channels)
    for features, _ in _unet_stages(model):
        total += k * features * (previous + features * (2 * model.unet.conv_per_stage - 1))
        previous = features
    return total


def activation_values_per_pixel(model: ModelConfig, num_classes: int) -> float:
    """Activations kept by one forward pass, per sample and per pixel (voxel) of the network input."""
    if model.arch == "msd":
        return 1.0 + 3.0 * float(model.msd.depth) * model.msd.width + num_classes
    cps = model.unet.conv_per_stage
    return sum(2 * 3 * cps * f * frac for f, frac in _unet_stages(model)) + num_classes


def training_step_bytes(cfg, num_classes: int) -> float:
    """Estimated peak bytes of one training step of `cfg` (an ExperimentConfig)."""
    s = cfg.preprocess.in_plane_size
    if cfg.model.dim == "2d":
        batch, pixels = cfg.train.batch_size_2d, float(s) * s
    else:
        batch, pixels = cfg.train.batch_size_3d, float(cfg.preprocess.num_slices) * s * s
    activations = 2.0 * activation_values_per_pixel(cfg.model, num_classes) * pixels * batch * 4
    return activations + 4.0 * 4 * parameter_count(cfg.model, num_classes)


def inference_bytes(cfg, num_classes: int, n_models: int, shape_zyx: tuple[int, int, int],
                    batch_size: int | None, probabilities: bool) -> float:
    """Estimated peak bytes of `ctseg.predict.predict_volume` on a (z, y, x) volume."""
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


def check_memory(needed: float, device: torch.device, what: str, lower: str, path: str | Path | None = None) -> None:
    """CtsegError when `needed` bytes exceed the memory available on `device`."""
    available = available_memory_bytes(device)
    if available is not None and needed > available:
        raise CtsegError(f"{what} needs about {needed / GIB:,.1f} GiB but {available / GIB:,.1f} GiB are available "
                         f"on {device}; lower {lower}", path)
