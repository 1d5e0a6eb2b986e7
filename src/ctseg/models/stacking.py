"""Stacked ensemble ("Stacked CNN", paper): a small meta-network combines the members' probability maps.

Members are cross-validated runs grouped into sets (paper, KiTS: 3D MS-D Nets on kidney+tumour vs
background, 2D U-Nets on background/kidney/tumour; liver: both binary); the `top_k` runs of each set by
validation score are kept. The meta-model sees the concatenation of the members' softmax maps of one
axial slice at network resolution, (B, C_total, S, S), and predicts the dataset's classes.

Selection and fold discipline (issue 17; docs/PAPER_FIDELITY.md §6): the top_k members are chosen per test fold
k, by the best validation Dice of each candidate's fold-k model, on the fold's validation split (seeded by the
fold, so every candidate is scored on the same cases, none of them in fold k). The meta-model scored on fold k
is nested by default: it learns from the fold-k members' maps of their validation cases (held out from their
weights, inside fold k's training side), so nothing it learns from has seen fold k (`nested_meta_cases`). The
`oof` mode trains it on the other folds' out-of-fold maps instead, made by models that trained on fold k: kept
for comparison, and reported as a leak by `ctseg check-leaks`. For each map, `MemberPrediction.trained_on` lists
what its producing model was fitted on, and `check_out_of_fold` refuses any map of a case in it. Plain averaging
of the members (`average_members`) is the reference beside it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from ctseg.errors import CtsegError

log = logging.getLogger(__name__)


def _bias(conv: nn.Conv2d) -> torch.Tensor:
    """The bias of a convolution made with one (torch types it as optional)."""
    if conv.bias is None:
        raise ValueError("convolution without a bias")
    return conv.bias


class StackingMetaModel(nn.Module):
    """(B, C_total, Y, X) member probabilities in [0, 1] -> logits (B, K, Y, X).

    A 1x1 convolution over the members' log-probabilities (a learned per-voxel weighting, i.e. a weighted
    product of experts) plus a small 3x3 context branch (conv, instance norm, LeakyReLU 1e-2, twice) whose
    last layer starts at zero, so training starts from the pure weighting and adds local context as it helps.
    init_weight: (K, C_total) starting weights of the 1x1 weighting (see `vote_matrix`); default random.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 16, eps: float = 1e-4,
                 init_weight: np.ndarray | None = None):
        super().__init__()
        if in_channels < 1 or num_classes < 2:
            raise ValueError(f"need in_channels >= 1 and num_classes >= 2, got {in_channels}, {num_classes}")
        self.in_channels, self.num_classes, self.eps = in_channels, num_classes, eps
        self.weighting = nn.Conv2d(in_channels, num_classes, 1)
        last = nn.Conv2d(hidden, num_classes, 1)
        self.context = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.InstanceNorm2d(hidden, affine=True), nn.LeakyReLU(1e-2),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.InstanceNorm2d(hidden, affine=True), nn.LeakyReLU(1e-2),
            last)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(_bias(last))
        if init_weight is not None:
            if init_weight.shape != (num_classes, in_channels):
                raise ValueError(f"init_weight must be ({num_classes}, {in_channels}), got {init_weight.shape}")
            with torch.no_grad():
                self.weighting.weight.copy_(torch.as_tensor(init_weight, dtype=torch.float32)[:, :, None, None])
                _bias(self.weighting).zero_()

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        x = torch.log(probs.float().clamp_min(self.eps))
        return self.weighting(x) + self.context(x)


# ------------------------------------------------------------------------------------ member selection
@dataclass(frozen=True)
class MemberRun:
    """A finished cross-validation run that can be a stack member.

    val_score: mean over folds of the run's best validation Dice (the report's summary); fold_scores: the best
    validation Dice of each fold's model (what per-fold selection uses); fold_val_ids: the cases each fold's
    score was computed on; target: 'multiclass' | 'foreground'.
    """

    name: str
    path: Path
    arch: str
    dim: str
    target: str
    aug: str
    val_score: float
    fold_scores: tuple[float, ...] = ()
    fold_val_ids: tuple[tuple[str, ...], ...] = ()

    def score(self, fold: int | None) -> float:
        """The selection score: of fold `fold`'s model, or the mean over folds (None)."""
        if fold is None:
            return self.val_score
        if not 0 <= fold < len(self.fold_scores):
            raise CtsegError(f"run {self.name!r} has no validation score for fold {fold}", self.path)
        return self.fold_scores[fold]


class MemberSet(Protocol):
    """A kind of stack member (`ctseg.config.StackMemberSetConfig`): architecture, dimension and target."""

    @property
    def arch(self) -> str: ...

    @property
    def dim(self) -> str: ...

    @property
    def target(self) -> str: ...


def select_members(candidates: Sequence[MemberRun], sets: Sequence[MemberSet], top_k: int,
                   fold: int | None = None) -> list[MemberRun]:
    """The `top_k` candidates of each set (objects with arch, dim, target) by validation score, set by set.

    fold: rank by the validation score of each candidate's model of that fold (the selection for test fold
    `fold`: it sees only that fold's validation cases); None: by the mean over folds (no test fold to protect,
    e.g. a final ensemble). Raises CtsegError when a set has no candidate (the stack would silently lose a
    member type).
    """
    chosen: list[MemberRun] = []
    for s in sets:
        pool = [c for c in candidates if (c.arch, c.dim, c.target) == (s.arch, s.dim, s.target)]
        if not pool:
            have = ", ".join(sorted({f"{c.arch}-{c.dim}-{c.target}" for c in candidates})) or "none"
            raise CtsegError(f"no finished run for stack member set {s.arch}-{s.dim}-{s.target} (have: {have})")
        pool.sort(key=lambda c: (-np.nan_to_num(c.score(fold), nan=-1.0), c.name))
        chosen.extend(pool[:top_k])
    return chosen


# --------------------------------------------------------------------------------- out-of-fold inputs
@dataclass(frozen=True)
class MemberPrediction:
    """One member's out-of-fold probabilities for one case.

    path: .npy (C_member, Z, S, S) float16 softmax at network resolution; fold: the CV fold whose model
    produced it; trained_on: every case id that model's weights were fitted on (its validation cases may be
    inputs of the nested meta-model).
    """

    case_id: str
    member: str
    fold: int
    path: Path
    trained_on: frozenset[str]

    def load(self) -> np.ndarray:
        """The map, memory-mapped; CtsegError naming the file when it is truncated, pickled or not 4D."""
        try:
            array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise CtsegError(f"cannot read out-of-fold member map ({type(exc).__name__}: {exc}); re-run the "
                             "cross-validation to rebuild it", self.path) from None
        if not isinstance(array, np.ndarray) or array.ndim != 4:
            raise CtsegError(f"out-of-fold member map must be (C, Z, S, S), got {getattr(array, 'shape', type(array))}",
                             self.path)
        return array


def check_out_of_fold(predictions: Iterable[MemberPrediction]) -> None:
    """Refuse any member map of a case its producing model saw during training (CtsegError)."""
    for p in predictions:
        if p.case_id in p.trained_on:
            raise CtsegError(f"member {p.member!r} (fold {p.fold}) was trained on case {p.case_id!r}: its map is not "
                             "out-of-fold and must not reach the stacking meta-model", p.path)


def meta_training_cases(fold_of: Mapping[str, int], eval_fold: int) -> list[str]:
    """Cases whose maps train the meta-model that is evaluated on `eval_fold`: every case of the other folds."""
    cases = sorted(c for c, k in fold_of.items() if k != eval_fold)
    if not cases:
        raise CtsegError(f"no cases outside fold {eval_fold} to train the stacking meta-model on")
    return cases


def nested_meta_cases(train_ids: Sequence[str], fitted_on: Sequence[Iterable[str]], eval_fold: int) -> list[str]:
    """Cases the nested meta-model of `eval_fold` learns from: the fold's training cases that no member's model
    of that fold was fitted on (their validation split; the same for every member when the split is seeded by
    the fold). CtsegError when there is none (e.g. train.val_fraction 0)."""
    fitted = set().union(*(set(f) for f in fitted_on)) if fitted_on else set()
    cases = sorted(c for c in train_ids if c not in fitted)
    if not cases:
        raise CtsegError(f"fold {eval_fold}: no training case is held out from every member's weights, so the nested "
                         "meta-model has nothing to learn from; set train.val_fraction > 0 (the members' validation "
                         "split) or stack.meta_training: oof (not nested)")
    return cases


def stack_inputs(case_id: str, predictions: Mapping[str, Sequence[MemberPrediction]], members: Sequence[str]
                 ) -> tuple[np.ndarray, list[MemberPrediction]]:
    """Concatenate the members' maps of one case in `members` order: (C_total, Z, S, S) float16.

    Checks that each map is out of fold and that all members predicted the same grid.
    """
    by_member = {p.member: p for p in predictions.get(case_id, [])}
    missing = [m for m in members if m not in by_member]
    if missing:
        raise CtsegError(f"case {case_id!r} has no out-of-fold prediction from member(s) {', '.join(missing)}")
    used = [by_member[m] for m in members]
    check_out_of_fold(used)
    maps = [p.load() for p in used]
    shapes = {m.shape[1:] for m in maps}
    if len(shapes) != 1:
        raise CtsegError(f"case {case_id!r}: members predicted different grids {sorted(shapes)}", used[0].path)
    return np.concatenate([np.asarray(m, dtype=np.float16) for m in maps], axis=0), used


def vote_matrix(targets: Sequence[str], num_classes: int) -> np.ndarray:
    """(K, C_total) weights that make the 1x1 weighting the members' geometric mean (product of experts).

    Members in concatenation order; a 'multiclass' member (K channels) votes on each class with its own
    channel, a 'foreground' member (2 channels) with channel 0 on background and channel 1 on every
    foreground class. Each member has weight 1 / number of members.
    """
    cols = []
    for t in targets:
        if t == "multiclass":
            cols.append(np.eye(num_classes, dtype=np.float32))
        elif t == "foreground":
            block = np.zeros((num_classes, 2), dtype=np.float32)
            block[0, 0] = 1.0
            block[1:, 1] = 1.0
            cols.append(block)
        else:
            raise ValueError(f"unknown member target {t!r}")
    return np.concatenate(cols, axis=1) / len(targets)


# ------------------------------------------------------------------------------------------ training
def train_meta_model(inputs: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int, *,
                     loss: nn.Module, steps: int, batch_size: int = 16, lr: float = 1e-3, hidden: int = 16,
                     foreground_fraction: float = 0.5, generator: torch.Generator,
                     init_weight: np.ndarray | None = None, device: str | torch.device = "cpu",
                     on_step: Callable[[int, float], None] | None = None) -> StackingMetaModel:
    """Fit a `StackingMetaModel` on axial slices of the given cases (Adam, `steps` steps).

    inputs: per case (C_total, Z, S, S) member probabilities; labels: per case (Z, S, S) integer classes.
    Each batch draws `batch_size` slices; a `foreground_fraction` of them from slices with foreground.
    init_weight: starting 1x1 weighting (`vote_matrix`: start from the members' geometric mean).
    on_step(step, loss) is called after every step (progress display).
    """
    if len(inputs) != len(labels) or not inputs:
        raise ValueError(f"need matching, non-empty inputs and labels, got {len(inputs)} and {len(labels)}")
    channels = {x.shape[0] for x in inputs}
    if len(channels) != 1:
        raise ValueError(f"cases have different member channel counts {sorted(channels)}")
    for member_maps, label in zip(inputs, labels):
        if member_maps.shape[1:] != label.shape:
            raise ValueError(f"member maps {member_maps.shape} do not match labels {label.shape}")
    slices = np.array([(i, z) for i, y in enumerate(labels) for z in range(y.shape[0])], dtype=np.int64)
    fg = np.array([(i, z) for i, y in enumerate(labels) for z in np.flatnonzero(y.reshape(y.shape[0], -1).any(1))],
                  dtype=np.int64).reshape(-1, 2)
    model = StackingMetaModel(channels.pop(), num_classes, hidden=hidden, init_weight=init_weight).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for step in range(steps):
        n_fg = int(round(foreground_fraction * batch_size)) if len(fg) else 0
        pick = [fg[torch.randint(len(fg), (n_fg,), generator=generator).numpy()],
                slices[torch.randint(len(slices), (batch_size - n_fg,), generator=generator).numpy()]]
        idx = np.concatenate(pick)
        x = torch.from_numpy(np.stack([np.asarray(inputs[i][:, z], dtype=np.float32) for i, z in idx])).to(device)
        y = torch.from_numpy(np.stack([np.asarray(labels[i][z], dtype=np.int64) for i, z in idx])).to(device)
        value = loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if on_step is not None:
            on_step(step, float(value.detach()))
    return model.eval()


@torch.no_grad()
def predict_meta(model: StackingMetaModel, inputs: np.ndarray, device: str | torch.device = "cpu",
                 batch_size: int = 32) -> np.ndarray:
    """Softmax of the meta-model slice by slice: (C_total, Z, S, S) -> (K, Z, S, S) float32."""
    model.eval()
    out = []
    for z0 in range(0, inputs.shape[1], batch_size):
        x = torch.from_numpy(np.asarray(inputs[:, z0:z0 + batch_size], dtype=np.float32)).movedim(1, 0).to(device)
        out.append(model(x).softmax(1).movedim(0, 1).float().cpu().numpy())
    return np.concatenate(out, axis=1)


def combine_members(bg_mean: torch.Tensor, multi_fg_sum: torch.Tensor | None, num_classes: int) -> torch.Tensor:
    """The ensemble rule, (K, ...) probabilities from what the members said (shared by `average_members`
    and `ctseg.inference.predict.predict_network`).

    bg_mean: the members' mean background probability (...); multi_fg_sum: the sum over the multiclass
    members of their foreground probabilities (K - 1, ...), None when every member is foreground-only
    (then K must be 2). Background is the mean; the foreground mass 1 - background is split between
    the classes in the multiclass members' proportions. `multi_fg_sum` is overwritten (no copies).
    """
    if multi_fg_sum is None:
        if num_classes != 2:
            raise ValueError(f"{num_classes} classes need at least one multiclass member to split the foreground")
        return torch.stack([bg_mean, 1.0 - bg_mean])
    fg = multi_fg_sum
    fg += 1e-6
    fg /= fg.sum(dim=0, keepdim=True)
    fg *= (1.0 - bg_mean)[None]
    return torch.cat([bg_mean[None], fg])


def average_members(maps: Sequence[np.ndarray], targets: Sequence[str], num_classes: int) -> np.ndarray:
    """Plain averaging of member probabilities onto the dataset's classes: (K, Z, S, S) float32.

    maps: per member (C_m, Z, S, S); targets: 'multiclass' (C_m = K) or 'foreground' (C_m = 2: background,
    foreground). Background probability is the mean over all members; the foreground share is split between
    classes by the mean of the multiclass members (foreground-only members vote on background vs
    foreground only). With K = 2 every member votes on both classes. This is the rule `ctseg.inference.predict` applies
    to ensembles of models, here on stored out-of-fold maps.
    """
    if not maps:
        raise ValueError("no member maps to average")
    for m, t in zip(maps, targets):
        want = num_classes if t == "multiclass" else 2
        if m.shape[0] != want:
            raise ValueError(f"a {t} member has {m.shape[0]} channels, expected {want}")
    bg = torch.from_numpy(np.mean([np.asarray(m[0], dtype=np.float32) for m in maps], axis=0))
    multi = [np.asarray(m[1:], dtype=np.float32) for m, t in zip(maps, targets) if t == "multiclass"]
    fg_sum = torch.from_numpy(np.sum(multi, axis=0, dtype=np.float32)) if multi and num_classes > 2 else None
    return combine_members(bg, fg_sum, num_classes).numpy()


def save_meta_model(model: StackingMetaModel, path: str | Path) -> None:
    """Weights (state dict, atomic); the architecture is re-created from `in_channels` / `num_classes`."""
    from ctseg.models.weights import atomic_torch_save

    atomic_torch_save({"state_dict": model.state_dict(), "in_channels": model.in_channels,
                       "num_classes": model.num_classes,
                       "hidden": model.context[0].out_channels}, Path(path))


def load_meta_model(path: str | Path, device: str | torch.device = "cpu") -> StackingMetaModel:
    blob = torch.load(path, map_location=device, weights_only=True)
    model = StackingMetaModel(int(blob["in_channels"]), int(blob["num_classes"]), hidden=int(blob["hidden"]))
    model.load_state_dict(blob["state_dict"])
    return model.to(device).eval()
