"""The exit methods, written down once: their syntax, needs, attachment, figure label and FLOPs rule.

A method is written ``KIND`` or ``KIND:SETTING[:SETTING]`` (``--method`` of ``dyvte-exit eval``,
the ``method`` column of an evaluation folder). :data:`METHODS` maps each kind to a
:class:`MethodKind`; nothing else in the toolkit lists the kinds or dispatches on them:

===============  ====================  =========  ===============================================
kind             forms                 needs      what happens to the image tokens
===============  ====================  =========  ===============================================
``none``         none                  -          nothing (the stock model)
``static``       static:K              -          all of them leave after layer K
``vtw``          vtw, vtw:K            (calib.)   VTW: a static exit after the layer its KL
                                                  calibration picked (``vtw``) or K (``vtw:K``)
``fastv``        fastv:K:R             -          FastV: after layer K each row keeps
                                                  ceil((1 - R) n_image) of them
``dyvte``        dyvte, dyvte:TAU      gates      the gates decide per row during the prefill
                                                  (TAU replaces the gates' saved threshold)
``dyvte+fastv``  dyvte+fastv:K:R,      gates      FastV after layer K, and all that are left go
                 dyvte+fastv:K:R:TAU              when the gate fires (TAU as for dyvte)
===============  ====================  =========  ===============================================

Settings: ``K`` an integer layer (0 <= K < decoder layers), ``R`` a pruning ratio in [0, 1],
``TAU`` a threshold on p(exit) in [0, 1).

Reading a method takes two steps, so that every mistake is found before a model loads:

1. :func:`parse_method_spec` (:func:`parse_method_specs` for a ``--method`` list, which also
   rejects duplicates) checks the syntax and every range that needs no model and returns a
   :class:`MethodSpec`; :meth:`MethodSpec.check_layers` checks K against the number of decoder
   layers, which the command line reads from the checkpoint's config before the weights.
2. :meth:`MethodSpec.bind` adds what the loaded model provides (gates, a VTW calibration) and
   returns an :class:`ExitMethod`, which attaches to the model (:meth:`ExitMethod.attached`) and
   prices a row's prefill (:meth:`ExitMethod.relative_prefill_flops`, from ``exit.flops``).

Every error is a :class:`~analysis.errors.UsageError` of one line. The evaluation's file names
(``eval-<method>.parquet``, ``summary.parquet``) and table names are here too, so that
``exit.evaluate`` (which writes them) and ``exit.plots`` (which reads them) agree.

This module imports neither torch nor transformers (the attachments import their modules when
called), so the command line checks methods at once.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from analysis.errors import UsageError
from exit.flops import DecoderShape, fastv_tokens_per_layer, prefill_flops, prefill_flops_for_counts

if TYPE_CHECKING:
    import torch
    from torch import nn

    from exit.gates import GateSet

__all__ = [
    "CALIBRATION",
    "GATES",
    "METHODS",
    "METHOD_FORMS",
    "ROWS_PATTERN",
    "ROWS_TABLE",
    "SUMMARY_FILE",
    "STOCK_MODEL",
    "SUMMARY_TABLE",
    "ExitMethod",
    "MethodKind",
    "MethodSpec",
    "gates_with_tau",
    "parse_method",
    "parse_method_spec",
    "parse_method_specs",
    "rows_file_name",
]

GATES = "gates"
"""A need: DyVTE gates (``--gates FOLDER``)."""
CALIBRATION = "calibration"
"""A need: a VTW calibration (``exit.evaluate.calibrate_vtw``, ``--calibration-questions``)."""
NEED_DESCRIPTIONS: dict[str, str] = {
    GATES: "gates (--gates FOLDER)",
    CALIBRATION: "a VTW calibration (exit.evaluate.calibrate_vtw), or the layer itself as 'vtw:K'",
}

ROWS_TABLE = "evaluation"
"""The registered table (``analysis.schema``) of the per-question rows, ``eval-<method>.parquet``."""
SUMMARY_TABLE = "evaluation_summary"
"""The registered table of ``summary.parquet``, one line per method."""
SUMMARY_FILE = "summary.parquet"
ROWS_PATTERN = "eval-*.parquet"


def rows_file_name(method: str) -> str:
    """``eval-<method>.parquet`` with ``:`` written as ``_`` (``eval-fastv_2_0.5.parquet``)."""
    return f"eval-{method.replace(':', '_')}.parquet"


# settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One placeholder of a method form (``K``, ``R``, ``TAU``)."""

    field: str
    """The :class:`MethodSpec` / :class:`ExitMethod` attribute it sets."""
    label: str
    """How a figure names it (``K=6``, ``tau=0.7``)."""
    expected: str
    """What the error message says a valid value is."""
    parse: Callable[[str], float | int | None]
    """The value, or None when the text is not a valid value."""
    format: Callable[[Any], str]


def _layer(text: str) -> int | None:
    return int(text) if re.fullmatch(r"\d+", text) else None


def _number(text: str, closed: bool) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    inside = 0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0
    return value if inside and math.isfinite(value) else None


SETTINGS: dict[str, Setting] = {
    "K": Setting("layer", "K", "an integer K >= 0 (a decoder layer, 0 = first)", _layer, str),
    "R": Setting("ratio", "R", "a number R in [0, 1] (the share of image tokens FastV prunes)",
                 lambda text: _number(text, closed=True), lambda value: f"{value:g}"),
    "TAU": Setting("tau", "tau", "a number TAU in [0, 1) (the gates' threshold on p(exit))",
                   lambda text: _number(text, closed=False), lambda value: f"{value:g}"),
}
"""Every placeholder a form may use."""


def _placeholders(form: str) -> list[str]:
    return form.split(":")[1:]


# the table ----------------------------------------------------------------------------------

STOCK_MODEL = "none"
"""The kind that changes nothing: the reference every figure and results table compares against."""

Attach = Callable[["ExitMethod", "nn.Module", "torch.Tensor", "torch.Tensor"], AbstractContextManager[Any]]
"""(method, model, input_ids, attention_mask) -> the context that applies the method to one batch;
it yields a handle with ``exit_layers`` (None for the stock model)."""
FlopsRule = Callable[[DecoderShape, "ExitMethod", int, int, "int | None"], int]
"""(shape, method, tokens, image_tokens, exit_layer or None) -> decoder FLOPs of the row's prefill."""


@dataclass(frozen=True)
class MethodKind:
    """One kind of exit method: everything the toolkit knows about it.

    Attributes:
        kind: the part of a method string before the first ``:``.
        forms: the accepted forms (``"fastv:K:R"``); the placeholders are keys of :data:`SETTINGS`.
        title: the kind's name in a figure legend.
        description: one line for documentation and ``--help``.
        attach: the context that applies a bound method to one batch (see :data:`Attach`).
        prefill_flops: the FLOPs rule (see :data:`FlopsRule`), evaluated on each row's exit layer.
        label: the settings as a figure labels a point (``K=2 R=0.5``; empty: the kind names it).
        needs: what a parsed method needs to be bound (:data:`GATES`, :data:`CALIBRATION`).
        bind: builds the :class:`ExitMethod` once the needs are there.
    """

    kind: str
    forms: tuple[str, ...]
    title: str
    description: str
    attach: Attach
    prefill_flops: FlopsRule
    label: Callable[[MethodSpec], str]
    needs: Callable[[MethodSpec], frozenset[str]]
    bind: Callable[[MethodSpec, Any, Any], ExitMethod]

    def form_of(self, values: dict[str, Any]) -> str:
        """The form whose placeholders are exactly the settings given (``{"layer": 2, "ratio": 0.5}``)."""
        given = {name for name, value in values.items() if value is not None}
        for form in self.forms:
            if {SETTINGS[p].field for p in _placeholders(form)} == given:
                return form
        raise UsageError(f"expected the settings of one of {list(self.forms)} for a {self.kind!r} method, "
                         f"found {sorted(given) or 'none'}")


@contextmanager
def _stock_model() -> Iterator[None]:
    yield None


def _attach_nothing(method: ExitMethod, model: nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> AbstractContextManager[None]:
    return _stock_model()


def _attach_static(method: ExitMethod, model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor) -> AbstractContextManager[Any]:
    from exit.surgery import visual_token_exit

    return visual_token_exit(model, exit_layers=[method.layer] * input_ids.shape[0])


def _attach_fastv(method: ExitMethod, model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> AbstractContextManager[Any]:
    from exit.baselines import FastV

    return FastV(model, method.layer, method.ratio)


def _attach_dyvte(method: ExitMethod, model: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor) -> AbstractContextManager[Any]:
    from exit.gates import dyvte_exit

    return dyvte_exit(model, method.gates, input_ids, attention_mask)


def _attach_dyvte_fastv(method: ExitMethod, model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> AbstractContextManager[Any]:
    from exit.baselines import dyvte_fastv

    return dyvte_fastv(model, method.gates, input_ids, attention_mask, method.layer, method.ratio)


def _flops_full(shape: DecoderShape, method: ExitMethod, tokens: int, image_tokens: int, exit_layer: int | None) -> int:
    return prefill_flops(shape, tokens, image_tokens, None)


def _flops_exit(shape: DecoderShape, method: ExitMethod, tokens: int, image_tokens: int, exit_layer: int | None) -> int:
    return prefill_flops(shape, tokens, image_tokens, exit_layer)


def _flops_fastv(shape: DecoderShape, method: ExitMethod, tokens: int, image_tokens: int, exit_layer: int | None) -> int:
    counts = fastv_tokens_per_layer(shape, tokens, image_tokens, method.layer, method.ratio, exit_layer)
    return prefill_flops_for_counts(shape, counts)


def _settings_label(spec: MethodSpec) -> str:
    form = spec.entry.form_of(spec.values)
    return " ".join(f"{SETTINGS[p].label}={SETTINGS[p].format(getattr(spec, SETTINGS[p].field))}"
                    for p in _placeholders(form))


def _gated_label(spec: MethodSpec) -> str:
    """DyVTE's label: ``tau=0.7``, or ``gates' tau`` when the gates' saved threshold is used."""
    return _settings_label(spec) or "gates' tau"


def _gated_fastv_label(spec: MethodSpec) -> str:
    """DyVTE + FastV's label, told apart from FastV's at the same settings: ``gates+K=2 R=0.5``."""
    return f"gates+{_settings_label(spec)}"


def _needs_nothing(spec: MethodSpec) -> frozenset[str]:
    return frozenset()


def _needs_gates(spec: MethodSpec) -> frozenset[str]:
    return frozenset({GATES})


def _needs_calibration_without_layer(spec: MethodSpec) -> frozenset[str]:
    return frozenset({CALIBRATION}) if spec.layer is None else frozenset()


def _bind_plain(spec: MethodSpec, gates: Any, calibration: Any) -> ExitMethod:
    return ExitMethod(spec.kind, layer=spec.layer, ratio=spec.ratio, tau=spec.tau)


def _bind_gated(spec: MethodSpec, gates: GateSet, calibration: Any) -> ExitMethod:
    gates = gates if spec.tau is None else gates_with_tau(gates, spec.tau)
    return ExitMethod(spec.kind, layer=spec.layer, gates=gates, ratio=spec.ratio, tau=spec.tau)


def _bind_gated_hidden(spec: MethodSpec, gates: GateSet, calibration: Any) -> ExitMethod:
    if gates.config.inputs != "hidden":
        raise UsageError(f"expected gates with inputs='hidden' for {spec.name!r}, found {gates.config.inputs!r}")
    return _bind_gated(spec, gates, calibration)


def _bind_vtw(spec: MethodSpec, gates: Any, calibration: Any) -> ExitMethod:
    layer = spec.layer if spec.layer is not None else int(calibration.layer)
    return ExitMethod("vtw", layer=layer, calibration=calibration if spec.layer is None else None)


def _kind(kind: str, forms: tuple[str, ...], title: str, description: str, attach: Attach, flops: FlopsRule,
          *, label: Callable[[MethodSpec], str] = _settings_label,
          needs: Callable[[MethodSpec], frozenset[str]] = _needs_nothing,
          bind: Callable[[MethodSpec, Any, Any], ExitMethod] = _bind_plain) -> MethodKind:
    return MethodKind(kind, forms, title, description, attach, flops, label, needs, bind)


METHODS: dict[str, MethodKind] = {entry.kind: entry for entry in (
    _kind(STOCK_MODEL, ("none",), "full model", "the stock model", _attach_nothing, _flops_full,
          label=lambda spec: "full model"),
    _kind("static", ("static:K",), "static exit", "every row's image tokens leave after layer K",
          _attach_static, _flops_exit),
    _kind("vtw", ("vtw", "vtw:K"), "VTW",
          "VTW: a static exit after the layer its KL calibration picked ('vtw') or after layer K ('vtw:K')",
          _attach_static, _flops_exit, needs=_needs_calibration_without_layer, bind=_bind_vtw),
    _kind("fastv", ("fastv:K:R",), "FastV", "FastV: after layer K each row keeps ceil((1 - R) n_image) image tokens",
          _attach_fastv, _flops_fastv),
    _kind("dyvte", ("dyvte", "dyvte:TAU"), "DyVTE",
          "the gates decide per row during the prefill (TAU replaces their saved threshold)",
          _attach_dyvte, _flops_exit, label=_gated_label, needs=_needs_gates, bind=_bind_gated),
    _kind("dyvte+fastv", ("dyvte+fastv:K:R", "dyvte+fastv:K:R:TAU"), "DyVTE + FastV",
          "FastV after layer K, and every image token left goes when the gate fires (TAU replaces their threshold)",
          _attach_dyvte_fastv, _flops_fastv, label=_gated_fastv_label, needs=_needs_gates, bind=_bind_gated_hidden),
)}
"""Every kind of exit method, by kind (the order of ``--help`` and of the documentation)."""

METHOD_FORMS: tuple[str, ...] = tuple(form for entry in METHODS.values() for form in entry.forms)
"""Every accepted form: ``none``, ``static:K``, ``vtw``, ``vtw:K``, ``fastv:K:R``, ..."""


# parsed and bound methods ---------------------------------------------------------------------


def _entry(kind: str) -> MethodKind:
    if kind not in METHODS:
        raise UsageError(_unknown_kind(kind, kind))
    return METHODS[kind]


def _name(kind: str, values: dict[str, Any]) -> str:
    form = _entry(kind).form_of(values)
    return ":".join([kind, *(SETTINGS[p].format(values[SETTINGS[p].field]) for p in _placeholders(form))])


@dataclass(frozen=True)
class MethodSpec:
    """A method string that passed the checks that need no model (:func:`parse_method_spec`)."""

    kind: str
    layer: int | None = None
    ratio: float | None = None
    tau: float | None = None

    @property
    def entry(self) -> MethodKind:
        return METHODS[self.kind]

    @property
    def values(self) -> dict[str, Any]:
        return {"layer": self.layer, "ratio": self.ratio, "tau": self.tau}

    @property
    def name(self) -> str:
        """The method as written on the command line, settings in canonical form (``fastv:2:0.5``)."""
        return _name(self.kind, self.values)

    @property
    def needs(self) -> frozenset[str]:
        """What :meth:`bind` needs: :data:`GATES`, :data:`CALIBRATION` (empty: nothing)."""
        return self.entry.needs(self)

    @property
    def label(self) -> str:
        """The settings as a figure labels the point (``K=2 R=0.5``, ``tau=0.7``; may be empty)."""
        return self.entry.label(self)

    def check_layers(self, num_layers: int) -> MethodSpec:
        """Raise UsageError unless K is a layer of a decoder with ``num_layers`` layers; return self."""
        if self.layer is not None and not 0 <= self.layer < num_layers:
            raise UsageError(f"expected the layer K of {self.name!r} in 0..{num_layers - 1} (the model has "
                             f"{num_layers} decoder layers), found {self.layer}")
        return self

    def bind(self, num_layers: int, gates: GateSet | None = None, calibration: Any = None) -> ExitMethod:
        """The method for a loaded model with ``num_layers`` decoder layers.

        Args:
            gates: needed by the dyvte kinds (``dyvte:TAU`` gets a copy with that threshold).
            calibration: needed by ``vtw`` (an ``exit.evaluate.VTWCalibration``; ``vtw:K`` needs none).

        Raises:
            UsageError: K or the calibrated layer out of range, a missing need, unsuitable gates.
        """
        self.check_layers(num_layers)
        given = {GATES: gates, CALIBRATION: calibration}
        for need in sorted(self.needs):
            if given[need] is None:
                raise UsageError(f"expected {NEED_DESCRIPTIONS[need]} for the method {self.name!r}, found none")
        method = self.entry.bind(self, gates, calibration)
        if method.layer is not None and not 0 <= method.layer < num_layers:
            raise UsageError(f"expected the layer of {method.name!r} in 0..{num_layers - 1}, found {method.layer}")
        return method


@dataclass(frozen=True)
class ExitMethod:
    """A method bound to a model: how image tokens leave it (see :data:`METHODS` for the kinds)."""

    kind: str
    layer: int | None = None
    gates: GateSet | None = None
    ratio: float | None = None
    tau: float | None = None
    calibration: Any = field(default=None, compare=False, repr=False)
    """The VTW calibration a ``vtw`` method's layer came from (None: given as ``vtw:K``)."""

    @property
    def entry(self) -> MethodKind:
        return _entry(self.kind)

    @property
    def spec(self) -> MethodSpec:
        return MethodSpec(self.kind, self.layer, self.ratio, self.tau)

    @property
    def name(self) -> str:
        """The method as written on the command line (``static:K``, ``fastv:K:R``, ``dyvte:TAU``, ...)."""
        return _name(self.kind, self.spec.values)

    def attached(self, model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> AbstractContextManager[Any]:
        """The context that applies the method to one batch; it yields a handle with ``exit_layers``
        (None for the stock model)."""
        return self.entry.attach(self, model, input_ids, attention_mask)

    def relative_prefill_flops(self, shape: DecoderShape, tokens: int, image_tokens: int,
                               exit_layer: int | None) -> float:
        """Decoder prefill FLOPs of a row under the method over the stock model's (``exit.flops``).

        Args:
            exit_layer: the layer after which the row's last image token left (None: never).
        """
        full = prefill_flops(shape, tokens, image_tokens, None)
        return self.entry.prefill_flops(shape, self, tokens, image_tokens, exit_layer) / full

    def provenance(self) -> dict[str, Any]:
        """What the method was, for a file's provenance: its name and settings, the gates' config and
        the model they were made for, the VTW calibration."""
        found: dict[str, Any] = {"method": self.name, "kind": self.kind,
                                 **{k: v for k, v in self.spec.values.items() if v is not None}}
        if self.gates is not None:
            found["gates"] = self.gates.provenance()
        if self.calibration is not None:
            found["vtw_calibration"] = {"layer": self.calibration.layer, "eta": self.calibration.eta,
                                        "samples": self.calibration.samples}
        return found


def gates_with_tau(gates: GateSet, tau: float) -> GateSet:
    """The same gates (shared weights) with another threshold on p(exit)."""
    clone = copy.copy(gates)
    clone.config = replace(gates.config, tau=tau)
    return clone


# parsing ------------------------------------------------------------------------------------


def _unknown_kind(kind: str, text: str) -> str:
    forms = ", ".join(repr(form) for form in METHOD_FORMS)
    return f"unknown exit method kind {kind!r} in {text!r}: expected a method of one of the kinds {list(METHODS)} ({forms})"


def parse_method_spec(text: str) -> MethodSpec:
    """Check one method string's syntax and the ranges that need no model (K >= 0, 0 <= R <= 1,
    0 <= TAU < 1).

    Raises:
        UsageError: an unknown kind (the message lists the valid ones), a form the kind does not
            have, or a setting that is not a valid value.
    """
    kind, *arguments = text.strip().split(":")
    if kind not in METHODS:
        raise UsageError(_unknown_kind(kind, text))
    entry = METHODS[kind]
    form = next((f for f in entry.forms if len(_placeholders(f)) == len(arguments)), None)
    if form is None:
        forms = " or ".join(repr(f) for f in entry.forms)
        raise UsageError(f"expected a method of the form {forms}, found {text!r}")
    values: dict[str, Any] = {}
    for placeholder, argument in zip(_placeholders(form), arguments):
        setting = SETTINGS[placeholder]
        value = setting.parse(argument.strip())
        if value is None:
            raise UsageError(f"expected {form!r} with {setting.expected}, found {text!r}")
        values[setting.field] = value
    return MethodSpec(kind, **values)


def parse_method_specs(values: Iterable[str]) -> list[MethodSpec]:
    """The methods of ``--method`` values (each one method or several separated by commas), checked
    as :func:`parse_method_spec` does.

    Raises:
        UsageError: a bad method, none at all, or a method given twice (``static:1,static:1``;
            also ``dyvte:0.5`` and ``dyvte:0.50``, which would write the same file).
    """
    specs = [parse_method_spec(text) for value in values for text in value.split(",") if text.strip()]
    if not specs:
        raise UsageError(f"expected at least one method ({', '.join(METHOD_FORMS)}), found none")
    names = [spec.name for spec in specs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise UsageError(f"expected each method once, found {twice} more than once")
    return specs


def parse_method(text: str, num_layers: int, gates: GateSet | None = None, vtw: Any = None) -> ExitMethod:
    """One of :data:`METHOD_FORMS` bound at once: :func:`parse_method_spec`, then
    :meth:`MethodSpec.bind` (``vtw`` is the VTW calibration).

    Raises:
        UsageError (a ValueError): as those two.
    """
    return parse_method_spec(text).bind(num_layers, gates, vtw)
