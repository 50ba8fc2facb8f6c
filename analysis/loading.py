"""Loading checkpoints, named models, and the provenance written beside every result.

:func:`load_model` loads any supported image-text checkpoint (a hub id or a local folder) with its
processor through ``from_pretrained``. Short names such as ``"demo"`` resolve through
:data:`NAMED_MODELS`, a registry of ``name -> "module:function"`` references: the function returns
the folder to load (building it first if needed) and is imported only when its name is asked for,
so the loader never imports the code behind a name. :func:`register_model_name` adds a name.
:func:`provenance` says what produced a file: model, library versions, git revision, attention
path, dtype, seed.
"""

from __future__ import annotations

import functools
import importlib
import platform
import subprocess
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import analysis
from analysis.adapters import resolve_adapter
from analysis.attention import attention_path
from analysis.errors import UsageError
from analysis.options import DTYPE_CHOICES

__all__ = [
    "DTYPES",
    "NAMED_MODELS",
    "ProcessorUnavailableError",
    "VIDEO_PROCESSOR_FOR_IMAGES",
    "check_device",
    "check_loadable",
    "decoder_depth",
    "family_processor_class",
    "git_revision",
    "images_only_processor_class",
    "load_model",
    "load_processor",
    "provenance",
    "read_config",
    "register_model_name",
    "resolve_model_name",
    "torchvision_available",
]

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPE_CHOICES}
"""The torch dtype of each ``--dtype`` / ``dtype=`` choice; the first is the default."""

NAMED_MODELS: dict[str, str | Callable[[], Path]] = {
    "demo": "analysis.demo.model:demo_model_folder",
}
"""Model names that resolve to a folder: ``name -> "module:function"`` (imported on first use) or a
callable; the function returns the checkpoint folder, building it if needed."""


def register_model_name(name: str, resolver: str | Callable[[], Path]) -> None:
    """Make ``name`` usable wherever a model id is (``--model name``, ``load_model(name)``).

    Args:
        name: the short name; it shadows a hub id or folder of the same name.
        resolver: a callable returning the checkpoint folder, or ``"module:function"`` naming one.
    """
    if isinstance(resolver, str) and ":" not in resolver:
        raise UsageError(f"expected a resolver as 'module:function', found {resolver!r}")
    NAMED_MODELS[name] = resolver


def resolve_model_name(model_id: str | Path) -> str | Path:
    """The folder a registered model name stands for (built on first use); any other id unchanged."""
    resolver = NAMED_MODELS.get(str(model_id))
    if resolver is None:
        return model_id
    if isinstance(resolver, str):
        module, function = resolver.split(":")
        resolver = getattr(importlib.import_module(module), function)
    return resolver()


def read_config(model_id: str | Path) -> Any:
    """The config of a checkpoint (hub id, folder or registered name), without reading its weights.

    Raises:
        UsageError: there is no readable config at ``model_id``.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(resolve_model_name(model_id))
    except (OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(
            f"expected --model to name a checkpoint (hub id, folder or registered name), found {str(model_id)!r}: {reason}"
        ) from error


def check_device(device: str) -> None:
    """Raise UsageError unless torch can place tensors on ``device`` (cpu, cuda, cuda:N, mps)."""
    try:
        place = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UsageError(f"expected --device to be cpu, cuda, cuda:N or mps, found {device!r} ({error})") from None
    if place.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise UsageError(f"expected a CUDA device for --device {device}, found none (torch {torch.__version__}, {build})")
        if place.index is not None and place.index >= torch.cuda.device_count():
            raise UsageError(f"expected --device {device} among {torch.cuda.device_count()} CUDA device(s), found no such index")
    elif place.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"expected an MPS device for --device {device}, found none")


def check_loadable(model_id: str | Path, device: str = "cpu") -> Any:
    """Everything about loading a checkpoint that can fail before its weights are read: the device,
    the config (hub id, folder or registered name) and the family. Returns the config.

    Raises:
        UsageError: the device is not there, or there is no readable config at ``model_id``.
        UnsupportedModelError: the checkpoint's family is not in the adapter table, or its config
            holds a setting the family's adapter refuses.
    """
    check_device(device)
    config = read_config(model_id)
    resolve_adapter(config.model_type).check_settings(config)
    return config


def decoder_depth(model_id: str | Path) -> int:
    """The number of text-decoder layers of a checkpoint, read from its config (no weights).

    Raises:
        UsageError: no config at ``model_id``. UnsupportedModelError: a family the toolkit lacks.
    """
    config = read_config(model_id)
    return int(resolve_adapter(config.model_type).text_config(config).num_hidden_layers)


def load_model(
    model_id: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    attention: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a supported image-text model and its processor with ``from_pretrained``.

    The family is checked from the config before any weights are read, so an unsupported model
    fails in a second with the list of supported families. A registered name (``"demo"``, see
    :data:`NAMED_MODELS`) resolves to its folder first, which then loads like any checkpoint.

    Raises:
        UsageError: ``dtype`` or ``attention`` is not one of the choices.
        UnsupportedModelError: the checkpoint's family is not in the adapter table.
    """
    from transformers import AutoModelForImageTextToText

    if dtype not in DTYPES:
        raise UsageError(f"expected dtype to be one of {list(DTYPES)}, found {dtype!r}")
    path = attention_path(attention)
    model_id = resolve_model_name(model_id)
    config = check_loadable(model_id, device)
    adapter = resolve_adapter(config.model_type)
    processor = load_processor(model_id, config)  # before the weights: a processor that cannot load fails in a second
    model = AutoModelForImageTextToText.from_pretrained(
        model_id, dtype=DTYPES[dtype], attn_implementation=path.load_implementation
    )
    adapter.image_token_id(model)
    return model.to(device).eval(), processor


class ProcessorUnavailableError(UsageError):
    """The checkpoint's processor cannot be built or loaded here: it needs a package that is not installed."""


VIDEO_PROCESSOR_FOR_IMAGES: dict[str, str] = {
    "SmolVLMProcessor": "its chat template reads the video processor's frame settings even for images",
}
"""Processor classes that need their video processor (so torchvision) for images too, with the reason."""


def torchvision_available() -> bool:
    """Whether torchvision imports (transformers' video processors need it; the image processors used
    here have PIL versions that do not)."""
    from transformers.utils import is_torchvision_available

    return bool(is_torchvision_available())


@functools.cache
def images_only_processor_class(processor_class: type) -> type:
    """``processor_class`` without its video processor: same name, same behaviour on images.

    The processors of the video-capable families (Qwen-VL, GLM-4V, InternVL, LLaVA-OneVision, ...)
    take a video processor, and transformers' video processors need torchvision, so without it such
    a processor can be neither built nor loaded. The toolkit reads images only; this subclass leaves
    the video processor out of the processor's parts (``ProcessorMixin.get_attributes``), so it
    builds, saves and loads from the image processor, tokenizer and chat template. Passing
    ``videos=`` to it is not supported. No class is changed: the subclass is made once per class.
    """
    if "video_processor" not in processor_class.get_attributes():
        return processor_class

    from transformers.processing_utils import ProcessorMixin

    class WithoutVideoProcessor(ProcessorMixin):
        # Next after processor_class in the subclass's method order, so it also catches the classes
        # whose __init__ hands video_processor on to ProcessorMixin by name (Gemma4Processor does).
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("video_processor", None)
            super().__init__(*args, **kwargs)

    def get_attributes(cls: type) -> list[str]:
        return [name for name in processor_class.get_attributes() if name != "video_processor"]

    def from_args_and_dict(cls: type, args: Any, processor_dict: dict[str, Any], **kwargs: Any) -> Any:
        # from_pretrained builds it here; some classes take video_processor without a default. (Not an
        # __init__ override: transformers reads the parameters from __init__'s code object.)
        return processor_class.from_args_and_dict.__func__(cls, args, processor_dict, **{"video_processor": None, **kwargs})

    return type(processor_class.__name__, (processor_class, WithoutVideoProcessor), {
        "get_attributes": classmethod(get_attributes),
        "from_args_and_dict": classmethod(from_args_and_dict),
        "__module__": processor_class.__module__,
        "__doc__": f"{processor_class.__name__} for images only (no video processor; torchvision is not installed).",
    })


def family_processor_class(model_type: str) -> type | None:
    """The processor class transformers pairs with ``model_type`` (None: none registered), images only
    (:func:`images_only_processor_class`) where torchvision is missing."""
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES, processor_class_from_name

    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    try:
        processor_class = processor_class_from_name(name) if name else None
    except ImportError as error:
        raise ProcessorUnavailableError(f"expected the {model_type} processor to load, found it needs a package that is "
                                        f"not installed: {_first_line(error)}") from error
    if processor_class is None or torchvision_available():
        return processor_class
    if processor_class.__name__ in VIDEO_PROCESSOR_FOR_IMAGES:
        raise ProcessorUnavailableError(f"expected the {model_type} processor to load, found {processor_class.__name__} "
                                        f"needs torchvision, which is not installed: "
                                        f"{VIDEO_PROCESSOR_FOR_IMAGES[processor_class.__name__]}")
    return images_only_processor_class(processor_class)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_processor(model_id: str | Path, config: Any = None) -> Any:
    """The checkpoint's processor (``AutoProcessor.from_pretrained``), left padding; images only where
    torchvision is missing and the family's processor takes a video processor.

    Raises:
        ProcessorUnavailableError (a UsageError): the processor needs a package that is not installed
            (one line, naming it).
    """
    from transformers import AutoProcessor
    from transformers.models.auto.processing_auto import processor_class_from_name

    model_id = resolve_model_name(model_id)
    config = config if config is not None else read_config(model_id)
    try:
        processor_class = family_processor_class(config.model_type)
        if processor_class is None or processor_class is processor_class_from_name(processor_class.__name__):
            processor_class = AutoProcessor  # the checkpoint's own choice, as from_pretrained makes it
        processor = processor_class.from_pretrained(model_id)
    except ImportError as error:
        raise ProcessorUnavailableError(f"expected the processor of {str(model_id)!r} to load, found it needs a package "
                                        f"that is not installed: {_first_line(error)}") from error
    processor.tokenizer.padding_side = "left"
    return processor


def git_revision() -> str | None:
    """The git revision of the toolkit's checkout, or None outside a checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def statistics_kernel(attention: str, device: torch.device | str) -> str:
    """How the statistics of a recording on ``attention`` and ``device`` are computed by default:
    the fused kernel (``analysis.stats.fused_kernel_name``), the recomputed fast path, or eager weights."""
    from analysis.recorder import RECOMPUTED
    from analysis.stats import fused_kernel_name

    if attention_path(attention).hook_kind != "attention_observer":
        return "eager: the weights each self_attn returns"
    return fused_kernel_name(device) or RECOMPUTED


WEIGHTS_HASH_LIMIT = 4 << 30
"""Weight files of a local folder are hashed for provenance up to this many bytes in all."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_hashed: dict[tuple[str, int, int], str] = {}


def weights_sha256(model_id: str | Path) -> dict[str, str]:
    """sha256 of each weight file of the folder ``model_id`` (or registered name) stands for, by
    file name; a hub id gives ``{"hub": id}`` and a folder whose weights exceed
    ``WEIGHTS_HASH_LIMIT`` gives ``{"not hashed": "<size> bytes"}``. Hashes are kept for the
    process, keyed by path, size and modification time."""
    import hashlib

    folder = Path(resolve_model_name(model_id))
    if not folder.is_dir():
        return {"hub": str(model_id)}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    total = sum(p.stat().st_size for p in files)
    if total > WEIGHTS_HASH_LIMIT:
        return {"not hashed": f"{total} bytes"}
    found = {}
    for path in files:
        key = (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns)
        if key not in _hashed:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 22), b""):
                    digest.update(chunk)
            _hashed[key] = digest.hexdigest()
        found[path.name] = _hashed[key]
    return found


def provenance(model_id: str, model: Any, attention: str, heads: str, seed: int) -> dict[str, Any]:
    """What produced a file: model, library versions, git revision, attention path, dtype, seed, and the
    decoder layers that have no attention map (so no statistics rows: a hybrid decoder's recurrent layers)."""
    import pyarrow
    import transformers

    return {
        "model": str(model_id),
        "weights_sha256": weights_sha256(model_id),
        "model_type": model.config.model_type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "device": str(next(model.parameters()).device),
        "attention_path": attention,
        "attention_path_description": attention_path(attention).description,
        "statistics_kernel": statistics_kernel(attention, next(model.parameters()).device),
        # A hybrid decoder's recurrent layers have no attention map: the statistics have no rows for them.
        "layers_without_attention": resolve_adapter(model).recurrent_layers(model),
        "heads": heads,
        "seed": seed,
        "dyvte_version": analysis.__version__,
        "git_revision": git_revision(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pyarrow": pyarrow.__version__,
        "python": platform.python_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
