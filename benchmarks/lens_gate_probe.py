"""Probe (issue 16): two gate designs the gate-variant study did not try, as lookups in the exit tables.

1. The logit lens. The last prompt token's state after layer l, through the final norm and the
   output head, is the first answer token's distribution as layer l sees it. From it and the
   previous layer's, per (question, layer): the top-1 probability, the top-1 minus top-2 margin,
   the entropy, whether the top-1 token is the previous layer's and for how many layers in a row,
   the probability now of the previous layer's top-1 token and KL(now || previous). A logistic
   classifier ("lens-logistic") or a 64-wide MLP ("lens-mlp64") over these and the layer's
   one-hot. (One output-head product per asked layer: about 1 % of a demo layer's prefill.)
2. One gate for every layer. The toolkit's gates are one network per layer, each learning from the
   2,000 training questions alone; "shared-hidden" is one MLP (width 256, dropout 0.2) over the
   paper's hidden input (text mean, last token: 2 x 576) and the layer's one-hot, standardised,
   trained on every (question, layer) row (AdamW, lr 1e-3, weight decay 0.01, batch 512, 30 epochs),
   three seeds; "shared-hidden+lens" adds the lens numbers.

All trained on the train table's labels of the questions ``dyvte-exit train`` learns from (its
held-out 20 % left out, as for the per-layer gates) (``agreement,monotone``: every answer token's argmax kept
from this layer on), then DyVTE's rule as lookups: each question exits after the first layer whose
p(exit) > tau, tau chosen on the validation table (fewest FLOPs within 1 point,
``exit.frontier.choose_tau``), the test split's accuracy change (paired 95 % bootstrap), prefill
FLOPs and share of the oracle's saving at every tau. With ``--gates`` the same lookups for trained
gate sets of the toolkit (``dyvte-exit train``, per-layer or ``--shared``) beside them, in the
same run. The probe's own classifiers are probes (no gated prefill runs them); the toolkit's shared
gate (``GateConfig.shared``) is the method that came out of the second.

Run after the exit tables have hidden features (``dyvte-exit features --features hidden``)::

    .venv/bin/python benchmarks/lens_gate_probe.py runs/exit-demo --model demo \\
        --gates per-layer-s0=runs/exit-demo/gates-hidden-agreement --gates toolkit-shared-s0=runs/exit-demo/gates-shared-s0 \\
        > benchmarks/results/gate-variants/lens_shared_probe.txt

(the results file lists every gate set it looked up and the commands that trained them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from analysis.adapters import resolve_adapter
from analysis.loading import load_model
from exit.frontier import choose_tau, dyvte_tau_summary, gate_probabilities
from exit.sweep import feature_shards, read_exit_answers, read_shard
from exit.train import TrainSettings, is_heldout, rule_labels

TAUS = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
LENS_COLUMNS = ("top1", "margin", "entropy", "same_top1", "run", "p_previous_top1", "kl_previous")


@torch.no_grad()
def states_and_lens(folder: Path, norm: nn.Module, head: nn.Module,
                    hidden: int) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(sample ids, the paper's gate input (samples, layers, 2 hidden), the lens (samples, layers,
    len(LENS_COLUMNS))) from a table's cached "hidden" features ([text mean | last], ``exit.gates``),
    read once; the lens from the last prompt token's state."""
    ids: list[str] = []
    states, lenses = [], []
    for path in feature_shards(folder):
        features, _, shard_ids, kind = read_shard(path)
        if kind not in ("hidden", "both"):
            raise SystemExit(f"expected hidden gate features in {path}, found {kind!r}")
        states.append(features[..., :2 * hidden].float())
        lenses.append(_lens(states[-1][..., hidden:], norm, head))
        ids.extend(shard_ids)
    return ids, torch.cat(states), torch.cat(lenses)


def _lens(last: torch.Tensor, norm: nn.Module, head: nn.Module) -> torch.Tensor:
    """(batch, layers, len(LENS_COLUMNS)) from the last prompt token's states (batch, layers, hidden)."""
    log_p = torch.log_softmax(head(norm(last)).float(), dim=-1)  # (batch, layers, vocab)
    p = log_p.exp()
    top = p.topk(2, dim=-1)
    top1 = top.indices[..., 0]
    entropy = -(p * log_p).sum(-1)
    previous = torch.cat([top1[:, :1], top1[:, :-1]], dim=1)
    same = (top1 == previous).float()
    same[:, 0] = 0.0
    run = torch.zeros_like(same)
    for layer in range(1, same.shape[1]):
        run[:, layer] = (run[:, layer - 1] + 1) * same[:, layer]
    p_previous_top1 = p.gather(-1, previous[..., None])[..., 0]
    log_p_before = torch.cat([log_p[:, :1], log_p[:, :-1]], dim=1)
    kl = (p * (log_p - log_p_before)).sum(-1)
    return torch.stack([top.values[..., 0], top.values[..., 0] - top.values[..., 1], entropy, same,
                        run / same.shape[1], p_previous_top1, kl], dim=-1)


class Standardised(nn.Module):
    """p(exit) of a trained body on inputs standardised by the training rows' mean and deviation."""

    def __init__(self, body: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.body, self.mean, self.std = body, mean, std

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.body((inputs - self.mean) / self.std)[..., 0])


def train_shared(x: torch.Tensor, y: torch.Tensor, seed: int, width: int = 256, epochs: int = 30) -> nn.Module:
    """One MLP for every (question, layer) row of ``x`` (samples, layers, F): minibatch AdamW on standardised inputs."""
    torch.manual_seed(seed)
    rows, targets = x.flatten(0, 1), y.flatten().float()
    mean, std = rows.mean(0), rows.std(0).clamp_min(1e-4)
    body = nn.Sequential(nn.Linear(rows.shape[1], width), nn.GELU(), nn.Dropout(0.2), nn.Linear(width, 1))
    optimiser = torch.optim.AdamW(body.parameters(), lr=1e-3, weight_decay=1e-2)
    z = (rows - mean) / std
    for _ in range(epochs):
        order = torch.randperm(len(z))
        for start in range(0, len(z), 512):
            batch = order[start:start + 512]
            optimiser.zero_grad()
            nn.functional.binary_cross_entropy_with_logits(body(z[batch])[:, 0], targets[batch]).backward()
            optimiser.step()
    body.eval()
    return Standardised(body, mean, std)


def with_layer(features: torch.Tensor) -> torch.Tensor:
    """(samples, layers, F + layers): each row's features and its layer's one-hot."""
    samples, layers, _ = features.shape
    one_hot = torch.eye(layers).expand(samples, layers, layers)
    return torch.cat([features, one_hot], dim=-1)


def train_classifier(x: torch.Tensor, y: torch.Tensor, width: int, epochs: int, seed: int) -> nn.Module:
    """A logistic classifier (width 0) or a one-hidden-layer MLP on standardised inputs, full-batch Adam."""
    torch.manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    body: nn.Module = nn.Linear(x.shape[1], 1) if width == 0 else nn.Sequential(
        nn.Linear(x.shape[1], width), nn.GELU(), nn.Linear(width, 1))
    optimiser = torch.optim.Adam(body.parameters(), lr=1e-2 if width == 0 else 3e-3, weight_decay=1e-4)
    z, target = (x - mean) / std, y.float()
    for _ in range(epochs):
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(body(z)[:, 0], target)
        loss.backward()
        optimiser.step()
    return Standardised(body, mean, std)


def probabilities_frame(ids: list[str], p: torch.Tensor) -> pd.DataFrame:
    samples, layers = p.shape
    return pd.DataFrame({"sample_id": np.repeat(ids, layers), "layer": np.tile(np.arange(layers), samples),
                         "p_exit": p.reshape(-1).numpy()}).drop_duplicates(["sample_id", "layer"], keep="last")


def report(name: str, answers: pd.DataFrame, probabilities: pd.DataFrame, chosen: float) -> list[str]:
    """One line per tau: accuracy change against the full model (paired interval), FLOPs, share of the oracle's saving."""
    lines = []
    for tau, line in dyvte_tau_summary(answers, probabilities, TAUS, name).iterrows():
        mark = "  <- tau chosen on validation" if abs(tau - chosen) < 1e-12 else ""
        lines.append(f"{name:>14} tau {tau:<6g} {100 * line['difference']:+5.1f} points "
                     f"({100 * line['difference_low']:+.1f} to {100 * line['difference_high']:+.1f})  "
                     f"FLOPs {line['relative_prefill_flops']:.3f}  oracle share {line['share_of_oracle_saving']:.0%}{mark}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, help="folder with train-table, val-table, test-table (hidden features)")
    parser.add_argument("--model", default="demo", help="the model the tables were made with (its norm and head)")
    parser.add_argument("--label-rule", default="agreement,monotone")
    parser.add_argument("--gates", action="append", default=[], metavar="NAME=FOLDER",
                        help="a trained gate set (or A,B,C averaged) to look up beside; repeat")
    parser.add_argument("--epochs", type=int, default=400, help="full-batch epochs of the lens classifiers")
    parser.add_argument("--seed", type=int, default=0, help="seed of the lens classifiers and shared-hidden+lens")
    parser.add_argument("--seeds", default="0,1,2", help="seeds of the shared hidden gate")
    args = parser.parse_args()
    model, _ = load_model(args.model)
    adapter = resolve_adapter(model)
    norm, head = adapter.final_norm(model), model.get_output_embeddings()
    hidden = int(model.config.get_text_config().hidden_size)
    tables = {split: args.runs / f"{split}-table" for split in ("train", "val", "test")}
    read = {split: states_and_lens(path, norm, head, hidden) for split, path in tables.items()}
    lens = {split: (ids, lensed) for split, (ids, _, lensed) in read.items()}
    states = {split: (ids, hidden_states) for split, (ids, hidden_states, _) in read.items()}
    labels = rule_labels(tables["train"], args.label_rule)
    train_ids, train_x = lens["train"]
    # the questions dyvte-exit train learns from: its held-out share (same fraction, the seed as
    # its split seed) left out
    holdout = TrainSettings().holdout_fraction

    def training_rows(seed: int) -> tuple[list[int], torch.Tensor]:
        keep = [i for i, sample in enumerate(train_ids) if sample in labels and not is_heldout(sample, holdout, seed)]
        return keep, torch.stack([labels[train_ids[i]] for i in keep])

    keep, y = training_rows(args.seed)
    answers = {split: read_exit_answers(tables[split]) for split in ("val", "test")}
    print(f"# {' '.join(sys.argv)}")
    print(f"# train: {len(keep)} questions (seed {args.seed}; dyvte-exit train's {holdout:.0%} held out) x "
          f"{train_x.shape[1]} layers ({float(y.float().mean()):.1%} labelled safe, {args.label_rule}); tau chosen on "
          f"{answers['val']['sample_id'].nunique()} validation questions; test: {answers['test']['sample_id'].nunique()} "
          f"questions; lens features {', '.join(LENS_COLUMNS)}")
    sets = {}
    for name, width in (("lens-logistic", 0), ("lens-mlp64", 64)):
        classifier = train_classifier(with_layer(train_x[keep]).flatten(0, 1), y.flatten(), width, args.epochs, args.seed)
        with torch.no_grad():
            sets[name] = {split: probabilities_frame(lens[split][0], classifier(with_layer(lens[split][1])))
                          for split in ("val", "test")}
    shared_inputs = {
        "shared-hidden": lambda split: with_layer(states[split][1]),
        "shared-hidden+lens": lambda split: with_layer(torch.cat([states[split][1], lens[split][1]], dim=-1)),
    }
    for kind, inputs in shared_inputs.items():
        seeds = [int(seed) for seed in args.seeds.split(",")] if kind == "shared-hidden" else [args.seed]
        for seed in seeds:
            seed_keep, seed_y = training_rows(seed)
            classifier = train_shared(inputs("train")[seed_keep], seed_y, seed)
            with torch.no_grad():
                sets[f"{kind}-s{seed}"] = {split: probabilities_frame(lens[split][0], classifier(inputs(split)))
                                           for split in ("val", "test")}
    for spec in args.gates:
        from exit.gates import load_gate_set

        name, _, folder = spec.partition("=")
        gates = load_gate_set(folder)
        sets[name] = {split: gate_probabilities(tables[split], gates) for split in ("val", "test")}
    for name, frames in sets.items():
        chosen = choose_tau(answers["val"], frames["val"], TAUS)
        print("\n".join(report(name, answers["test"], frames["test"], chosen)))


if __name__ == "__main__":
    main()
