"""Which DINOv2 layer of the demo model tells the colour of a ShapesVQA shape? A linear probe per layer.

For each train image, every 14x14 patch is labelled with the colour (one of six, from the exact
RGB fills of :data:`analysis.demo.shapes.COLOURS`) that covers at least half of its pixels, or
background. A class-balanced linear classifier is trained per vision layer on the patch features
of the first images and scored on the rest. This measurement chose the demo model's
``vision_feature_layer`` (:data:`analysis.demo.model.VISION_FEATURE_LAYERS`).

    python benchmarks/vision_feature_probe.py                 # 120 images: 80 to fit, 40 to score
    python benchmarks/vision_feature_probe.py --images 60 --fit 40

Prints, per layer (0 = patch embeddings, 12 = last), the accuracy on shape patches and on
background patches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from analysis.demo.model import PATCH_SIZE, load_demo_model
from analysis.demo.shapes import COLOURS, SCENES_FILE, ensure_split

COLOUR_CLOSE = 30.0**2  # squared RGB distance under which a pixel counts as a fill colour


def patch_colour_labels(image: Image.Image, side: int) -> torch.Tensor:
    """(patches,) label per patch: 0 background, 1 + index into COLOURS when it covers >= half."""
    grid = side // PATCH_SIZE
    pixels = np.asarray(image.convert("RGB").resize((side, side)), dtype=float)
    patches = pixels.reshape(grid, PATCH_SIZE, grid, PATCH_SIZE, 3).transpose(0, 2, 1, 3, 4)
    patches = patches.reshape(grid * grid, PATCH_SIZE * PATCH_SIZE, 3)
    palette = np.array(list(COLOURS.values()), dtype=float)
    distance = ((patches[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    nearest, close = distance.argmin(-1), distance.min(-1) < COLOUR_CLOSE
    labels = []
    for patch in range(grid * grid):
        counts = np.bincount(nearest[patch][close[patch]], minlength=len(COLOURS))
        labels.append(int(counts.argmax()) + 1 if counts.max() >= PATCH_SIZE * PATCH_SIZE / 2 else 0)
    return torch.tensor(labels)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, fit: int, steps: int = 150) -> tuple[float, float]:
    """(shape-patch accuracy, background accuracy) of a class-balanced linear probe.

    ``features`` (images, patches, width), ``labels`` (images, patches); the first ``fit`` images
    train the probe, the rest score it.
    """
    mean, std = features[:fit].mean((0, 1)), features[:fit].std((0, 1)).clamp_min(1e-4)
    x = (features - mean) / std
    x_fit, y_fit = x[:fit].flatten(0, 1), labels[:fit].flatten()
    x_test, y_test = x[fit:].flatten(0, 1), labels[fit:].flatten()
    classes = len(COLOURS) + 1
    weight = torch.zeros(x.shape[-1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    balance = 1.0 / torch.bincount(y_fit, minlength=classes).float().clamp_min(1)
    optimiser = torch.optim.Adam([weight, bias], lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(x_fit @ weight + bias, y_fit, weight=balance).backward()
        optimiser.step()
    predicted = (x_test @ weight + bias).argmax(-1)
    shape = y_test > 0
    return float((predicted[shape] == y_test[shape]).float().mean()), float((predicted[~shape] == 0).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", type=Path, default=Path(".cache/shapesvqa"))
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--fit", type=int, default=80)
    args = parser.parse_args()
    torch.manual_seed(0)
    folder = ensure_split(args.data_root, "train")
    model, processor = load_demo_model(weights="random")  # the vision tower is the same for any weights
    side = int(processor.image_processor.crop_size["height"])
    scenes = [json.loads(line) for line in (folder / SCENES_FILE).read_text().splitlines()][: args.images]
    per_layer: list[list[torch.Tensor]] = []
    labels = []
    start = time.time()
    with torch.inference_mode():
        for scene in scenes:
            image = Image.open(folder / scene["image"]).convert("RGB")
            pixels = processor.image_processor(image, return_tensors="pt")["pixel_values"]
            hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            if not per_layer:
                per_layer = [[] for _ in hidden]
            for layer, states in enumerate(hidden):
                per_layer[layer].append(states[0, 1:].float())  # drop the class token
            labels.append(patch_colour_labels(image, side))
    print(f"vision features of {len(scenes)} images in {time.time() - start:.0f} s; "
          f"probe fitted on {args.fit}, scored on {len(scenes) - args.fit}")
    stacked_labels = torch.stack(labels)
    for layer, features in enumerate(per_layer):
        shape_accuracy, background_accuracy = probe_accuracy(torch.stack(features), stacked_labels, args.fit)
        print(f"layer {layer:2d}: shape-patch colour accuracy {shape_accuracy:.3f}, background {background_accuracy:.3f}")


if __name__ == "__main__":
    main()
