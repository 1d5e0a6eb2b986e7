"""CLI choices read from the registries (`ctseg.registry`), so that a registered component (a plugin's too)
is a valid `--arch`, `--layout` or `--aug` without editing the commands."""
from __future__ import annotations

from ctseg.registry import AUGMENTERS, LAYOUTS, NETWORKS


def layout_choices(auto: bool = True) -> list[str]:
    """Registered dataset layouts, after "auto" (detect) when `auto`."""
    return ["auto", *LAYOUTS] if auto else list(LAYOUTS)


def arch_choices() -> list[str]:
    """Registered networks."""
    return list(NETWORKS)


def aug_help() -> str:
    """The augmentations every config knows (registered families and built-in arms), for `--aug` help."""
    from ctseg.config import BUILTIN_ARMS

    return ", ".join([*AUGMENTERS, *BUILTIN_ARMS]) + " or an arm of the config's augment.arms"
