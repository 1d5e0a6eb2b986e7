"""The base of every config section, and sections that also hold one sub-section per registered component."""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ctseg.registry import Registry

#: Largest seed: numpy's SeedSequence and torch.manual_seed both accept 0..2**32-1.
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def validation_lines(err: ValidationError) -> list[str]:
    """'where: message' per error of a pydantic ValidationError."""
    return [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()]


class _Registered(_Section):
    """A section that also holds, under its name, the config section of every entry of `_registry` that has
    one (`ctseg.registry`): validated by the entry's model, defaults when absent. Other unknown keys are refused.
    Sections declared as fields (the built-in components') are validated as fields."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)
    _registry: ClassVar[Registry[Any]]

    @model_validator(mode="before")
    @classmethod
    def _registered_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sections = {n: s for n, s in cls._registry.sections().items() if n not in cls.model_fields}
        unknown = sorted(k for k in data if k not in cls.model_fields and k not in sections)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; this section holds {[*cls.model_fields, *sections]}")
        out = dict(data)
        for name, section in sections.items():
            value = out.get(name, {})
            if not isinstance(value, section):
                try:
                    value = section.model_validate(value)
                except ValidationError as err:
                    raise ValueError(f"{name}: " + "; ".join(validation_lines(err))) from None
            out[name] = value
        return out

    def section(self, name: str) -> BaseModel:
        """The config section of component `name` (KeyError if it has none)."""
        if name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, BaseModel):
                return value
        return (self.__pydantic_extra__ or {})[name]
