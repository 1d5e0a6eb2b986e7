"""The base of every config section, and sections that also hold one sub-section per registered component."""
from __future__ import annotations

from typing import Any, ClassVar, TypeVar, overload

from pydantic import (BaseModel, ConfigDict, SerializerFunctionWrapHandler, ValidationError, model_serializer,
                      model_validator)
from pydantic_core import InitErrorDetails

from ctseg.registry import Registry

#: Largest seed: numpy's SeedSequence and torch.manual_seed both accept 0..2**32-1.
MAX_SEED = 2**32 - 1

S = TypeVar("S", bound=BaseModel)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


#: The base of a component's config section (`ctseg.registry` entries' `section`): unknown keys refused,
#: assignments validated, no NaN or infinity.
Section = _Section


def validation_lines(err: ValidationError) -> list[str]:
    """'where: message' per error of a pydantic ValidationError."""
    return [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()]


class _Registered(_Section):
    """A section that also holds, under its name, the config section of every entry of `_registry` that has
    one (`ctseg.registry`; the built-in components' too): validated by the entry's model, defaults when absent,
    its errors located like a field's (`augment.ctia.noise_p`). Other unknown keys are refused. Saved in this
    order: the fields before `_sections_before`, the component sections (registration order), the other fields."""

    model_config = ConfigDict(extra="allow", validate_assignment=True, allow_inf_nan=False)
    _registry: ClassVar[Registry[Any]]
    #: the field the component sections are saved before (None: after every field)
    _sections_before: ClassVar[str | None] = None

    @classmethod
    def section_types(cls) -> dict[str, type[BaseModel]]:
        """Component name -> the model of its section, in registration order."""
        return {n: s for n, s in cls._registry.sections().items() if n not in cls.model_fields}

    @classmethod
    def saved_keys(cls) -> list[str]:
        """Every key this section holds, in the order it is saved in."""
        fields = list(cls.model_fields)
        cut = fields.index(cls._sections_before) if cls._sections_before in fields else len(fields)
        return [*fields[:cut], *cls.section_types(), *fields[cut:]]

    @model_validator(mode="before")
    @classmethod
    def _registered_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        sections = cls.section_types()
        unknown = sorted(k for k in data if k not in cls.model_fields and k not in sections)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; this section holds {cls.saved_keys()}")
        out = {k: v for k, v in data.items() if k not in sections}
        errors: list[InitErrorDetails] = []
        for name, section in sections.items():
            value = data.get(name, {})
            if not isinstance(value, section):
                try:
                    value = section.model_validate(value)
                except ValidationError as err:  # raised as a ValidationError, pydantic locates them under this section
                    errors += [InitErrorDetails(type=e["type"], loc=(name, *e["loc"]), input=e["input"],
                                                ctx=e.get("ctx", {})) for e in err.errors()]
                    continue
            out[name] = value
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return out

    @model_validator(mode="after")
    def _assigned_sections(self) -> _Registered:
        """A section assigned as a mapping (`cfg.augment.ctia = {...}`, checked by `_registered_sections`) is
        kept as its model, as a declared field would be."""
        extra = self.__pydantic_extra__ or {}
        for name, section in self.section_types().items():
            if name in extra and not isinstance(extra[name], section):
                extra[name] = section.model_validate(extra[name])
        return self

    @model_serializer(mode="wrap")
    def _in_order(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if not isinstance(data, dict):
            return data
        keys = self.saved_keys()
        return {**{k: data[k] for k in keys if k in data}, **{k: v for k, v in data.items() if k not in keys}}

    @overload
    def section(self, name: str) -> BaseModel: ...

    @overload
    def section(self, name: str, kind: type[S]) -> S: ...

    def section(self, name: str, kind: type[BaseModel] = BaseModel) -> BaseModel:
        """The config section of component `name` (KeyError if it has none), checked to be a `kind` (TypeError
        otherwise): `cfg.augment.section("ctia", CTIAConfig)` is typed."""
        if name in type(self).model_fields:
            value = getattr(self, name)
        else:
            value = (self.__pydantic_extra__ or {})[name]
        if not isinstance(value, kind):
            raise TypeError(f"section {name!r} is a {type(value).__name__}, not a {kind.__name__}")
        return value
