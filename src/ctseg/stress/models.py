"""The stress test's models: which folders make one model (`ModelSpec`, from model folders or out-of-fold from
cross-validation runs) and the loaded networks (`LoadedModels`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ctseg.errors import CtsegError
from ctseg.runs import CVRun, TrainingRun

if TYPE_CHECKING:
    import torch

    from ctseg.inference.predict import Models
    from ctseg.inference.trained import TrainedModel


# ---------------------------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """One model of the stress test. folds: None (the same members for every volume) or fold index -> run dir
    with `test_of`: case id -> fold whose model did not train on it (cross-validation runs)."""

    name: str
    display: str
    aug: str
    members: list[Path] = field(default_factory=list)
    folds: dict[int, Path] | None = None
    test_of: dict[str, int] | None = None
    source: str = ""
    stack: Path | None = None

    def to_json(self) -> dict:
        d = {"name": self.name, "display": self.display, "aug": self.aug, "source": self.source,
             "members": [str(p) for p in self.members],
             "folds": {str(k): str(v) for k, v in (self.folds or {}).items()} or None}
        return {**d, "stack": str(self.stack)} if self.stack is not None else d


def model_specs_from_dirs(groups: Sequence[Sequence[str | Path]]) -> list[ModelSpec]:
    """One `ModelSpec` per group of model folders (a group of several is an ensemble; a stack is used alone)."""
    from ctseg.evaluate.records import display_name
    from ctseg.inference.models import resolve_model

    specs, names = [], set()
    for group in groups:
        sources = [resolve_model(Path(p).resolve()) for p in group]
        stacks = [s for s in sources if s.kind == "stack"]
        if stacks and len(sources) > 1:
            raise CtsegError("a stacked ensemble is used alone: give it after its own --model", stacks[0].path)
        dirs = [d for s in sources for d in s.run_dirs]
        cfg = TrainingRun.read(dirs[0]).config
        arch, dim = cfg.get("model", {}).get("arch", "?"), cfg.get("model", {}).get("dim", "")
        aug = str(cfg.get("augment", {}).get("name", "?"))
        if stacks:
            name = stacks[0].name
            base, i = name, 2
            while name in names:
                name, i = f"{base}-{i}", i + 1
            names.add(name)
            specs.append(ModelSpec(name, display_name("stacked", "", aug), aug, members=dirs, source="stack",
                                   stack=stacks[0].path))
            continue
        name = f"{arch}-{dim}-{aug}" + (f"-ens{len(dirs)}" if len(dirs) > 1 else "")
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.add(name)
        display = display_name(arch, dim, aug) + (f" (ensemble of {len(dirs)})" if len(dirs) > 1 else "")
        specs.append(ModelSpec(name, display, aug, members=dirs, source="model"))
    return specs


def model_specs_from_cv(cv_dirs: Sequence[str | Path]) -> tuple[list[ModelSpec], CVRun]:
    """One out-of-fold `ModelSpec` per CV run, and the first run's record (data, layout, folds file: common)."""
    from ctseg.evaluate.folds import load_folds
    from ctseg.evaluate.records import display_name

    specs, manifests = [], []
    for d in cv_dirs:
        d = Path(d).resolve()
        info = CVRun.read(d)
        manifests.append(info)
        folds = load_folds(info.folds_file)
        fold_dirs, test_of = {}, {}
        for k in range(info.n_folds):
            mdir = info.model_dir(k)
            if not (mdir / "model_best.pt").is_file():
                raise CtsegError(f"fold {k} has no trained model (model_best.pt); finish the cross-validation first",
                                 mdir)
            fold_dirs[k] = mdir
            trained = info.fold_run(k).trained_on()
            for cid in folds.test_ids(k):
                if cid in trained:
                    raise CtsegError(f"fold {k}'s model trained on its own test case {cid}", mdir)
                test_of[cid] = k
        display = display_name(info.arch, info.dim, info.aug, info.variant)
        specs.append(ModelSpec(info.name, display, info.aug, folds=fold_dirs, test_of=test_of, source=str(d)))
    for key in ("data", "layout", "folds_file"):
        values = {str(getattr(m, key)) for m in manifests}
        if len(values) != 1:
            raise CtsegError(f"the cross-validation runs differ in {key}: {sorted(values)}; give runs of one "
                             "experiment")
    if len({s.name for s in specs}) != len(specs):
        raise CtsegError("the same cross-validation run is given twice")
    return specs, manifests[0]


def check_classes(spec: ModelSpec, run_dir: Path, dataset_classes: dict[int, str], data_dir: str | Path) -> None:
    run = TrainingRun.read(run_dir)
    model_classes = run.dataset_classes or run.classes
    if model_classes != {int(k): str(v) for k, v in dataset_classes.items()}:
        raise CtsegError(f"model {spec.name} ({run_dir}) was trained on classes {model_classes}, but the dataset "
                         f"has {dict(dataset_classes)}; stress-test it on data with the same labels", data_dir)


class LoadedModels:
    """The stress test's models, each network loaded once: which members predict a volume, and the classes
    (and whether foreground classes are merged) each model is scored on."""

    def __init__(self, specs: Sequence[ModelSpec], classes: dict[int, str], dev: torch.device):
        from ctseg.cv.scoring import eval_classes
        from ctseg.evaluate.metrics import structures
        from ctseg.inference.models import load_models
        from ctseg.inference.predict import check_members

        self.dev = dev
        self._cache: dict[str, TrainedModel] = {}
        self._stacks: dict[str, Models] = {}
        self.eval_classes: dict[str, dict[int, str]] = {}
        self.merge: dict[str, bool] = {}
        self.structures: list[str] = []
        for spec in specs:
            if spec.stack is not None:  # the meta-model predicts the dataset's classes
                self._stacks[spec.name] = load_models([spec.stack], dev)
                target = "multiclass"
            else:
                dirs = spec.members if spec.folds is None else list(spec.folds.values())
                trained = [self._load(d) for d in dirs]
                _, out_classes = check_members(trained[:1] if spec.folds is not None else trained)
                target = "multiclass" if out_classes == classes else "foreground"
            self.eval_classes[spec.name], self.merge[spec.name] = eval_classes(target, classes)
            for name in structures(self.eval_classes[spec.name]):
                if name not in self.structures:
                    self.structures.append(name)

    def _load(self, run_dir: Path) -> TrainedModel:
        from ctseg.inference.trained import load_trained

        if str(run_dir) not in self._cache:
            self._cache[str(run_dir)] = load_trained(run_dir, self.dev)
        return self._cache[str(run_dir)]

    def members(self, spec: ModelSpec, case_id: str) -> Models:
        """What predicts `case_id` for `spec`: its stack, its members, or the fold that did not train on it."""
        if spec.name in self._stacks:
            return self._stacks[spec.name]
        if spec.folds is None or spec.test_of is None:  # both set (cross-validation) or both None
            return [self._load(d) for d in spec.members]
        return [self._load(spec.folds[spec.test_of[case_id]])]
