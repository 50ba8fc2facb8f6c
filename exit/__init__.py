"""exit: DyVTE visual-token exit, built on what ``analysis`` records.

Use ``from exit import ...`` rather than ``import exit``, which would shadow the ``exit`` builtin
in the importing module.

Typical use::

    from exit import DyVTEGates, GateConfig, dyvte_exit, visual_token_exit

    # a fixed exit layer per row (None = keep the image throughout)
    with visual_token_exit(model, exit_layers=[6, None]) as surgery:
        out = model.generate(**batch, max_new_tokens=16)

    # learned gates decide during the prefill
    gates = DyVTEGates.load("gates/", model)
    with dyvte_exit(model, gates, batch["input_ids"], batch["attention_mask"]) as surgery:
        out = model.generate(**batch, max_new_tokens=16)
    surgery.exit_layers  # the layer each row exited after, or None

    # exit labels per (sample, layer), and gate training from the cached features
    from exit import exit_sweep, teacher_forced_inputs, train_offline
    inputs, answer_mask = teacher_forced_inputs(processor, prompts, images, answers)
    result = exit_sweep(model, inputs, answer_mask, features="hidden")  # result.label: (batch, layers)

    # the peers, in the same conventions (exit.baselines): FastV, VTW, DyVTE + FastV
    from exit import fastv, dyvte_fastv
    with fastv(model, 2, 0.5) as pruning:   # after layer 2 keep the top half of the image tokens
        out = model.generate(**batch, max_new_tokens=16)

Modules: ``methods`` (the one table of exit methods: syntax, needs, attachment, label, FLOPs
rule), ``surgery`` (reversible per-row removal of image tokens, KV-cache aware), ``gates``
(GateConfig, one gate per layer, features from the recorder, save/load, gated inference),
``sweep`` (exit labels per sample and layer, parquet), ``train`` (offline and online gate
training), ``baselines`` (FastV, VTW, DyVTE + FastV), ``flops`` (FLOPs formulas), ``evaluate``
(answer a question file under a method), ``cli`` (``dyvte-exit``).
"""

from analysis.lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "FastV": "exit.baselines",
    "dyvte_fastv": "exit.baselines",
    "fastv": "exit.baselines",
    "fastv_keep_count": "exit.baselines",
    "first_layer_within": "exit.baselines",
    "vtw_kl_curve": "exit.baselines",
    "GATE_INPUTS": "exit.gates",
    "AveragedGates": "exit.gates",
    "DyVTEGates": "exit.gates",
    "load_gate_set": "exit.gates",
    "GateConfig": "exit.gates",
    "GateMismatchError": "exit.gates",
    "ModelSignature": "exit.gates",
    "answer_with_gates": "exit.gates",
    "dyvte_exit": "exit.gates",
    "feature_size": "exit.gates",
    "gate_features": "exit.gates",
    "ExitSurgeryError": "exit.surgery",
    "VisualExit": "exit.surgery",
    "compact_layout": "exit.surgery",
    "visual_token_exit": "exit.surgery",
    "LabelRule": "exit.sweep",
    "SweepError": "exit.sweep",
    "SweepResult": "exit.sweep",
    "SweepWriter": "exit.sweep",
    "exit_sweep": "exit.sweep",
    "read_sweep": "exit.sweep",
    "teacher_forced_inputs": "exit.sweep",
    "TrainReport": "exit.train",
    "TrainSettings": "exit.train",
    "train_offline": "exit.train",
    "train_online": "exit.train",
}

__all__ = [
    "AveragedGates",
    "DyVTEGates",
    "load_gate_set",
    "ExitSurgeryError",
    "FastV",
    "GATE_INPUTS",
    "GateConfig",
    "GateMismatchError",
    "LabelRule",
    "ModelSignature",
    "SweepError",
    "SweepResult",
    "SweepWriter",
    "TrainReport",
    "TrainSettings",
    "VisualExit",
    "answer_with_gates",
    "compact_layout",
    "dyvte_exit",
    "dyvte_fastv",
    "exit_sweep",
    "fastv",
    "fastv_keep_count",
    "first_layer_within",
    "feature_size",
    "gate_features",
    "read_sweep",
    "teacher_forced_inputs",
    "train_offline",
    "train_online",
    "visual_token_exit",
    "vtw_kl_curve",
]

__getattr__, __dir__ = lazy_exports("exit", _EXPORTS)
