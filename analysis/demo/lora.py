"""Low-rank adapters (LoRA) for the demo LLaVA's decoder, and the weights file they are saved to.

The adapters are written here with forward hooks, without ``peft``: :class:`LoraAdapters` holds
the factors, and ``with adapters.applied(model):`` attaches one forward hook per adapted linear
layer through :func:`analysis.hooks.attached` (every path checked first, all hooks removed on
exit), so the model's classes and weights are never changed while training.

The weights file (:func:`save_demo_weights`) is one small safetensors file: the projector's
weights and, per adapted linear layer, the two low-rank factors whose product is *added* to that
layer's weight when the model is loaded (:func:`analysis.demo.model.apply_demo_weights`), so the
loaded model is a stock ``LlavaForConditionalGeneration``. :func:`restore_demo_weights` reads
such a file back into a projector and adapters, to continue training from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from analysis.demo.inputs import PROJECTOR_PATH
from analysis.hooks import Hook, attached
from analysis.io import AtomicFile

__all__ = [
    "LORA_PREFIX",
    "LORA_TARGETS",
    "LoraAdapters",
    "PROJECTOR_PREFIX",
    "WEIGHTS_FORMAT",
    "restore_demo_weights",
    "save_demo_weights",
]

LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Linear layers of each decoder layer that get a low-rank adapter (by attribute name)."""

WEIGHTS_FORMAT = "dyvte-demo-weights/1"
PROJECTOR_PREFIX = PROJECTOR_PATH + "."
LORA_PREFIX = "lora."
"""Key prefix of the adapter factors: ``lora.<module path>.A`` (rank x in) and ``.B`` (out x rank, scale folded in)."""


class LoraAdapters(nn.Module):
    """Low-rank adapters on the decoder's linear layers: ``y = W x + scale * B (A x)``.

    The adapters live in this module, not in the model: :meth:`applied` attaches one forward
    hook per adapted linear layer for the duration of a block, so the model's classes and
    weights are never changed. :meth:`deltas` gives the factors to merge. ``B`` starts at zero,
    so attaching fresh adapters leaves the outputs unchanged.
    """

    def __init__(self, model: nn.Module, rank: int = 8, alpha: float = 16.0,
                 targets: Sequence[str] = LORA_TARGETS, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"expected rank >= 1, found {rank}")
        self.rank, self.alpha, self.scale = rank, float(alpha), float(alpha) / rank
        decoder = model.get_decoder()
        prefix = _module_path(model, decoder)
        self.paths: list[str] = []
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        for index, layer in enumerate(decoder.layers):
            for name, module in layer.named_modules():
                if name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
                    self.paths.append(f"{prefix}.layers.{index}.{name}")
                    a = torch.empty(rank, module.in_features)
                    bound = 1.0 / math.sqrt(module.in_features)
                    a.uniform_(-bound, bound, generator=generator)
                    self.A.append(nn.Parameter(a))
                    self.B.append(nn.Parameter(torch.zeros(module.out_features, rank)))
        if not self.paths:
            raise ValueError(f"found no nn.Linear named {tuple(targets)} in the decoder layers")

    def lora_hooks(self) -> list[Hook]:
        """One forward hook per adapted linear layer, adding ``scale * B (A x)`` to its output."""
        return [Hook(path, self._hook(a, b)) for path, a, b in zip(self.paths, self.A, self.B)]

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[LoraAdapters]:
        """Attach the adapters to ``model`` for the duration of the block (always removed after).

        Raises:
            KeyError: an adapted path names no module of ``model`` (checked before attaching).
        """
        with attached(model, self.lora_hooks()):
            yield self

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        scale = self.scale

        def lora_hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            x = args[0]
            return output + (x @ a.to(x.dtype).t()) @ (b.to(x.dtype).t() * scale)

        return lora_hook

    @torch.no_grad()
    def load_factors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set A and B from a weights file's "lora.<path>.A" / ".B" (scale folded into B) keys."""
        for path, a, b in zip(self.paths, self.A, self.B):
            a.copy_(tensors[f"{LORA_PREFIX}{path}.A"])
            b.copy_(tensors[f"{LORA_PREFIX}{path}.B"] / self.scale)

    def deltas(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module path -> (A, scale * B), detached fp32: the weight grows by ``(scale * B) @ A``."""
        return {path: (a.detach().float().clone(), (b.detach().float() * self.scale).clone())
                for path, a, b in zip(self.paths, self.A, self.B)}


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is target:
            return name
    raise ValueError(f"{type(target).__name__} is not a sub-module of {type(model).__name__}")


def save_demo_weights(path: str | Path, model: nn.Module, adapters: LoraAdapters | None,
                      metadata: dict[str, Any] | None = None) -> Path:
    """Write the projector and the adapters' factors (fp32) to one safetensors file.

    Keys: ``model.multi_modal_projector.*`` and ``lora.<module path>.A`` / ``.B``; the
    safetensors metadata holds the format tag and ``metadata`` (JSON-encoded values). The file
    is written under a hidden partial name and renamed when complete (:class:`analysis.io.AtomicFile`),
    so a checkpoint interrupted mid-write never replaces the previous one.
    """
    from safetensors.torch import save_file

    tensors = {PROJECTOR_PREFIX + k: v.detach().float().contiguous().clone()
               for k, v in model.model.multi_modal_projector.state_dict().items()}
    if adapters is not None:
        for module_path, (a, b) in adapters.deltas().items():
            tensors[f"{LORA_PREFIX}{module_path}.A"] = a.contiguous()
            tensors[f"{LORA_PREFIX}{module_path}.B"] = b.contiguous()
    meta = {"format": WEIGHTS_FORMAT}
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFile(path) as file:
        save_file(tensors, str(file.partial), metadata=meta)
    return file.path


def restore_demo_weights(path: str | Path, model: nn.Module, adapters: LoraAdapters | None) -> None:
    """Set the projector (strictly) and, if given, the adapters' factors from a weights file
    written by :func:`save_demo_weights`: the start of a training run that continues from it."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    model.model.multi_modal_projector.load_state_dict(
        {k[len(PROJECTOR_PREFIX):]: v for k, v in tensors.items() if k.startswith(PROJECTOR_PREFIX)}, strict=True)
    if adapters is not None:
        adapters.load_factors(tensors)
