"""Training (paper Algorithm 1): random volumes -> 16 slices -> augment -> forward -> Tanimoto+CE -> Adam.

`train_model(cfg, cache, train_ids, val_ids, out_dir)` writes into `out_dir`:

- `model_best.pt` / `model_last.pt`: plain state_dicts (best by mean foreground validation Dice / last epoch),
- `checkpoint.pt`: resume state (model, optimizer, scaler, epoch, step, best, history, RNG states),
- `run.json` (`ctseg.runs.TrainingRun`): config, intensity plan, classes, target, versions, dataset fingerprint,
  split, status,
- `log.csv`: one row per epoch; optional TensorBoard events in `out_dir/tensorboard`.

Every file is written atomically (temp + rename) at the end of every epoch, so a killed run resumes
(`resume=True`) losing at most the epoch in progress, and the resumed run ends with the same weights,
bit for bit on CPU, as an uninterrupted one. `ctseg.inference.trained.load_trained(run_dir)` gives back the best
model for inference.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, cast

import numpy as np
import torch
from torch import nn

import ctseg
from ctseg.config import ExperimentConfig, config_to_dict, parse_config
from ctseg.errors import CtsegError
from ctseg.fileutil import atomic_write_text
from ctseg.inference.windows import NonFiniteOutput
from ctseg.models.weights import atomic_torch_save
from ctseg.runs import PROVENANCE_VERSION, TrainingRun
from ctseg.train import distributed as D
from ctseg.train.checkpoint import capture_rng_state, load_resume_state, restore_rng_state, save_resume_state
from ctseg.train.data import (TrainStream, make_loader, output_classes, step_seed, to_network_batch,
                              validate_cases)
from ctseg.train.splits import dataset_fingerprint, split_validation

if TYPE_CHECKING:
    from ctseg.preprocess.cache import TrainingCache

log = logging.getLogger(__name__)

IN_CHANNELS = 1
#: Config fields that may change when resuming: they do not change the result of the steps already run
#: (the data themselves are checked by the dataset fingerprint, wherever they live).
RESUME_MAY_DIFFER = ("train.epochs", "train.num_workers", "train.tensorboard", "data.path")
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainResult:
    """`epochs_run`: epochs completed in `out_dir` (resumed ones included); `best_metric`: mean foreground
    validation Dice of the best epoch (NaN without validation cases); `history`: one dict per epoch."""

    out_dir: Path
    best_metric: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)


# --- helpers ------------------------------------------------------------------------------------------------

class TrainingDiverged(CtsegError):
    """The training loss became NaN or infinite; run.json gets status "diverged"."""


def _check_loss_finite(mean_loss: float, epoch: int, lr: float) -> None:
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"training diverged: the mean loss of epoch {epoch + 1} is {mean_loss}; the weights "
                               f"of that epoch were not saved. Lower train.lr (now {lr:g}) or check the data")


def _check_training_memory(cfg: ExperimentConfig, num_classes: int, device: torch.device) -> None:
    """Refuse a configuration whose training step cannot fit in memory (`ctseg.resources`)."""
    from ctseg.resources import check_memory, training_step_bytes

    dim = cfg.model.dim
    batch = cfg.train.batch_size_2d if dim == "2d" else cfg.train.batch_size_3d
    size = "model.msd.depth" if cfg.model.arch == "msd" else "model.unet.base_features / n_stages"
    check_memory(training_step_bytes(cfg, num_classes), device,
                 f"a training step ({cfg.model.arch}-{dim}, batch {batch}, {cfg.preprocess.in_plane_size} px)",
                 f"train.batch_size_{dim}, preprocess.in_plane_size or {size}")


def _final_status(err: BaseException) -> str:
    """run.json status for a training that ended with `err`."""
    if isinstance(err, (TrainingDiverged, NonFiniteOutput)):
        return "diverged"
    if isinstance(err, KeyboardInterrupt):
        return "interrupted"
    return "failed"


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: dict, ignore: tuple[str, ...] = RESUME_MAY_DIFFER) -> list[str]:
    """Human-readable list of config fields that differ ("train.lr: 0.001 in checkpoint, 0.002 now")."""
    a, b = _flatten(saved), _flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if key in ignore or a.get(key) == b.get(key):
            continue
        diffs.append(f"{key}: {a.get(key, '<absent>')!r} in checkpoint, {b.get(key, '<absent>')!r} now")
    return diffs


def _versions() -> dict[str, str]:
    return {"ctseg": ctseg.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "torch_threads": str(torch.get_num_threads())}


# --- the trainer --------------------------------------------------------------------------------------------

class Trainer:
    """One training run. `Trainer(...).fit()` is `train_model(...)`; the module stays at `.model` afterwards."""

    def __init__(self, cfg: ExperimentConfig, cache: TrainingCache, train_ids: list[str], val_ids: list[str] | None = None,
                 out_dir: str | Path = "run", *, resume: bool = False, progress: bool = True,
                 device: str | torch.device | None = None):
        self.cfg, self.cache = cfg, cache
        self.out_dir = Path(out_dir)
        self.resume, self.show_progress = resume, progress
        self.device_request = device if device is not None else cfg.train.device
        known = set(cache.case_ids())
        unknown = sorted(set(train_ids) - known) + sorted(set(val_ids or []) - known)
        if unknown:
            raise CtsegError(f"case ids not in the cache: {', '.join(unknown[:10])}", cache.root)
        if val_ids is None:
            self.train_ids, self.val_ids = split_validation(list(train_ids), cfg.train.val_fraction, cfg.seed)
        else:
            overlap = sorted(set(train_ids) & set(val_ids))
            if overlap:
                raise CtsegError(f"cases both in training and validation: {', '.join(overlap[:10])}")
            self.train_ids, self.val_ids = sorted(train_ids), sorted(val_ids)
        if not self.train_ids:
            raise CtsegError(f"no training cases: {len(train_ids)} case id(s) given for training "
                             f"({len(self.val_ids)} held out for validation) out of the {len(known)} case(s) of the "
                             "cache; a cache of unlabelled (test) cases cannot train", getattr(cache, "root", None))
        self.dataset_classes = {int(k): str(v) for k, v in cache.classes.items()}
        self.classes = output_classes(self.dataset_classes, cfg.model.target)
        self.num_classes = len(self.classes)
        self.model: nn.Module | None = None
        self.history: list[dict] = []

    @property
    def _net(self) -> nn.Module:
        """`self.model` once `fit` has set it up."""
        if self.model is None:
            raise RuntimeError("the model is built by Trainer.fit()")
        return self.model

    # -- checks and setup --

    def _check_labels(self) -> None:
        if len(self.dataset_classes) < 2:
            raise CtsegError(f"the dataset declares only the classes {self.dataset_classes}: nothing to segment",
                             self.cache.root)
        if sorted(self.dataset_classes) != list(range(len(self.dataset_classes))):
            raise CtsegError(f"class values must be 0..K-1, got {sorted(self.dataset_classes)}")
        present: set[int] = set()
        for cid in self.train_ids:
            meta = self.cache.meta(cid)
            if not meta.get("has_label", True):
                raise CtsegError(f"training case {cid} has no label", self.cache.root)
            present.update(int(v) for v in meta["labels_present"])
        if not present - {0}:
            raise CtsegError("no foreground in any training case: every label is background (one class only); "
                             "check the label files and the dataset layout", self.cache.root)
        unknown = sorted(present - set(self.dataset_classes))
        if unknown:
            raise CtsegError(f"label values {unknown} found but the dataset declares classes {self.dataset_classes}",
                             self.cache.root)

    def _setup(self) -> None:
        from ctseg.augment import build_augmenter
        from ctseg.models import build_model
        from ctseg.train.losses import TanimotoCELoss

        cfg, tc = self.cfg, self.cfg.train
        self.ctx = D.init_distributed(self.device_request)
        self.device = self.ctx.device
        self.amp_dtype = _AMP[tc.amp]
        if tc.amp == "fp16" and self.device.type != "cuda":
            raise CtsegError("amp fp16 needs a CUDA device; use bf16 or none on CPU")
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = True
        self._check_labels()

        torch.manual_seed(cfg.seed)
        _check_training_memory(cfg, self.num_classes, self.device)
        self.model = build_model(cfg.model, IN_CHANNELS, self.num_classes).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr, betas=(0.9, 0.999), eps=1e-8)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.amp == "fp16")
        self.loss_fn = TanimotoCELoss(tanimoto_weight=tc.loss_tanimoto_weight, ce_weight=tc.loss_ce_weight,
                                      smooth=tc.loss_smooth)
        self.augmenter = build_augmenter(cfg.augment, cfg.model.dim, intensity_plan=self.cache.plan)
        on_device = tc.augment_on == "device" or (tc.augment_on == "auto" and self.device.type == "cuda")
        self.augment_in_loader = not on_device
        self.aug_generator = torch.Generator(device=self.device)

        self.config_dict = config_to_dict(cfg)
        self.fingerprint = dataset_fingerprint(self.cache, self.train_ids + self.val_ids)
        self.start_epoch, self.global_step = 0, 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        ckpt = self.out_dir / "checkpoint.pt"
        if ckpt.exists() and not self.resume:
            raise CtsegError("this folder already holds a training run; resume it (--resume) or choose another "
                             "output folder", self.out_dir)
        if self.resume and ckpt.exists():
            self._load_resume_state(ckpt)
        elif self.resume:
            log.warning("nothing to resume in %s (no checkpoint.pt): starting from scratch", self.out_dir)

        # torch.compile of a Module returns an OptimizedModule (a Module); its stubs only promise a callable
        step_module = cast(nn.Module, torch.compile(self.model)) if tc.compile else self.model
        self.step_model = D.wrap_model(step_module, self.ctx)

    def _load_resume_state(self, path: Path) -> None:
        state = load_resume_state(path)
        try:
            saved_cfg = json.loads(state["config"])
        except (TypeError, ValueError):
            raise CtsegError("checkpoint config unreadable", path) from None
        if isinstance(saved_cfg, dict):
            try:  # fields added since the checkpoint was written take their defaults, as in load_trained
                saved_cfg = config_to_dict(parse_config(saved_cfg))
            except CtsegError:
                pass  # not a valid config today: compared as written, so the differences are listed
        diffs = config_differences(saved_cfg, self.config_dict)
        if diffs:
            raise CtsegError("checkpoint was made with another configuration; refusing to resume (only "
                             f"{', '.join(RESUME_MAY_DIFFER)} may change). Differences:\n  " + "\n  ".join(diffs),
                             path)
        for key, now in (("train_ids", self.train_ids), ("val_ids", self.val_ids),
                         ("dataset_fingerprint", self.fingerprint), ("world_size", self.ctx.world_size)):
            if state.get(key) != now:
                raise CtsegError(f"checkpoint {key} differ from this run's ({state.get(key)!r} vs {now!r}); "
                                 "refusing to resume", path)
        try:
            self._net.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise CtsegError(f"checkpoint does not fit this model ({err})", path) from None
        self.start_epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.best_metric = state.get("best_metric")
        self.best_epoch = state.get("best_epoch")
        self.history = list(state.get("history", []))
        restore_rng_state(state["rng"], path)
        log.info("resuming %s after epoch %d (step %d)", self.out_dir, self.start_epoch, self.global_step)

    # -- files --

    def _resume_state(self, epoch_done: int) -> dict:
        return {"model": self._net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "epoch": epoch_done, "global_step": self.global_step,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "history": self.history, "config": json.dumps(self.config_dict, sort_keys=True),
                "train_ids": self.train_ids, "val_ids": self.val_ids,
                "dataset_fingerprint": self.fingerprint, "world_size": self.ctx.world_size,
                "rng": capture_rng_state()}

    def provenance(self) -> dict:
        """The cases each part of this model was fitted or chosen on (`ctseg.evaluate.provenance`)."""
        return {"version": PROVENANCE_VERSION, "weights_fitted_on": list(self.train_ids),
                "checkpoint_selected_on": list(self.val_ids),
                "intensity_plan_fitted_on": list(self.cache.plan.subset_ids)}

    def _write_run_json(self, status: str, error: str | None = None) -> None:
        TrainingRun(
            status=status, config=self.config_dict, intensity_plan=self.cache.plan.to_dict(), classes=self.classes,
            dataset_classes=self.dataset_classes, target=self.cfg.model.target, num_classes=self.num_classes,
            in_channels=IN_CHANNELS, versions=_versions(), dataset_fingerprint=self.fingerprint,
            train_ids=self.train_ids, val_ids=self.val_ids, epochs_run=len(self.history),
            global_step=self.global_step, best_metric=self.best_metric, best_epoch=self.best_epoch,
            world_size=self.ctx.world_size, device=str(self.device), provenance=self.provenance(), error=error,
        ).write(self.out_dir)

    def _csv_columns(self) -> list[str]:
        fg = [f"val_dice_{self.classes[k]}" for k in range(1, self.num_classes)]
        return ["epoch", "step", "train_loss", *fg, "val_dice_mean", "lr", "seconds"]

    def _write_csv(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._csv_columns(), lineterminator="\n")
        writer.writeheader()
        for row in self.history:
            flat = {k: row[k] for k in ("epoch", "step", "train_loss", "lr", "seconds")}
            flat["val_dice_mean"] = "" if row["val_dice_mean"] is None else row["val_dice_mean"]
            for name, v in (row["val_dice"] or {}).items():
                flat[f"val_dice_{name}"] = v
            writer.writerow(flat)
        atomic_write_text(self.out_dir / "log.csv", buf.getvalue())

    def _open_tensorboard(self) -> Any:
        if not (self.cfg.train.tensorboard and self.ctx.is_main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard requested but not installed (pip install tensorboard); logging to log.csv only")
            return None
        return SummaryWriter(str(self.out_dir / "tensorboard"))

    # -- the loop --

    def _progress(self) -> ContextManager[Any]:
        if not (self.show_progress and self.ctx.is_main):
            return nullcontext(None)
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[info]}"), TimeRemainingColumn())

    def _learning_rate(self) -> float:
        """lr of the next step: constant, or poly (1 - step / steps)^0.9 over the whole run (a pure function
        of the global step, so a resumed run follows the same schedule)."""
        tc = self.cfg.train
        if tc.lr_schedule == "constant":
            return tc.lr
        return tc.lr * (1.0 - self.global_step / (tc.epochs * tc.steps_per_epoch)) ** 0.9

    def _train_step(self, batch: dict) -> torch.Tensor:
        for group in self.optimizer.param_groups:
            group["lr"] = self._learning_rate()
        image = batch["image"].to(self.device, non_blocking=True)
        label = batch["label"].to(self.device, non_blocking=True)
        if not self.augment_in_loader:
            self.aug_generator.manual_seed(step_seed(self.cfg.seed, self.ctx.rank, batch["epoch"], batch["step"]))
            image, label = self.augmenter(image, label, self.aug_generator)
            image, label = to_network_batch(image, label, batch["keep"])
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.step_model(image)
        loss = self.loss_fn(logits.float(), label)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()

    def _validate(self) -> tuple[dict[str, float] | None, float | None]:
        """Mean Dice per foreground class name over the validation cases, and their mean (None, None if none)."""
        if not self.val_ids:
            return None, None
        mine = self.val_ids[self.ctx.rank::self.ctx.world_size]
        per_case = {}
        for part in D.gather_objects(validate_cases(self._net, self.cache, mine, self.cfg, self.device,
                                                    self.num_classes, self.amp_dtype), self.ctx):
            per_case.update(part)
        per_class = {self.classes[k]: float(np.mean([d[k] for d in per_case.values()]))
                     for k in range(1, self.num_classes)}
        return per_class, float(np.mean(list(per_class.values())))

    def _end_epoch(self, epoch: int, train_loss: float, seconds: float, tb: Any) -> None:
        tc = self.cfg.train
        last = epoch + 1 == tc.epochs
        val_dice, val_mean = self._validate() if ((epoch + 1) % tc.val_every == 0 or last) else (None, None)
        improved = val_mean is not None and (self.best_metric is None or val_mean > self.best_metric)
        if improved:
            self.best_metric, self.best_epoch = val_mean, epoch + 1
        row = {"epoch": epoch + 1, "step": self.global_step, "train_loss": train_loss, "val_dice": val_dice,
               "val_dice_mean": val_mean, "lr": self.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 3)}
        self.history.append(row)
        if not self.ctx.is_main:
            return
        weights = self._net.state_dict()
        atomic_torch_save(weights, self.out_dir / "model_last.pt")
        if improved or not self.val_ids:
            atomic_torch_save(weights, self.out_dir / "model_best.pt")
        save_resume_state(self.out_dir / "checkpoint.pt", self._resume_state(epoch + 1))
        self._write_csv()
        self._write_run_json("running")
        if tb is not None:
            tb.add_scalar("train/loss", train_loss, self.global_step)
            tb.add_scalar("train/lr", row["lr"], self.global_step)
            for name, v in (val_dice or {}).items():
                tb.add_scalar(f"val/dice_{name}", v, self.global_step)
            if val_mean is not None:
                tb.add_scalar("val/dice_mean", val_mean, self.global_step)
        log.info("epoch %d: loss %.4f%s", epoch + 1, train_loss,
                 "" if val_mean is None else f", val Dice {val_mean:.4f}")

    def _run_epochs(self) -> None:
        tc = self.cfg.train
        spe = tc.steps_per_epoch
        stream = TrainStream(self.cache, self.train_ids, self.cfg, rank=self.ctx.rank,
                             start=self.start_epoch * spe, stop=tc.epochs * spe,
                             augment_here=self.augment_in_loader,
                             augmenter=self.augmenter if self.augment_in_loader else None)
        loader = make_loader(stream, tc.num_workers, pin_memory=self.device.type == "cuda")
        tb = self._open_tensorboard()
        self._net.train()
        try:
            with self._progress() as bar:
                task = None
                loss_sum = torch.zeros((), device=self.device)
                t0 = time.perf_counter()
                for batch in loader:
                    epoch, step = batch["epoch"], batch["step"]
                    if step == 0:
                        loss_sum.zero_()
                        t0 = time.perf_counter()
                        if bar is not None:
                            if task is not None:
                                bar.remove_task(task)
                            task = bar.add_task(f"epoch {epoch + 1}/{tc.epochs}", total=spe, info="")
                    loss_sum += self._train_step(batch)
                    self.global_step += 1
                    if bar is not None:
                        info = f"loss {loss_sum.item() / (step + 1):.4f}" if step % 10 == 9 else None
                        bar.update(task, advance=1, **({"info": info} if info else {}))
                    if step + 1 == spe:
                        mean_loss = D.mean_over_ranks(float(loss_sum.item()) / spe, self.ctx)
                        _check_loss_finite(mean_loss, epoch, self.cfg.train.lr)
                        self._end_epoch(epoch, mean_loss, time.perf_counter() - t0, tb)
        finally:
            if tb is not None:
                tb.close()

    def fit(self) -> TrainResult:
        deterministic_before = (torch.are_deterministic_algorithms_enabled(),
                                torch.is_deterministic_algorithms_warn_only_enabled())
        try:
            self._setup()
            if self.ctx.is_main:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._write_run_json("running")
            try:
                try:
                    self._run_epochs()
                except torch.OutOfMemoryError:
                    dim = self.cfg.model.dim
                    bs = self.cfg.train.batch_size_2d if dim == "2d" else self.cfg.train.batch_size_3d
                    raise CtsegError(f"out of GPU memory on {self.device} with batch size {bs}: lower "
                                     f"train.batch_size_{dim}, or use --amp bf16") from None
            except BaseException as err:
                if self.ctx.is_main:
                    try:
                        self._write_run_json(_final_status(err), f"{type(err).__name__}: {err}")
                    except OSError as write_err:  # e.g. the disk that stopped training is still full
                        log.error("%s: could not record the final status %r (%s)", self.out_dir / "run.json",
                                  _final_status(err), write_err)
                raise
            if self.ctx.is_main:
                self._write_run_json("completed")
            self._check_ranks_agree()
        finally:
            torch.use_deterministic_algorithms(deterministic_before[0], warn_only=deterministic_before[1])
            if hasattr(self, "ctx"):
                D.shutdown(self.ctx)
        best = math.nan if self.best_metric is None else float(self.best_metric)
        return TrainResult(self.out_dir, best, len(self.history), list(self.history))

    def _check_ranks_agree(self) -> None:
        """DDP sanity check: every rank ends with rank 0's weights (sum of all parameters, float64)."""
        if not self.ctx.enabled:
            return
        total = float(sum(p.detach().double().sum() for p in self._net.parameters()))
        sums = D.gather_objects(total, self.ctx)
        if any(s != sums[0] for s in sums):
            raise CtsegError(f"DDP ranks diverged: parameter sums {sums}")


def train_model(cfg: ExperimentConfig, cache: TrainingCache, train_ids: list[str], val_ids: list[str] | None = None,
                out_dir: str | Path = "run", resume: bool = False, progress: bool = True,
                device: str | torch.device | None = None) -> TrainResult:
    """Train `cfg.model` on `train_ids` of `cache` and write the run folder `out_dir` (see module doc).

    val_ids: held-out cases for model selection; None -> `cfg.train.val_fraction` of `train_ids`, drawn with
    `cfg.seed`. device: overrides `cfg.train.device` ("auto", "cpu", "cuda", "cuda:N"). Under torchrun every
    rank calls this; rank 0 writes the files.
    """
    return Trainer(cfg, cache, train_ids, val_ids, out_dir, resume=resume, progress=progress,
                   device=device).fit()
