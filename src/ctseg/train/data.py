"""Training batches from the preprocessed cache, and validation on whole cached volumes.

Algorithm 1 of the paper, one step: draw random training volumes, take 16 random (sorted) foreground slices
of each, augment, feed the network.

- 2D: ceil(batch_size_2d / 16) volumes -> (B_vol, 1, 16, S, S), augmented with the 2D augmenter (each of
  the 16 slices an independent image; slice skipping/interpolation act along z), then z is flattened into
  the batch and `batch_size_2d` of the B_vol*16 slices are kept (a random subset) -> (B, 1, S, S).
- 3D: `batch_size_3d` volumes x 16 slices -> (B, 1, 16, S, S), 3D augmenter.

Randomness: every step draws from generators made afresh from (seed, rank, epoch, step) (`step_seed`), so the
data stream is a pure function of the position in the run: the same with 0 or N loader workers, resumable
after any epoch without storing generator states, and different on every DDP rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ctseg.augment import CTIAConfig, acquisition_config
from ctseg.config import ExperimentConfig, PredictConfig
from ctseg.errors import CtsegError
from ctseg.inference.trained import FOREGROUND_NAME

if TYPE_CHECKING:  # annotations only: the augmenters (kornia, batchgenerators) load when training starts
    from ctseg.augment.base import Augmenter
    from ctseg.preprocess.cache import SliceCache


def step_seed(seed: int, rank: int, epoch: int, step: int) -> int:
    """A 63-bit seed for one training step, well mixed (numpy SeedSequence) from its coordinates."""
    words = np.random.SeedSequence([seed, rank, epoch, step]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def output_classes(dataset_classes: dict[int, str], target: str) -> dict[int, str]:
    """Meaning of the network's output channels: the dataset's classes, or background/foreground."""
    if target == "multiclass":
        return {int(k): str(v) for k, v in sorted(dataset_classes.items())}
    background = dataset_classes.get(0, "background")
    return {0: str(background), 1: FOREGROUND_NAME}


def map_label(label: np.ndarray, target: str) -> np.ndarray:
    """Dataset label values -> training target: unchanged (multiclass) or label > 0 (foreground); int64."""
    if target == "foreground":
        return (label > 0).astype(np.int64)
    return label.astype(np.int64)


@dataclass(frozen=True)
class BatchPlan:
    """Shape of a training batch: `dim` "2d"|"3d", slices per volume, volumes per step, final batch size."""

    dim: str
    num_slices: int
    volumes: int
    batch_size: int

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> "BatchPlan":
        n = cfg.preprocess.num_slices
        if cfg.model.dim == "2d":
            b = cfg.train.batch_size_2d
            return cls("2d", n, math.ceil(b / n), b)
        b = cfg.train.batch_size_3d
        return cls("3d", n, b, b)


def draw_stacks(cache: SliceCache, case_ids: list[str], plan: BatchPlan, target: str, rng: np.random.Generator,
                exclude_background: bool = True, oversample: float = 0.0, acquisition: CTIAConfig | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Load `plan.volumes` random volumes x `plan.num_slices` sampled slices (`sample_slices`; `oversample`:
    its class oversampling).

    acquisition: a `CTIAConfig` with z_mode "volume": each stack is, with the config's slice skipping /
    interpolation probabilities (times the batch gate's, as when they acted inside the stack), sampled from a
    simulated thicker or shifted acquisition of the whole volume (`ctseg.augment.acquisition`), its slices drawn
    from the simulated grid by the same `sample_slices` rule, class oversampling included.
    A volume with fewer slices than `plan.num_slices` is edge-padded along z (its last slice repeated).

    Returns image float32 (V, 1, Z, S, S), label int64 (V, 1, Z, S, S) and, for 2D, the indices (batch_size,)
    into the flattened V*Z slices that the step keeps (None for 3D).
    """
    from ctseg.augment.acquisition import NONE, acquire_stack, sample_acquisition
    from ctseg.preprocess.slices import sample_slices

    chosen = rng.choice(len(case_ids), size=plan.volumes, replace=len(case_ids) < plan.volumes)
    images, labels = [], []
    for i in chosen:
        case = cache.load(case_ids[int(i)])
        if case.label is None:
            raise CtsegError(f"case {case_ids[int(i)]} has no label: training needs labelled cases")
        mode = NONE
        if acquisition is not None:
            gate = acquisition.p_batch_2d if plan.dim == "2d" else acquisition.p_batch_3d
            mode, factor, phase = sample_acquisition(acquisition.slice_skip_p * gate, acquisition.slice_skip_max_factor,
                                                     acquisition.slice_interp_p * gate,
                                                     acquisition.slice_interp_min_factor, rng)
        if mode != NONE:
            image, label = acquire_stack(case.image, case.label, plan.num_slices, mode, factor, phase, rng,
                                         exclude_background, oversample)
        else:
            idx = np.asarray(sample_slices(case.label, plan.num_slices, rng, exclude_background=exclude_background,
                                           oversample=oversample))
            image, label = np.asarray(case.image[idx], dtype=np.float32), np.asarray(case.label[idx])
        if image.shape[0] < plan.num_slices:  # volume shorter than the stack: repeat its last slice (as in validation)
            pad = plan.num_slices - image.shape[0]
            image = np.concatenate([image, np.repeat(image[-1:], pad, axis=0)])
            label = np.concatenate([label, np.repeat(label[-1:], pad, axis=0)])
        images.append(image)
        labels.append(map_label(label, target))
    keep = None
    if plan.dim == "2d":
        keep = torch.from_numpy(np.sort(rng.permutation(plan.volumes * plan.num_slices)[: plan.batch_size]))
    return torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(labels)[:, None]), keep


def to_network_batch(image: torch.Tensor, label: torch.Tensor, keep: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented stacks -> network input and loss target.

    2D: (V,1,Z,S,S) -> image (B,1,S,S), target (B,S,S) with the `keep` slices. 3D: image unchanged,
    target (V,Z,S,S).
    """
    if keep is None:
        return image, label[:, 0]
    v, c, z, h, w = image.shape
    flat_image = image.permute(0, 2, 1, 3, 4).reshape(v * z, c, h, w)
    flat_label = label.permute(0, 2, 1, 3, 4).reshape(v * z, h, w)
    keep = keep.to(image.device)
    return flat_image.index_select(0, keep), flat_label.index_select(0, keep)


class TrainStream(IterableDataset[dict[str, Any]]):
    """The batches of global steps `start`..`stop`-1 in order; DataLoader workers split them round-robin.

    Global step g is step g % steps_per_epoch of epoch g // steps_per_epoch. Worker w of W produces
    steps start+w, start+w+W, ...; PyTorch's loader returns worker outputs round-robin, so the loader yields
    the steps in order whatever W is, and one loader (persistent workers) serves the whole run.
    Each item is a dict with `epoch`, `step` (within the epoch), `image`, `label` (network-ready if
    `augment_here`, else the raw stacks) and `keep` (2D subset indices, raw stacks only, else None).
    """

    def __init__(self, cache: SliceCache, case_ids: list[str], cfg: ExperimentConfig, *, rank: int, start: int,
                 stop: int, augment_here: bool, augmenter: Augmenter | None = None):
        super().__init__()
        self.cache = cache
        self.case_ids = list(case_ids)
        self.plan = BatchPlan.from_config(cfg)
        self.target = cfg.model.target
        self.exclude_background = cfg.preprocess.exclude_background_slices
        self.oversample = cfg.train.oversample_foreground
        self.seed, self.rank = cfg.seed, rank
        self.steps_per_epoch = cfg.train.steps_per_epoch
        self.start, self.stop = start, stop
        self.augment_here = augment_here
        self.augmenter = augmenter
        self.acquisition = acquisition_config(cfg.augment)

    def make_step(self, global_step: int) -> dict[str, Any]:
        epoch, step = divmod(global_step, self.steps_per_epoch)
        s = step_seed(self.seed, self.rank, epoch, step)
        rng = np.random.default_rng(s)
        image, label, keep = draw_stacks(self.cache, self.case_ids, self.plan, self.target, rng,
                                         self.exclude_background, self.oversample, self.acquisition)
        item = {"epoch": epoch, "step": step}
        if not self.augment_here:
            return {**item, "image": image, "label": label, "keep": keep}
        if self.augmenter is not None:
            image, label = self.augmenter(image, label, torch.Generator().manual_seed(s))
        image, label = to_network_batch(image, label, keep)
        return {**item, "image": image.contiguous(), "label": label.contiguous(), "keep": None}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for g in range(self.start + worker, self.stop, workers):
            yield self.make_step(g)


def make_loader(stream: TrainStream, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over a `TrainStream` (items are whole batches: batch_size=None)."""
    kwargs: dict[str, Any] = {"prefetch_factor": 4} if num_workers > 0 else {}
    return DataLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory, **kwargs)


# --- validation ---------------------------------------------------------------------------------------------

@torch.no_grad()
def predict_cached(model: torch.nn.Module, image: np.ndarray, dim: str, device: torch.device, num_classes: int,
                   batch_size: int = 28, chunk: int = 16, autocast_dtype: torch.dtype | None = None,
                   predict: PredictConfig | None = None, overlap: float = 0.5) -> np.ndarray:
    """Label map (z, S, S) uint8 of a cached, normalised volume at network resolution (argmax of softmax).

    2D: all slices, `batch_size` at a time. 3D: stacks of `chunk` slices with the z-context of `predict`
    (default `PredictConfig()`), by `ctseg.inference.windows.softmax_3d`: the same stacks, blending and passes as
    `ctseg.inference.predict.predict_network` with its default overlap, one stack per forward pass.
    """
    from ctseg.inference.windows import check_finite_output, softmax_3d

    vol = torch.from_numpy(np.asarray(image, dtype=np.float32))
    z = vol.shape[0]
    amp = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    if dim == "2d":
        out = []
        for i in range(0, z, batch_size):
            x = vol[i:i + batch_size, None].to(device)
            with amp:
                logits = model(x)
            check_finite_output(logits, None)
            out.append(logits.float().argmax(1).to("cpu", torch.uint8))
        return torch.cat(out).numpy()
    pc = predict or PredictConfig()
    probs = torch.empty((num_classes,) + tuple(vol.shape), dtype=torch.float32, device=device)
    with amp:
        softmax_3d(model, vol.to(device), chunk, probs, z_context=pc.z_context, draws=pc.z_draws, seed=pc.z_seed,
                   overlap=overlap, batch_size=1)
    return probs.argmax(0).to("cpu", torch.uint8).numpy()


def validate_cases(model: torch.nn.Module, cache: SliceCache, case_ids: list[str], cfg: ExperimentConfig,
                   device: torch.device, num_classes: int, autocast_dtype: torch.dtype | None = None
                   ) -> dict[str, dict[int, float]]:
    """Dice per foreground class of each case in `case_ids` at network resolution, on the slices
    `cfg.train.val_slices` names: the reference's foreground slices (the paper protocol of Table 2) or all.
    NonFiniteOutput naming the case when the network's output is NaN or infinite (finite weights that overflow)."""
    from ctseg.evaluate.metrics import dice
    from ctseg.inference.windows import NonFiniteOutput

    was_training = model.training
    model.eval()
    results = {}
    try:
        for cid in case_ids:
            case = cache.load(cid)
            try:
                pred = predict_cached(model, case.image, cfg.model.dim, device, num_classes,
                                      batch_size=cfg.train.batch_size_2d, chunk=cfg.preprocess.num_slices,
                                      autocast_dtype=autocast_dtype, predict=cfg.predict)
            except NonFiniteOutput as err:
                raise NonFiniteOutput(f"training diverged: on validation case {cid} the network outputs NaN or "
                                      f"infinite values; lower train.lr (now {cfg.train.lr:g}) or check the data"
                                      ) from err
            truth = map_label(np.asarray(case.label), cfg.model.target)
            if cfg.train.val_slices == "foreground":
                keep = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))
                pred, truth = pred[keep], truth[keep]
            results[cid] = {k: dice(pred == k, truth == k) for k in range(1, num_classes)}
    finally:
        model.train(was_training)
    return results
