"""Registries of pluggable components: augmentations, networks, dataset layouts and stress axes.

A registry maps a name to one entry that carries everything about the component: its config section (a
pydantic model, or None), its builder, its display name (the one source of the names tables and plots show:
`Registry.display`) and (networks) its memory estimator. CLI choices
(`--aug`, `--arch`, `--layout`, `--axes`) and config validation (`augment.name`, `model.arch`, `data.layout`,
`stress.axes`) read the registries, so a new component is one module that registers itself:

    from ctseg.registry import AUGMENTERS, AugmenterEntry
    AUGMENTERS.register(AugmenterEntry("flip", build_flip, section=FlipConfig, display="random flips"))

The entry types are `AugmenterEntry` (`ctseg.augment`), `NetworkEntry` (`ctseg.models`), `LayoutEntry`
(`ctseg.datasets`) and `ctseg.stress.perturb.Axis`. A component with a config section gets it under its
name in the owning config section (`augment.<name>`, `model.<name>`, `data.<name>`), validated by its model;
the built-in components register theirs the same way (`ctseg.augment.ctia_config.CTIAConfig`, ...).

Plugins: `CTSEG_PLUGINS` (comma-separated module names, e.g. `CTSEG_PLUGINS=mylab.ctseg_parts`) are imported
the first time any registry is read (and at CLI start), so a user's own package can register components
without editing ctseg. The built-in components are registered by their packages, imported on first read too.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, TypeVar

from pydantic import BaseModel

from ctseg.errors import CtsegError

PLUGINS_ENV = "CTSEG_PLUGINS"


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def display(self) -> str: ...


E = TypeVar("E", bound=_Named)


@dataclass(frozen=True)
class AugmenterEntry:
    """An augmentation. builder(section, dim, intensity_plan) -> `ctseg.augment.base.Augmenter` (section: the
    validated `augment.<name>` config, None without one); components: ablation component -> the probability
    field of `section` that switches it on (what `augment.arms` steps may keep or drop)."""

    name: str
    builder: Callable[..., Any]
    section: type[BaseModel] | None = None
    display: str = ""
    components: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryEstimate:
    """What `ctseg.resources` needs of a network: weights and activations kept per input pixel (voxel) and sample."""

    parameters: float
    activations_per_pixel: float


#: `NetworkEntry.memory` of a network whose memory need is not known: memory checks are skipped, with a warning.
UNKNOWN_MEMORY = None


@dataclass(frozen=True)
class NetworkEntry:
    """A network. builder(model_cfg, dim (2 or 3), in_channels, num_classes) -> nn.Module mapping
    (B, C, [Z,] Y, X) -> logits (B, K, [Z,] Y, X); memory(model_cfg, num_classes, in_channels) -> MemoryEstimate,
    or UNKNOWN_MEMORY (explicitly: no estimate; there is no default formula). section: `model.<name>`."""

    name: str
    builder: Callable[..., Any]
    memory: Callable[..., MemoryEstimate] | None
    section: type[BaseModel] | None = None
    display: str = ""


@dataclass(frozen=True)
class LayoutEntry:
    """A dataset layout. builder: the reader class (`ctseg.datasets.base.FolderDataset` subclass: `matches(path)`,
    `cls(path)`). writer: what `ctseg phantom --layout <name>` writes with (`ctseg.datasets.phantom.writers
    .LayoutWriter`), None when the layout cannot be written. section: `data.<name>`."""

    name: str
    builder: Any
    writer: Any = None
    section: type[BaseModel] | None = None
    display: str = ""


class Registry(Mapping[str, E]):
    """Name -> entry, in registration order; read-only as a mapping, `register` adds. Reading it first imports
    the modules that register the built-in entries, then the `CTSEG_PLUGINS` modules."""

    def __init__(self, kind: str, builtin_modules: tuple[str, ...]):
        self.kind, self._modules = kind, builtin_modules
        self._entries: dict[str, E] = {}
        self._loading = False

    def register(self, entry: E) -> E:
        """Add `entry` (ValueError if its name is taken or empty); returns it."""
        if not entry.name or entry.name != entry.name.strip() or entry.name == "auto":
            raise ValueError(f"{self.kind} name {entry.name!r} is not allowed")
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered")
        self._entries[entry.name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register toy components clean up with it)."""
        self._entries.pop(name, None)

    def _load(self) -> None:
        if not self._loading:
            self._loading = True  # stays set: a builtin module reading its own registry while it loads is fine
            for module in self._modules:
                importlib.import_module(module)
            load_plugins()

    def get_entry(self, name: str, source: object = None) -> E:
        """The entry called `name`; CtsegError naming the choices (and `source`, a file) otherwise."""
        self._load()
        if name not in self._entries:
            raise CtsegError(f"unknown {self.kind} {name!r}; choose from {', '.join(self._entries)}",
                             source if isinstance(source, (str, Path)) else None)
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        self._load()
        return list(self._entries)

    def __getitem__(self, name: str) -> E:
        self._load()
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def display(self, name: str) -> str:
        """The table name of entry `name`: its `display`, else (none given, or no such entry) `name` itself."""
        entry = self.get(name)
        return (entry.display if entry is not None else "") or name

    def sections(self) -> dict[str, type[BaseModel]]:
        """name -> config section of the entries that have one."""
        return {n: s for n, e in self.items() if (s := getattr(e, "section", None)) is not None}


_loaded_plugins: set[str] = set()


def load_plugins() -> None:
    """Import each module named in `CTSEG_PLUGINS` (comma-separated) once; CtsegError naming one that fails."""
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        if module in _loaded_plugins:
            continue
        _loaded_plugins.add(module)
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise CtsegError(f"{PLUGINS_ENV}: cannot import plugin module {module!r}: {err}") from None


AUGMENTERS: Registry[AugmenterEntry] = Registry("augmentation", ("ctseg.augment",))
NETWORKS: Registry[NetworkEntry] = Registry("network", ("ctseg.models",))
LAYOUTS: Registry[LayoutEntry] = Registry("dataset layout", ("ctseg.datasets",))
STRESS_AXES: Registry[Any] = Registry(  # ctseg.stress.perturb.Axis entries
    "stress axis", ("ctseg.stress.perturb", "ctseg.stress.phantom_reacquire"))
