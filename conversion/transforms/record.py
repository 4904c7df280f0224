"""What a transform declares about itself: one :class:`Transform` record per ``kvforge convert --to``
value, written beside its function and listed in ``TRANSFORMS`` (``transforms/__init__.py``).

A record holds the function, a dataclass of its options (types, defaults, help; the checks that
need the source config are ``check``), whether it fits anything to calibration activations, and
how it streams. The ``kvforge convert`` flags, YAML ``model.convert`` steps, ``check_options`` and
the table in docs/transforms.md are all made from it (docs/extending.md).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field
from typing import Any, Literal

from kvforge.arch import ModelConfig

# Options that count something (heads, ranks, layers, tokens): a value below 1 is named before any missing
# option is asked for (``--kv-lora-rank 0`` is about the rank, whatever else is missing).
COUNT_OPTIONS = (
    "n_kv_heads",
    "kv_lora_rank",
    "rope_dims",
    "factor",
    "chunk",
    "global_every",
    "n_latent_heads",
)


def option(default: Any = MISSING, *, help: str, parse: Callable[[str], Any] | None = None) -> Any:
    """A field of a transform's options dataclass: ``help`` documents it (``--help``, docs table);
    ``parse`` reads its command-line text when the type alone does not say how (e.g. a window pattern)."""
    metadata = {"help": help, "parse": parse}
    if default is MISSING:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class FittedOptions:
    """How a calibrated transform fits its layers (base of the options of to_gqa, to_mla, to_cla)."""

    sequential: bool = option(
        False,
        help="fit each layer on the inputs the converted layers before it give, its target repairing "
        "their error (default: each layer on the source's own inputs, which measured better on real "
        "weights: docs/transforms.md)",
    )
    refine_steps: int = option(
        0, help="after the closed-form fit, Adam steps per layer on the block's reconstruction error"
    )


@dataclass(frozen=True)
class Transform:
    """One transform.

    Args:
        name: the ``--to`` / ``model.convert.to`` value.
        function: ``function(config, state_dict, calibration=None, **options, [device, progress, sink])
            -> (config, state_dict)``; it receives the runtime keywords it declares.
        options: the dataclass of its options; a field without a default is required. Its docstring's
            first sentence is the transform's summary (``--help``, the docs table).
        check: ``check(config, **options)`` (the fitting options left out) raises ``ValueError`` for
            options the function would refuse on this source config, reading no weight - usually the
            function that makes the transform's target config.
        calibrates: whether it fits anything to calibration activations (text is sampled or read only
            then): True, False, or ``(option, value)`` - only when that option has that value.
        streams: True: it takes a ``sink`` and writes one layer at a time; False: it gets the whole state
            dict in memory (the streaming bound of ``kvforge convert`` does not hold for it).
    """

    name: str
    function: Callable[..., tuple[ModelConfig, dict]]
    options: type
    check: Callable[..., object]
    calibrates: bool | tuple[str, Any] = False
    streams: bool = True

    def __post_init__(self) -> None:
        if not dataclasses.is_dataclass(self.options):
            raise TypeError(f"Transform {self.name!r}: options must be a dataclass, got {self.options!r}")
        if (self.options.__doc__ or "").startswith(self.options.__name__ + "("):  # dataclass's own
            raise ValueError(
                f"Transform {self.name!r}: give {self.options.__name__} a docstring (its summary)"
            )
        for item in dataclasses.fields(self.options):
            if not item.metadata.get("help"):
                raise ValueError(f"Transform {self.name!r}: option {item.name!r} has no help (use option())")

    @property
    def summary(self) -> str:
        """The first sentence of the options' docstring: what the transform does, in one line."""
        text = " ".join((self.options.__doc__ or "").split())
        return text.split(". ")[0].rstrip(".")

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[ModelConfig, dict]:
        """The transform itself: ``record(config, state_dict, calibration, **options)``."""
        return self.function(*args, **kwargs)

    def uses_calibration(self, options: Any) -> bool:
        """Whether, with these options, the transform fits anything to calibration activations."""
        if isinstance(self.calibrates, tuple):
            name, value = self.calibrates
            return getattr(options, name) == value
        return self.calibrates

    def fields(self) -> tuple[dataclasses.Field, ...]:
        return dataclasses.fields(self.options)

    def required(self) -> list[str]:
        return [f.name for f in self.fields() if f.default is MISSING and f.default_factory is MISSING]

    def parse(self, values: Mapping[str, Any], where: str = "") -> Any:
        """The options dataclass from a mapping (YAML, Python): unknown names, missing required ones and
        values of the wrong type are errors that say what is allowed."""
        where = where or f"transform {self.name!r}"
        allowed = sorted(f.name for f in self.fields())
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(
                f"{where}: option(s) {unknown} unknown to transform {self.name!r}; allowed are {allowed}"
            )
        hints = typing.get_type_hints(self.options)
        for name, value in values.items():  # what was given is named before what is missing
            if not matches(value, hints[name]):
                raise ValueError(f"{where}: {name}={value!r} is not {describe(hints[name])}")
            if name in COUNT_OPTIONS and isinstance(value, int) and value < 1:
                raise ValueError(f"{where}: {name}={value}: must be a positive integer")
        missing = [name for name in self.required() if name not in values]
        if missing:
            raise ValueError(
                f"{where}: transform {self.name!r} needs option(s) {missing}; allowed are {allowed}"
            )
        return self.options(**values)

    def kwargs(self, options: Any) -> dict[str, Any]:
        """The function's keyword options. A None left at a None default is not passed (the function's
        own default, or a pass-through option not given, applies)."""
        return {
            f.name: getattr(options, f.name)
            for f in self.fields()
            if not (getattr(options, f.name) is None and f.default is None)
        }

    def check_options(self, config: ModelConfig, options: Any) -> None:
        """Raise ``ValueError`` for options the transform would refuse on ``config`` (no weight read)."""
        self.check(config, **self.option_kwargs(options))

    def option_kwargs(self, options: Any) -> dict[str, Any]:
        """:meth:`kwargs` without the fitting options: what ``check`` validates."""
        fit = {f.name for f in dataclasses.fields(FittedOptions)}
        return {name: value for name, value in self.kwargs(options).items() if name not in fit}


def matches(value: Any, hint: Any) -> bool:
    """Whether a plain (YAML/JSON) value fits a type annotation of an options dataclass."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, list | tuple) and all(matches(v, item) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    """A type annotation in words: ``an integer or a list of (an integer or None)``."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(arg) for arg in typing.get_args(hint))
    if origin is Literal:
        return "one of " + repr(list(typing.get_args(hint)))
    if origin in (list, tuple):
        return f"a list of ({describe(typing.get_args(hint)[0])})"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "None"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
