"""ShapesVQA: a small, seeded synthetic VQA benchmark of coloured shapes.

Every image (default 336 x 336, the input size of LLaVA-1.5's CLIP encoder) has a white or
light-grey background and one to four non-overlapping shapes. A shape is a ``circle``, ``square``
or (upward) ``triangle``, in one of six colours (exact RGB in :data:`COLOURS`) and one of two
sizes (``small`` / ``large``: the side of its bounding square is a fixed fraction of the image
side, :data:`SIZE_FRACTIONS`), at a random position. Shapes' bounding squares keep a gap
(:data:`GAP_FRACTION`) from each other and from the border, so no shape touches another.

Questions have short exact answers (one lowercase word or a number written in digits) and a
``category`` (the question type, :data:`QUESTION_TYPES`):

==========  ==========================================================  ====================
category    text (before the answer instruction)                        answer
==========  ==========================================================  ====================
colour      What colour is the <shape>?   (that shape occurs once)      red, green, ...
shape       What shape is the <colour> object?   (that colour once)     circle, square, ...
size        Is the <colour> <shape> small or large?   (pair occurs once) small, large
count       How many shapes / <colour> shapes / <shape>s are there?      1, 2, 3, 4
position    Is the <colour> <shape> in the left or the right half of    left, right, top,
            the image? / ... top or the bottom half ...?                 bottom
exists      Is there a <colour> <shape> in the image?                   yes, no
==========  ==========================================================  ====================

A question is only asked when it is unambiguous: the object it names is the only one with that
description, and for ``position`` its centre lies more than ``max(POSITION_MARGIN * side,
extent / 2)`` from the middle line, so the whole shape lies in one half and clearly away from
the middle. ``exists`` answers alternate yes/no over a split (balanced within one question);
"no" questions prefer a pair that shares its colour or its shape with a drawn object. Each
question text ends with an instruction (:data:`ONE_WORD` or, for counts, :data:`ONE_NUMBER`).

A split folder (``write_split``) holds::

    <out_dir>/<split>/images/000000.png ...   the images
    <out_dir>/<split>/questions.jsonl         LLaVA question file: question_id, image, text, answer, category
    <out_dir>/<split>/answers.jsonl           question_id, answer, category
    <out_dir>/<split>/scenes.jsonl            per image: background and every shape's colour, shape, size, bbox
    <out_dir>/<split>/COMPLETE                written last: the parameters the split was made with

Image paths in ``questions.jsonl`` are relative to the split folder, so the split folder is the
image folder (``dyvte-stats dump --questions <split>/questions.jsonl --image-folder <split>``).

Determinism: image ``i`` of a split with seed ``s`` is drawn from its own ``random.Random``
seeded with the string ``"shapesvqa:{s}:{i}"`` (string seeds are hashed with SHA-512, stable
across processes and Python versions), and only ``Random.random()`` is used (its sequence is
guaranteed stable across Python versions; integers and choices are derived from it here). PNGs
are written by Pillow without metadata, so the same seed gives byte-identical files with the
same Pillow/zlib build. The fixed splits (:data:`SPLITS`) use distinct seeds; positions are
drawn at pixel resolution, so an identical scene in two splits is vanishingly unlikely (the
tests check that none of the fixed splits' scenes repeats).

Typical use::

    from analysis.demo.shapes import ensure_split
    from analysis.scoring import accuracy_by_type
    from analysis.data import read_questions

    folder = ensure_split("data/shapesvqa", "val")          # generates once, then reuses
    questions = read_questions(folder / "questions.jsonl")
    scores = accuracy_by_type({q.question_id: predict(q) for q in questions}, questions)
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageDraw

FORMAT_VERSION = 1
DEFAULT_IMAGE_SIZE = 336

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
"""Shape colours: name -> exact RGB fill."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_FRACTIONS: dict[str, float] = {"small": 0.15, "large": 0.27}
"""Side of a shape's bounding square as a fraction of the image side (50 and 91 px at 336)."""

BACKGROUNDS: tuple[tuple[int, int, int], ...] = ((255, 255, 255), (245, 245, 245), (238, 238, 232), (232, 238, 244))
"""Background RGB: white or light grey tints."""

MIN_SHAPES, MAX_SHAPES = 1, 4
GAP_FRACTION = 0.03
"""Minimum gap between shapes' bounding squares, and from the border, as a fraction of the side."""
POSITION_MARGIN = 0.1
"""A position question needs the centre this far (fraction of the side) from the middle line."""

QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "size", "count", "position", "exists")
ONE_WORD = "Answer with one word."
ONE_NUMBER = "Answer with a number."

SPLITS: dict[str, tuple[int, int]] = {
    "train": (4000, 1001),
    "val": (200, 2002),
    "test": (200, 3003),
}
"""The fixed splits: name -> (number of images, seed)."""

QUESTIONS_FILE = "questions.jsonl"
ANSWERS_FILE = "answers.jsonl"
SCENES_FILE = "scenes.jsonl"
IMAGES_DIR = "images"
MARKER_FILE = "COMPLETE"

_T = TypeVar("_T")


# --------------------------------------------------------------------------- random helpers
# Only Random.random() is used: its sequence for a given seed is stable across Python versions,
# unlike randrange/choice/shuffle, whose algorithms may change.


def _randint(rng: random.Random, low: int, high: int) -> int:
    """A uniform integer in [low, high]."""
    return low + min(int(rng.random() * (high - low + 1)), high - low)


def _choice(rng: random.Random, items: Sequence[_T]) -> _T:
    if not items:
        raise ValueError("cannot choose from an empty sequence")
    return items[_randint(rng, 0, len(items) - 1)]


def _shuffled(rng: random.Random, items: Iterable[_T]) -> list[_T]:
    """A Fisher-Yates shuffled copy."""
    result = list(items)
    for i in range(len(result) - 1, 0, -1):
        j = _randint(rng, 0, i)
        result[i], result[j] = result[j], result[i]
    return result


def image_rng(seed: int, index: int) -> random.Random:
    """The generator of image ``index`` of a split with ``seed`` (scene first, then its questions)."""
    return random.Random(f"shapesvqa:{seed}:{index}")


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; its bounding square is ``[x0, x0 + extent) x [y0, y0 + extent)`` in pixels."""

    colour: str
    shape: str
    size: str
    x0: int
    y0: int
    extent: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1), x1 and y1 exclusive."""
        return (self.x0, self.y0, self.x0 + self.extent, self.y0 + self.extent)

    @property
    def centre(self) -> tuple[float, float]:
        """Centre of the bounding square (x, y), in pixels from the top-left corner."""
        return (self.x0 + self.extent / 2, self.y0 + self.extent / 2)

    @property
    def name(self) -> str:
        """"<colour> <shape>", e.g. "red circle"."""
        return f"{self.colour} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.shape, "size": self.size, "bbox": list(self.bbox)}

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> SceneObject:
        x0, y0, x1, y1 = (int(v) for v in entry["bbox"])
        if x1 - x0 != y1 - y0:
            raise ValueError(f"expected a square bbox, found {entry['bbox']}")
        return cls(str(entry["colour"]), str(entry["shape"]), str(entry["size"]), x0, y0, x1 - x0)


@dataclass(frozen=True)
class Scene:
    """What one image shows: its side, background and shapes (in drawing order)."""

    image_size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "background": list(self.background),
            "objects": [o.to_dict() for o in self.objects],
        }

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Scene:
        r, g, b = (int(v) for v in entry["background"])
        return cls(int(entry["image_size"]), (r, g, b), tuple(SceneObject.from_dict(o) for o in entry["objects"]))


def _separated(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    """True when the half-open boxes a and b are at least ``gap`` pixels apart on some axis."""
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def generate_scene(rng: random.Random, image_size: int = DEFAULT_IMAGE_SIZE) -> Scene:
    """Draw a scene: a background and 1-4 non-overlapping shapes at random positions.

    Raises:
        ValueError: ``image_size`` is too small to hold four large shapes.
    """
    gap = max(1, round(GAP_FRACTION * image_size))
    extents = {size: max(3, round(fraction * image_size)) for size, fraction in SIZE_FRACTIONS.items()}
    if 2 * extents["large"] + 3 * gap > image_size:
        raise ValueError(f"expected an image size of at least 64 pixels, found {image_size}")
    background = _choice(rng, BACKGROUNDS)
    count = _randint(rng, MIN_SHAPES, MAX_SHAPES)
    while True:  # a rare dead end (no room left for the next shape) starts the placement over
        objects: list[SceneObject] = []
        for _ in range(count):
            colour = _choice(rng, tuple(COLOURS))
            shape = _choice(rng, SHAPES)
            size = _choice(rng, SIZES)
            extent = extents[size]
            for _attempt in range(200):
                x0 = _randint(rng, gap, image_size - gap - extent)
                y0 = _randint(rng, gap, image_size - gap - extent)
                candidate = SceneObject(colour, shape, size, x0, y0, extent)
                if all(_separated(candidate.bbox, other.bbox, gap) for other in objects):
                    objects.append(candidate)
                    break
            else:
                break
        if len(objects) == count:
            return Scene(image_size, background, tuple(objects))


def scene_for(seed: int, index: int, image_size: int = DEFAULT_IMAGE_SIZE) -> Scene:
    """The scene of image ``index`` of a split generated with ``seed`` (as ``write_split`` draws it)."""
    return generate_scene(image_rng(seed, index), image_size)


def render_scene(scene: Scene) -> Image.Image:
    """Draw a scene as an RGB image (no anti-aliasing: every shape pixel has its exact colour)."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), scene.background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        elif obj.shape == "triangle":
            draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
        else:
            raise ValueError(f"expected a shape in {SHAPES}, found {obj.shape!r}")
    return image


# --------------------------------------------------------------------------- questions


def horizontal_side(obj: SceneObject, image_size: int) -> str | None:
    """"left" or "right" when the object is clearly in that half of the image, else None."""
    return _side(obj.centre[0], obj.extent, image_size, ("left", "right"))


def vertical_side(obj: SceneObject, image_size: int) -> str | None:
    """"top" or "bottom" when the object is clearly in that half of the image, else None."""
    return _side(obj.centre[1], obj.extent, image_size, ("top", "bottom"))


def _side(centre: float, extent: int, image_size: int, names: tuple[str, str]) -> str | None:
    offset = centre - image_size / 2
    if abs(offset) <= max(POSITION_MARGIN * image_size, extent / 2):
        return None
    return names[0] if offset < 0 else names[1]


def _plural(shape: str) -> str:
    return shape + "s"


def _ask_colour(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    shape_counts = Counter(o.shape for o in scene.objects)
    unique = [o for o in scene.objects if shape_counts[o.shape] == 1]
    if not unique:
        return None
    obj = _choice(rng, unique)
    return f"What colour is the {obj.shape}? {ONE_WORD}", obj.colour


def _ask_shape(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    colour_counts = Counter(o.colour for o in scene.objects)
    unique = [o for o in scene.objects if colour_counts[o.colour] == 1]
    if not unique:
        return None
    obj = _choice(rng, unique)
    return f"What shape is the {obj.colour} object? {ONE_WORD}", obj.shape


def _unique_pairs(objects: Sequence[SceneObject]) -> list[SceneObject]:
    """The objects whose (colour, shape) pair occurs once in the scene, in drawing order."""
    pair_counts = Counter((o.colour, o.shape) for o in objects)
    return [o for o in objects if pair_counts[(o.colour, o.shape)] == 1]


def _ask_size(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    unique_pairs = _unique_pairs(scene.objects)
    if not unique_pairs:
        return None
    obj = _choice(rng, unique_pairs)
    return f"Is the {obj.name} small or large? {ONE_WORD}", obj.size


def _ask_count(scene: Scene, rng: random.Random) -> tuple[str, str]:
    objects = scene.objects
    shape_counts = Counter(o.shape for o in objects)
    colour_counts = Counter(o.colour for o in objects)
    variant = _choice(rng, ("all", "colour", "shape"))
    if variant == "all":
        return f"How many shapes are there? {ONE_NUMBER}", str(len(objects))
    if variant == "colour":
        colour = _choice(rng, sorted(colour_counts, key=tuple(COLOURS).index))
        return f"How many {colour} shapes are there? {ONE_NUMBER}", str(colour_counts[colour])
    shape = _choice(rng, sorted(shape_counts, key=SHAPES.index))
    return f"How many {_plural(shape)} are there? {ONE_NUMBER}", str(shape_counts[shape])


def _ask_position(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    options: list[tuple[str, str]] = []
    for obj in _unique_pairs(scene.objects):
        horizontal = horizontal_side(obj, scene.image_size)
        if horizontal is not None:
            options.append((f"Is the {obj.name} in the left or the right half of the image? {ONE_WORD}", horizontal))
        vertical = vertical_side(obj, scene.image_size)
        if vertical is not None:
            options.append((f"Is the {obj.name} in the top or the bottom half of the image? {ONE_WORD}", vertical))
    return _choice(rng, options) if options else None


def _ask_exists(scene: Scene, rng: random.Random, exists_answer: str) -> tuple[str, str]:
    objects = scene.objects
    if exists_answer == "yes":
        obj = _choice(rng, objects)
        colour, shape = obj.colour, obj.shape
    elif exists_answer == "no":
        pair_counts = Counter((o.colour, o.shape) for o in objects)
        colour_counts = Counter(o.colour for o in objects)
        shape_counts = Counter(o.shape for o in objects)
        absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in pair_counts]
        near = [(c, s) for c, s in absent if c in colour_counts or s in shape_counts]
        colour, shape = _choice(rng, near or absent)
    else:
        raise ValueError(f"expected exists_answer 'yes' or 'no', found {exists_answer!r}")
    return f"Is there a {colour} {shape} in the image? {ONE_WORD}", exists_answer


_ASKERS = {"colour": _ask_colour, "shape": _ask_shape, "size": _ask_size, "count": _ask_count,
           "position": _ask_position}
"""The question makers of every type but "exists" (which also takes the wanted answer)."""


def ask(scene: Scene, category: str, rng: random.Random, exists_answer: str = "yes") -> tuple[str, str] | None:
    """One question of ``category`` about ``scene``: (text with instruction, answer), or None.

    None means no unambiguous question of that type exists for this scene. ``exists_answer``
    ("yes" or "no") fixes the answer of an "exists" question.

    Raises:
        ValueError: unknown category or exists_answer.
    """
    if category == "exists":
        return _ask_exists(scene, rng, exists_answer)
    if category not in _ASKERS:
        raise ValueError(f"expected a category in {QUESTION_TYPES}, found {category!r}")
    return _ASKERS[category](scene, rng)


def image_questions(
    scene: Scene,
    rng: random.Random,
    image_index: int,
    questions_per_image: int,
    exists_answer: str,
) -> list[tuple[str, str, str]]:
    """Up to ``questions_per_image`` questions of distinct types: (category, text, answer).

    Types are tried in :data:`QUESTION_TYPES` order rotated by ``image_index`` (so that, with
    fewer questions than types, every type gets its share); a type without an unambiguous
    question for this scene is skipped.
    """
    start = image_index % len(QUESTION_TYPES)
    order = QUESTION_TYPES[start:] + QUESTION_TYPES[:start]
    result: list[tuple[str, str, str]] = []
    for category in order:
        if len(result) >= questions_per_image:
            break
        asked = ask(scene, category, rng, exists_answer=exists_answer)
        if asked is not None:
            result.append((category, asked[0], asked[1]))
    return result


# --------------------------------------------------------------------------- split files


def _marker(split: str, n_images: int, seed: int, image_size: int, questions_per_image: int) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "split": split,
        "n_images": n_images,
        "seed": seed,
        "image_size": image_size,
        "questions_per_image": questions_per_image,
    }


def _jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=True) + "\n")


def _check_split_arguments(split: str, n_images: int, questions_per_image: int) -> None:
    if n_images < 1:
        raise ValueError(f"expected n_images >= 1, found {n_images}")
    if not 1 <= questions_per_image <= len(QUESTION_TYPES):
        raise ValueError(f"expected questions_per_image in 1..{len(QUESTION_TYPES)}, found {questions_per_image}")
    if not split or split in (".", "..") or "/" in split or "\\" in split:
        raise ValueError(f"expected a split name without path separators, found {split!r}")


def _prepare_split_folder(folder: Path, names: Sequence[str]) -> None:
    """Create ``folder/images``, remove the completed-marker and any image not among ``names``."""
    images_dir = folder / IMAGES_DIR
    images_dir.mkdir(parents=True, exist_ok=True)
    (folder / MARKER_FILE).unlink(missing_ok=True)
    keep = {Path(n).name for n in names}
    for stale in images_dir.glob("*.png"):
        if stale.name not in keep:
            stale.unlink()


def _draw_split(folder: Path, split: str, names: Sequence[str], width: int, seed: int, image_size: int,
                questions_per_image: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Draw, render and save every image of a split; return its scene rows and question rows.

    ``width`` is the number of digits of the image numbers in the question ids. ``exists``
    answers alternate yes/no over the whole split, in the order the questions are drawn.
    """
    questions: list[dict[str, Any]] = []
    scenes: list[dict[str, Any]] = []
    exists_asked = 0
    for index, name in enumerate(names):
        rng = image_rng(seed, index)
        scene = generate_scene(rng, image_size)
        render_scene(scene).save(folder / name, format="PNG", optimize=False, compress_level=6)
        scenes.append({"image": name, **scene.to_dict()})
        exists_answer = "yes" if exists_asked % 2 == 0 else "no"
        for number, (category, text, answer) in enumerate(
            image_questions(scene, rng, index, questions_per_image, exists_answer)
        ):
            exists_asked += category == "exists"
            questions.append(
                {
                    "question_id": f"{split}-{index:0{width}d}-{number}",
                    "image": name,
                    "text": text,
                    "answer": answer,
                    "category": category,
                }
            )
    return scenes, questions


def write_split(
    out_dir: str | Path,
    split: str,
    n_images: int,
    seed: int,
    image_size: int = DEFAULT_IMAGE_SIZE,
    questions_per_image: int = len(QUESTION_TYPES),
) -> Path:
    """Generate a split into ``out_dir/split`` and return that folder (also the image folder).

    Overwrites an earlier split of that name: the completed-marker is removed first and
    written last, and stale ``images/*.png`` from a larger earlier split are removed.
    Deterministic: the same arguments give byte-identical files.

    Raises:
        ValueError: ``n_images`` < 1, ``questions_per_image`` outside 1..len(QUESTION_TYPES),
            or an unusable ``split`` name or ``image_size``.
    """
    _check_split_arguments(split, n_images, questions_per_image)
    folder = Path(out_dir) / split
    width = max(6, len(str(n_images - 1)))
    names = [f"{IMAGES_DIR}/{i:0{width}d}.png" for i in range(n_images)]
    _prepare_split_folder(folder, names)
    scenes, questions = _draw_split(folder, split, names, width, seed, image_size, questions_per_image)
    _jsonl(folder / SCENES_FILE, scenes)
    _jsonl(folder / QUESTIONS_FILE, questions)
    _jsonl(folder / ANSWERS_FILE, ({k: q[k] for k in ("question_id", "answer", "category")} for q in questions))
    marker = _marker(split, n_images, seed, image_size, questions_per_image) | {"questions": len(questions)}
    (folder / MARKER_FILE).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def is_complete(folder: str | Path, expected: Mapping[str, Any] | None = None) -> bool:
    """True when ``folder`` holds a finished split (its marker exists and, if given, matches ``expected``)."""
    folder = Path(folder)
    marker = folder / MARKER_FILE
    if not marker.is_file() or not (folder / QUESTIONS_FILE).is_file():
        return False
    if expected is None:
        return True
    try:
        found = json.loads(marker.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(found, dict) and all(found.get(k) == v for k, v in expected.items())


def ensure_split(
    root: str | Path,
    split: str,
    image_size: int = DEFAULT_IMAGE_SIZE,
    questions_per_image: int = len(QUESTION_TYPES),
) -> Path:
    """The folder of fixed split ``split`` (see :data:`SPLITS`) under ``root``, generated only if missing.

    A split whose marker is missing (half-written) or records other parameters is regenerated.

    Raises:
        KeyError: ``split`` is not one of :data:`SPLITS`.
    """
    if split not in SPLITS:
        raise KeyError(f"expected a split in {sorted(SPLITS)}, found {split!r}")
    n_images, seed = SPLITS[split]
    folder = Path(root) / split
    if is_complete(folder, _marker(split, n_images, seed, image_size, questions_per_image)):
        return folder
    return write_split(root, split, n_images, seed, image_size, questions_per_image)


def read_scenes(folder: str | Path) -> dict[str, Scene]:
    """The scenes of a split folder, keyed by image path (as in the question file's ``image``)."""
    path = Path(folder) / SCENES_FILE
    scenes: dict[str, Scene] = {}
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                entry = json.loads(line)
                scenes[entry["image"]] = Scene.from_dict(entry)
    return scenes


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m analysis.demo.shapes --root DIR [--split val ...]``: make sure splits exist."""
    parser = argparse.ArgumentParser(description="Generate ShapesVQA splits (only those missing).")
    parser.add_argument("--root", type=Path, required=True, help="folder that holds one sub-folder per split")
    parser.add_argument("--split", action="append", choices=sorted(SPLITS), help="split(s); default all")
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE)
    args = parser.parse_args(argv)
    for split in args.split or list(SPLITS):
        folder = ensure_split(args.root, split, image_size=args.image_size)
        counts = Counter(json.loads(line)["category"] for line in (folder / QUESTIONS_FILE).open(encoding="utf-8"))
        print(f"{split}: {folder} ({sum(counts.values())} questions: {dict(sorted(counts.items()))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
