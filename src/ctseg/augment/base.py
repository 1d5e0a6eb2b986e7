"""The augmenter interface shared by CTIA, MIA, nnU-Net's pipeline and "none", plus small random helpers.

An augmenter maps a batch of stacks to a batch of the same shape, dtype and device:

    image: Tensor (B, 1, Z, Y, X) float32, z-scored windowed intensities
    label: Tensor (B, 1, Z, Y, X) int64 class map
    generator: torch.Generator, the only source of randomness (same seed -> same output)

For dim "2d" the Z slices of a stack are independent 2D training images (the trainer flattens Z
into the batch afterwards); for "3d" a stack is one 3D training image.

An augmentation is a sampler plus a pure function: `sample(image, generator)` draws every random choice for
the batch (None: leave it as it is), `apply(image, label, params, generator)` applies them (the generator only
for noise maps). A new augmentation subclasses `Augmenter` (or `ParamsAugmenter`, which returns the inputs for
None and implements only `apply_params`) and registers itself (`ctseg.registry.AUGMENTERS`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

Dim = Literal["2d", "3d"]
P = TypeVar("P")


@runtime_checkable
class IntensityPlanLike(Protocol):
    """What the augmenters need from `ctseg.preprocess.windowing.IntensityPlan`: window in HU and z-score stats."""

    @property
    def lower(self) -> float: ...

    @property
    def upper(self) -> float: ...

    @property
    def mean(self) -> float: ...

    @property
    def std(self) -> float: ...


class Augmenter(ABC):
    """Base class: `augmenter(image, label, generator) -> (image, label)` is `apply(sample(...))`."""

    dim: Dim

    @abstractmethod
    def sample(self, image: Tensor, generator: torch.Generator) -> Any:
        """Every random choice for this batch (image read for its shape and, if needed, intensities); None
        leaves the batch as it is."""

    @abstractmethod
    def apply(self, image: Tensor, label: Tensor, params: Any, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The batch with `params` (from `sample`) applied; None returns the inputs."""

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        check_batch(image, label)
        return self.apply(image, label, self.sample(image, generator), generator)


class ParamsAugmenter(Augmenter, Generic[P]):
    """An augmenter whose `sample` draws parameters of type P, or None to leave the batch as it is: `apply`
    returns the inputs for None and hands drawn parameters to `apply_params`."""

    @abstractmethod
    def sample(self, image: Tensor, generator: torch.Generator) -> P | None:
        """Every random choice for this batch; None leaves the batch as it is."""

    def apply(self, image: Tensor, label: Tensor, params: P | None,
              generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Apply drawn parameters (the generator only draws the noise maps); None returns the inputs."""
        if params is None:
            return image, label
        return self.apply_params(image, label, params, generator)

    @abstractmethod
    def apply_params(self, image: Tensor, label: Tensor, params: P,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The batch with drawn `params` applied."""


class NoAugment(Augmenter):
    """Returns its inputs unchanged (config `augment.name: none`)."""

    def __init__(self, dim: Dim):
        self.dim = dim

    def sample(self, image: Tensor, generator: torch.Generator) -> None:
        return None

    def apply(self, image: Tensor, label: Tensor, params: None, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return image, label


def check_batch(image: Tensor, label: Tensor) -> None:
    """Raise ValueError unless image/label are (B, 1, Z, Y, X) float / integer tensors of one shape and device."""
    if image.ndim != 5 or image.shape[1] != 1:
        raise ValueError(f"expected image of shape (B, 1, Z, Y, X), got {tuple(image.shape)}")
    if label.shape != image.shape:
        raise ValueError(f"label shape {tuple(label.shape)} differs from image shape {tuple(image.shape)}")
    if not image.is_floating_point() or label.is_floating_point():
        raise ValueError(f"expected float image and integer label, got {image.dtype} and {label.dtype}")
    if image.device != label.device:
        raise ValueError(f"image on {image.device} but label on {label.device}")


def uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """(n,) float32 draws from U[low, high) on the generator's device."""
    return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low


def bernoulli(n: int, p: float, generator: torch.Generator) -> Tensor:
    """(n,) bool, each True with probability p (always draws n numbers, so streams stay aligned)."""
    return torch.rand(n, generator=generator, device=generator.device) < p


def batch_gate(dim: Dim, p_batch_2d: float, p_batch_3d: float, generator: torch.Generator) -> bool:
    """Whether this batch is augmented: the paper augments 90 % of 2D and 80 % of 3D training batches.

    Draws exactly one number, so every augmenter's stream starts the same way."""
    p = p_batch_2d if dim == "2d" else p_batch_3d
    return bool(bernoulli(1, p, generator).item())


def generator_for(device: torch.device, generator: torch.Generator) -> torch.Generator:
    """`generator` itself if it lives on `device`, else a new generator there seeded from it."""
    if torch.device(device).type == generator.device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator(device=device).manual_seed(seed)


class ComposedAugmenter(Augmenter):
    """Several family augmenters applied in order under one batch gate (an arm of several steps).

    open_steps run when the gate opens (each built with its own gate always open); closed_steps run when it
    does not (CTIA built with its gate shut, so that only its ungated CWVRS acts, as in CTIA itself)."""

    def __init__(self, dim: Dim, p_batch_2d: float, p_batch_3d: float, open_steps: list[Augmenter],
                 closed_steps: list[Augmenter]):
        self.dim = dim
        self.p_batch_2d, self.p_batch_3d = p_batch_2d, p_batch_3d
        self.open_steps, self.closed_steps = open_steps, closed_steps

    def sample(self, image: Tensor, generator: torch.Generator) -> bool:
        """Whether the gate opens (one draw); the steps draw their own parameters when applied."""
        return batch_gate(self.dim, self.p_batch_2d, self.p_batch_3d, generator)

    def apply(self, image: Tensor, label: Tensor, params: bool, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        for step in self.open_steps if params else self.closed_steps:
            image, label = step(image, label, generator)
        return image, label
