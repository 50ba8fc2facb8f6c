"""Whether the demo model can be built here: the marker that skips its tests, with the reason."""

from __future__ import annotations

import pytest

from analysis.demo import model as demo_model
from analysis.demo.model import DemoModelUnavailable, locate_demo_parts


def unavailable_reason() -> str | None:
    """None when both pinned wheels and the loading packages are installed, else what is missing."""
    try:
        locate_demo_parts()
        demo_model._require_loading_packages(("gguf", "accelerate", "onnx"))
    except DemoModelUnavailable as error:
        return f"demo model unavailable: {error}"
    return None


UNAVAILABLE = unavailable_reason()
requires_demo = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")
