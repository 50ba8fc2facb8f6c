"""DyVTE gates: one small classifier per decoder layer that decides when the image tokens may go.

A gate reads what ``analysis.recorder`` hands over right after its layer (a ``LayerRecord``):
- "hidden" (the paper's input): concat(mean of the text tokens after the image excluding the last,
  the last prompt token), 2 x hidden_size features;
- "attention": that layer's attention statistics, per head: the group masses of the text and the
  last queries over (system, image, text) keys and their row entropies, 8 x heads features;
- "both": the two concatenated (hidden first);
- "history": the stage curves so far: for every layer up to this one, the eight attention
  statistics above averaged over heads (text and last queries' masses over system, image and text
  keys, and their entropies), layer after layer; the layers still to come are 0. So the gate after
  layer l sees how text->image attention rose and fell in layers 0..l (num_layers x 8 features);
- "hidden+history": "hidden" then "history".
Empty groups (NaN in the record, e.g. no text token besides the last) become 0. The attention
statistics come from the recorder's fast path (``analysis.recorder``), so no input kind needs
eager attention; the history kinds need the earlier layers' records, which
:class:`GateFeatureBuilder` keeps during a prefill.

Each gate is Linear(features -> width, no bias) -> GELU -> Linear(width -> 2, no bias), xavier
initialised from the config's seed; logit index 1 = exit; a row exits when p(exit) > tau.

During a prefill (``dyvte_exit``) the gates are asked after each layer, for the rows that have not
exited, until one fires; decoding does not ask again. ``save`` writes ``gates.safetensors`` and
``gate_config.json`` (the GateConfig and the model the gates were made for: type, layer count,
hidden size, heads); ``DyVTEGates.load(folder, model)`` refuses gates made for another model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from analysis.adapters import ModelAdapter, resolve_adapter
from analysis.attention import path_of_model
from analysis.errors import DyVTEError, UsageError
from analysis.layout import KEY_GROUPS, QUERY_GROUPS, TokenLayout, token_layout
from analysis.recorder import AttentionRecorder, LayerRecord, record_attention
from exit.surgery import VisualExit, visual_token_exit

GateInput = Literal["hidden", "attention", "both", "history", "hidden+history"]
GATE_INPUTS: tuple[str, ...] = ("hidden", "attention", "both", "history", "hidden+history")
HISTORY_INPUTS: tuple[str, ...] = ("history", "hidden+history")
"""The input kinds built from the records of every layer so far (``GateFeatureBuilder``)."""
WEIGHTS_FILE = "gates.safetensors"
CONFIG_FILE = "gate_config.json"
FORMAT_VERSION = 1
ATTENTION_QUERIES: tuple[str, ...] = ("text", "last")
"""The query groups whose statistics are gate inputs (the key groups: every group, ``KEY_GROUPS``)."""
ATTENTION_KEYS: tuple[str, ...] = tuple(KEY_GROUPS)
_ATTENTION_QUERIES = [QUERY_GROUPS.index(group) for group in ATTENTION_QUERIES]
_STATISTICS = len(_ATTENTION_QUERIES) * 4  # per head and layer and query group: 3 key-group masses + 1 entropy


class GateMismatchError(DyVTEError, ValueError):
    """Gates were made for a different model (or a different input) than the one at hand."""


@dataclass(frozen=True)
class GateConfig:
    """Settings of a set of DyVTE gates.

    Attributes:
        inputs: "hidden" (the paper's), "attention" or "both".
        hidden_width: width of each gate's hidden layer (the paper uses 2048).
        tau: a row exits when p(exit) > tau.
        seed: seed of the xavier initialisation.
        shared: one network for every layer instead of one per layer: its input is the layer's
            features and the layer's one-hot, standardised with the training features' mean and
            deviation (``DyVTEGates.fit_input_scale``), so every layer's gate learns from every
            layer's rows.
        dropout: dropout on the gates' hidden layer while training (0: none, the paper's).
    """

    inputs: str = "hidden"
    hidden_width: int = 2048
    tau: float = 0.5
    seed: int = 0
    shared: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.inputs not in GATE_INPUTS:
            raise UsageError(f"expected gate inputs to be one of {list(GATE_INPUTS)}, found {self.inputs!r}")
        if self.hidden_width < 1:
            raise UsageError(f"expected a positive hidden width, found {self.hidden_width}")
        if not 0.0 <= self.tau <= 1.0:
            raise UsageError(f"expected tau in [0, 1], found {self.tau}")
        if not 0.0 <= self.dropout < 1.0:
            raise UsageError(f"expected a dropout in [0, 1), found {self.dropout}")


@dataclass(frozen=True)
class ModelSignature:
    """What the gates must match in a model: family, decoder layers, hidden size, heads."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelSignature:
        adapter = resolve_adapter(model)
        text = adapter.text_config(model)
        return cls(
            model_type=str(model.config.model_type),
            num_layers=len(adapter.decoder_layers(model)),
            hidden_size=int(text.hidden_size),
            num_heads=int(text.num_attention_heads),
        )


def feature_size(config: GateConfig, signature: ModelSignature) -> int:
    """Number of input features of one gate."""
    hidden = 2 * signature.hidden_size
    attention = signature.num_heads * _STATISTICS
    history = signature.num_layers * _STATISTICS
    return {"hidden": hidden, "attention": attention, "both": hidden + attention, "history": history,
            "hidden+history": hidden + history}[config.inputs]


def recorded_kind(inputs: str) -> str:
    """What the recorder must hand over for gate input ``inputs``: "hidden", "attention" or "both"."""
    return {"history": "attention", "hidden+history": "both"}.get(inputs, inputs)


def gate_features(record: LayerRecord, inputs: str) -> torch.Tensor:
    """(batch, features) float32 gate input from one layer's record (see the module docstring).

    Raises:
        UsageError (a ValueError): the record lacks what ``inputs`` needs (ask the recorder for states
            or attention), or ``inputs`` is not a gate input.
    """
    parts: list[torch.Tensor] = []
    if inputs in ("hidden", "both"):
        if record.text_mean is None or record.last is None:
            raise UsageError(f"expected text states in the record of layer {record.layer} (record_states=True), found none")
        parts.append(torch.cat([record.text_mean, record.last], dim=-1).float())
    if inputs in ("attention", "both"):
        if record.mass is None or record.entropy is None:
            raise UsageError(f"expected attention statistics in the record of layer {record.layer}, found none")
        mass = record.mass[:, :, _ATTENTION_QUERIES, :].flatten(1)  # (batch, head * 2 * 3)
        entropy = record.entropy[:, :, _ATTENTION_QUERIES].flatten(1)  # (batch, head * 2)
        parts.append(torch.cat([mass, entropy], dim=-1).float())
    if not parts:
        hint = " (the history kinds need every earlier layer: use GateFeatureBuilder)" if inputs in HISTORY_INPUTS else ""
        raise UsageError(f"expected gate inputs to be one of {list(GATE_INPUTS[:3])}, found {inputs!r}{hint}")
    return torch.nan_to_num(torch.cat(parts, dim=-1), nan=0.0)


def _head_mean(attention: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(..., 8) head-mean statistics out of (..., heads x 8) per-head attention features."""
    masses, entropies = attention[..., : num_heads * 6], attention[..., num_heads * 6 :]
    shape = attention.shape[:-1]
    return torch.cat([masses.reshape(*shape, num_heads, 6).mean(-2), entropies.reshape(*shape, num_heads, 2).mean(-2)], -1)


def history_of(summaries: torch.Tensor) -> torch.Tensor:
    """(..., layers, layers x 8) history features out of (..., layers, 8) per-layer head-mean
    statistics: at layer l, layers 0..l in order and zeros for the layers after l."""
    layers = summaries.shape[-2]
    seen = torch.ones(layers, layers, dtype=torch.bool, device=summaries.device).tril()  # (l, j): j <= l
    history = summaries.unsqueeze(-3) * seen[..., None].to(summaries.dtype)  # ... l j 8
    return history.flatten(-2)


class GateFeatureBuilder:
    """Gate inputs layer after layer during one prefill: the history kinds keep every earlier
    layer's head-mean statistics; the other kinds are :func:`gate_features` of the record alone."""

    def __init__(self, inputs: str, signature: ModelSignature) -> None:
        if inputs not in GATE_INPUTS:
            raise UsageError(f"expected gate inputs to be one of {list(GATE_INPUTS)}, found {inputs!r}")
        self.inputs, self.signature = inputs, signature
        self._summaries: torch.Tensor | None = None  # (batch, layers, 8), zeros where no layer ran yet

    def __call__(self, record: LayerRecord) -> torch.Tensor:
        """(batch, features) inputs of the gate after ``record.layer`` (records must come in layer order)."""
        if self.inputs not in HISTORY_INPUTS:
            return gate_features(record, self.inputs)
        attention = gate_features(record, "attention")
        summary = _head_mean(attention, self.signature.num_heads)
        if self._summaries is None or record.layer == 0:
            self._summaries = summary.new_zeros(summary.shape[0], self.signature.num_layers, summary.shape[-1])
        self._summaries[:, record.layer] = summary  # the layers after this one are still 0
        parts = [gate_features(record, "hidden")] if self.inputs == "hidden+history" else []
        return torch.cat([*parts, self._summaries.flatten(1)], dim=-1)  # a new tensor: later layers do not change it


def select_features(features: torch.Tensor, found: str, wanted: str, signature: ModelSignature) -> torch.Tensor:
    """The ``wanted`` gate inputs out of features cached as ``found`` (last dimension).

    Features of kind "both" hold the hidden part first (:func:`gate_features`), so one sweep with
    "both" serves gates of every kind; the history kinds need the features of every layer
    (``features`` of shape (..., layers, F)) and equal what :class:`GateFeatureBuilder` builds
    during a prefill.

    Raises:
        GateMismatchError (a ValueError): ``wanted`` cannot be taken from ``found``.
    """
    if found == wanted:
        return features
    sources = {"hidden": ("both",), "attention": ("both",), "history": ("attention", "both"), "hidden+history": ("both",)}
    if found not in sources.get(wanted, ()):
        raise GateMismatchError(f"expected cached features of kind {wanted!r} or one of {list(sources.get(wanted, ()))} "
                                f"for {wanted!r} gates, found {found!r}")
    expected = feature_size(GateConfig(inputs=found), signature)
    if features.shape[-1] != expected:
        raise GateMismatchError(f"expected {expected} cached {found!r} features per layer, found {features.shape[-1]}")
    hidden = 2 * signature.hidden_size if found == "both" else 0
    if wanted in ("hidden", "attention"):
        return features[..., :hidden] if wanted == "hidden" else features[..., hidden:]
    if features.dim() < 2 or features.shape[-2] != signature.num_layers:
        raise GateMismatchError(f"expected cached features of all {signature.num_layers} layers for {wanted!r} gates, "
                                f"found shape {tuple(features.shape)}")
    history = history_of(_head_mean(features[..., hidden:], signature.num_heads))
    return torch.cat([features[..., :hidden], history], -1) if wanted == "hidden+history" else history


def _gate(features: int, width: int, generator: torch.Generator) -> nn.Sequential:
    gate = nn.Sequential(nn.Linear(features, width, bias=False), nn.GELU(), nn.Linear(width, 2, bias=False))
    for linear in (gate[0], gate[2]):
        nn.init.xavier_uniform_(linear.weight, generator=generator)
    return gate


class DyVTEGates(nn.Module):
    """One gate per decoder layer of the model described by ``signature`` (or, with
    ``GateConfig.shared``, one gate that every layer asks with its one-hot appended)."""

    def __init__(self, config: GateConfig, signature: ModelSignature) -> None:
        super().__init__()
        self.config = config
        self.signature = signature
        generator = torch.Generator().manual_seed(config.seed)
        size = feature_size(config, signature)
        if config.shared:
            size += signature.num_layers
            self.register_buffer("input_mean", torch.zeros(size))
            self.register_buffer("input_scale", torch.ones(size))
        count = 1 if config.shared else signature.num_layers
        self.gates = nn.ModuleList(_gate(size, config.hidden_width, generator) for _ in range(count))

    @classmethod
    def for_model(cls, model: nn.Module, config: GateConfig = GateConfig()) -> DyVTEGates:
        """Freshly initialised gates for ``model``, on the model's device."""
        gates = cls(config, ModelSignature.of(model))
        return gates.to(next(model.parameters()).device)

    def _shared_input(self, layer: int | torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The shared gate's input: ``features`` and the one-hot of ``layer``, standardised."""
        one_hot = nn.functional.one_hot(torch.as_tensor(layer, device=features.device).expand(features.shape[0]),
                                        self.signature.num_layers).to(features.dtype)
        return (torch.cat([features, one_hot], dim=-1) - self.input_mean) / self.input_scale

    @torch.no_grad()
    def fit_input_scale(self, rows: Iterable[torch.Tensor]) -> None:
        """Set a shared gate's standardisation from training features: ``rows`` yields
        (samples, layers, features) blocks; every (sample, layer) row counts once."""
        if not self.config.shared:
            raise UsageError("expected shared gates (GateConfig.shared) to fit an input scale, found per-layer gates")
        total, total_sq, count = None, None, 0
        for block in rows:
            samples, layers = block.shape[:2]
            flat = torch.cat([block.reshape(samples * layers, -1).double(),
                              torch.eye(layers, dtype=torch.float64).repeat(samples, 1)], dim=-1)
            total = flat.sum(0) if total is None else total + flat.sum(0)
            total_sq = (flat ** 2).sum(0) if total_sq is None else total_sq + (flat ** 2).sum(0)
            count += len(flat)
        if not count:
            raise UsageError("expected training features to fit the shared gate's input scale, found none")
        mean = total / count
        deviation = (total_sq / count - mean ** 2).clamp_min(0.0).sqrt()
        self.input_mean.copy_(mean.float())
        self.input_scale.copy_(deviation.clamp_min(1e-4).float())

    def forward(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(batch, 2) logits of gate ``layer``; index 1 = exit."""
        if not 0 <= layer < self.signature.num_layers:
            raise IndexError(f"expected a layer in 0..{self.signature.num_layers - 1}, found {layer}")
        gate = self.gates[0 if self.config.shared else layer]
        inputs = features.to(gate[0].weight.device, gate[0].weight.dtype)
        if self.config.shared:
            inputs = self._shared_input(layer, inputs)
        hidden = gate[1](gate[0](inputs))
        return gate[2](nn.functional.dropout(hidden, self.config.dropout, self.training))

    def p_exit(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(batch,) probability that exiting after ``layer`` is safe."""
        return self(layer, features).softmax(dim=-1)[:, 1]

    def fires(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(batch,) bool: p(exit) > tau."""
        return self.p_exit(layer, features) > self.config.tau

    def check_model(self, model: nn.Module) -> None:
        """Raise GateMismatchError unless ``model`` is the kind of model these gates were made for."""
        found = ModelSignature.of(model)
        if found != self.signature:
            different = {k: (v, getattr(found, k)) for k, v in asdict(self.signature).items() if getattr(found, k) != v}
            raise GateMismatchError(
                f"expected a model matching the gates {asdict(self.signature)}, found {asdict(found)} (differs in "
                + ", ".join(f"{k}: gates {a!r}, model {b!r}" for k, (a, b) in different.items()) + ")"
            )

    def provenance(self) -> dict:
        """The gates' settings and the model they were made for, for a results file's provenance."""
        return {**asdict(self.config), "model": asdict(self.signature)}

    def save(self, folder: str | Path) -> Path:
        """Write ``gates.safetensors`` and ``gate_config.json`` into ``folder``; returns the folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "dyvte-gates", "version": str(FORMAT_VERSION)})
        meta = {"format_version": FORMAT_VERSION, "gate": asdict(self.config), "model": asdict(self.signature)}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path, model: nn.Module | None = None, *, tau: float | None = None) -> DyVTEGates:
        """Gates saved by ``save``; with ``model``, checked against it and moved to its device.

        Raises:
            FileNotFoundError: a file is missing. GateMismatchError: the gates were made for another model.
        """
        folder = Path(folder)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"expected {name} in {folder}, found none (save gates with DyVTEGates.save)")
        try:
            meta = json.loads((folder / CONFIG_FILE).read_text())
        except (ValueError, UnicodeDecodeError) as error:
            raise GateMismatchError(f"{folder / CONFIG_FILE}: expected the JSON written by DyVTEGates.save, "
                                    f"found unreadable text ({error})") from error
        if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
            meta = meta if isinstance(meta, dict) else {}
            raise GateMismatchError(f"expected gate format version {FORMAT_VERSION}, found {meta.get('format_version')!r}")
        config = GateConfig(**meta["gate"])
        if tau is not None:
            config = GateConfig(**{**asdict(config), "tau": tau})
        gates = cls(config, ModelSignature(**meta["model"]))
        if model is not None:
            try:
                gates.check_model(model)
            except GateMismatchError as error:
                raise GateMismatchError(f"gates in {folder} were trained for another model: {error}") from error
        gates.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        if model is not None:
            gates = gates.to(next(model.parameters()).device)
        return gates.eval()


class AveragedGates(nn.Module):
    """Several gate sets trained by one recipe (seeds, say) used as one: p(exit) is the mean of the
    members' p(exit), and a row exits when that mean passes tau.

    Averaging removes most of the seed-to-seed spread of a single set (on the demo model the three
    seeds of the hidden agreement gates land 0.7 points apart at one tau; benchmarks/gate_ensemble_probe.py).
    It has the interface the exit methods use: ``config`` (inputs, tau), ``signature``, ``p_exit``,
    ``fires`` and ``check_model``.

    Raises:
        GateMismatchError: no members, or members made for other models or other inputs, or (without
            ``tau``) members saved with different thresholds.
    """

    def __init__(self, members: Sequence[DyVTEGates], *, tau: float | None = None) -> None:
        super().__init__()
        if not members:
            raise GateMismatchError("expected at least one gate set to average, found none")
        first = members[0]
        for index, member in enumerate(members[1:], start=1):
            if member.signature != first.signature or member.config.inputs != first.config.inputs:
                raise GateMismatchError(
                    f"expected gate sets of one model and one input kind to average, found member {index} made for "
                    f"{asdict(member.signature)} with inputs {member.config.inputs!r}, member 0 for "
                    f"{asdict(first.signature)} with inputs {first.config.inputs!r}")
        taus = sorted({member.config.tau for member in members})
        if tau is None and len(taus) > 1:
            raise GateMismatchError(f"expected gate sets saved with one tau (or an explicit tau), found taus {taus}")
        self.members = nn.ModuleList(members)
        self.signature = first.signature
        self.config = replace(first.config, tau=taus[0] if tau is None else tau)

    def p_exit(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(batch,) the members' probabilities that exiting after ``layer`` is safe, averaged."""
        return torch.stack([member.p_exit(layer, features) for member in self.members]).mean(dim=0)

    def fires(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """(batch,) bool: averaged p(exit) > tau."""
        return self.p_exit(layer, features) > self.config.tau

    def check_model(self, model: nn.Module) -> None:
        """Raise GateMismatchError unless ``model`` is the kind of model these gates were made for."""
        self.members[0].check_model(model)

    def provenance(self) -> dict:
        """The averaged sets' settings (one entry per member) and the model, for a results file's provenance."""
        return {"inputs": self.config.inputs, "tau": self.config.tau, "averaged": [asdict(m.config) for m in self.members],
                "model": asdict(self.signature)}


GateSet = DyVTEGates | AveragedGates


def load_gate_set(spec: str | Path, model: nn.Module | None = None, *, tau: float | None = None) -> GateSet:
    """The gates of a folder written by ``dyvte-exit train``, or, for comma-separated folders
    (``gates-seed0,gates-seed1,gates-seed2``), those sets averaged (``AveragedGates``).

    Raises:
        FileNotFoundError: a folder lacks a gate file. GateMismatchError: the gates do not fit ``model``
            or one another.
    """
    folders = [part for part in str(spec).split(",") if part]
    if len(folders) == 1:
        return DyVTEGates.load(folders[0], model, tau=tau)
    return AveragedGates([DyVTEGates.load(folder, model) for folder in folders], tau=tau).eval()


def gate_recording(
    model: nn.Module,
    layout: TokenLayout,
    inputs: str,
    *,
    keep: bool = True,
    on_layer: Callable[[LayerRecord], None] | None = None,
    adapter: ModelAdapter | None = None,
    cached_prefix: int = 0,
) -> AbstractContextManager[AttentionRecorder]:
    """``record_attention`` set up for the gate input ``inputs``: states and/or attention statistics,
    observed the way the model already runs (eager weights under eager, else the SDPA fast path),
    so the model's outputs are unchanged. ``cached_prefix``: as ``record_attention``'s (the forward
    runs the positions after a prefix its KV cache holds).

    Raises:
        UsageError: ``inputs`` needs attention statistics after every layer and some decoder layers
            have no attention map (a hybrid decoder's recurrent layers; "hidden" gates work there).
    """
    adapter = adapter or resolve_adapter(model)
    unmapped = adapter.recurrent_layers(model)
    if unmapped and recorded_kind(inputs) in ("attention", "both"):
        raise UsageError(
            f"expected gate inputs that every decoder layer has for {adapter.model_type!r}, found {inputs!r}: decoder layers "
            f"{unmapped} are recurrent (linear-attention) layers with no attention map; use inputs='hidden'"
        )
    return record_attention(
        model,
        layout,
        attention=path_of_model(model, adapter).name,
        record_attention=recorded_kind(inputs) in ("attention", "both"),
        record_states=recorded_kind(inputs) in ("hidden", "both"),
        query_groups=[QUERY_GROUPS[g] for g in _ATTENTION_QUERIES],  # the only rows the gates read
        keep=keep,
        on_layer=on_layer,
        adapter=adapter,
        cached_prefix=cached_prefix,
    )


@contextmanager
def dyvte_exit(
    model: nn.Module,
    gates: GateSet,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> Iterator[VisualExit]:
    """Run ``model`` with gated visual-token exit for the batch ``input_ids`` (the prompt).

    During the prefill, after each decoder layer, the gate of that layer is asked for every row
    that has not exited; rows whose gate fires exit after that layer. Decoding steps (generate())
    are not asked again. The yielded handle tells each row's exit layer after the prefill.
    The block serves this one batch and generation with the KV cache (the default): a forward of
    another length inside it (``use_cache=False`` re-runs the whole sequence each step) is not
    gated, so it runs with the image in every layer.

    Example::

        with dyvte_exit(model, gates, batch["input_ids"], batch["attention_mask"]) as surgery:
            out = model.generate(**batch, max_new_tokens=16)
        print(surgery.exit_layers)
    """
    gates.check_model(model)
    adapter = resolve_adapter(model)
    layout = token_layout(input_ids, attention_mask, adapter.image_token_id(model))
    inputs = gates.config.inputs
    features_of = GateFeatureBuilder(inputs, gates.signature)

    with visual_token_exit(model, None) as surgery:

        def on_layer(record: LayerRecord) -> None:
            pending = surgery.pending_rows()
            if record.layer == surgery.num_layers - 1 or not bool(pending.any()):
                return
            with torch.no_grad():
                fires = gates.fires(record.layer, features_of(record)).to(pending.device)
            if bool((fires & pending).any()):
                surgery.request_exit(record.layer, fires & pending)

        with gate_recording(model, layout, inputs, keep=False, on_layer=on_layer, adapter=adapter):
            yield surgery


def gate_parameters(gates: GateSet) -> int:
    """Number of parameters of all gates."""
    return sum(p.numel() for p in gates.parameters())




def answer_with_gates(
    model: nn.Module,
    processor: object,
    gates: GateSet,
    images: list[object],
    question: str,
    max_new_tokens: int = 32,
) -> tuple[str, int | None]:
    """Greedy answer to one question about ``images`` with gated exit; returns (answer, exit layer or None)."""
    from analysis.data import Question, build_prompt

    prompt = build_prompt(processor, Question("q", tuple(f"image-{i}" for i in range(len(images))), question))
    inputs = processor(images=images, text=prompt, return_tensors="pt")  # type: ignore[operator]
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad(), dyvte_exit(model, gates, inputs["input_ids"], inputs.get("attention_mask")) as surgery:
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # type: ignore[operator]
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    answer = processor.batch_decode(new_tokens, skip_special_tokens=True)[0]  # type: ignore[attr-defined]
    return answer.strip(), surgery.exit_layers[0]


__all__ = [
    "AveragedGates",
    "DyVTEGates",
    "GATE_INPUTS",
    "GateSet",
    "load_gate_set",
    "GateConfig",
    "GateInput",
    "GateMismatchError",
    "ModelSignature",
    "answer_with_gates",
    "dyvte_exit",
    "GateFeatureBuilder",
    "HISTORY_INPUTS",
    "feature_size",
    "gate_features",
    "history_of",
    "recorded_kind",
    "gate_parameters",
    "gate_recording",
]
