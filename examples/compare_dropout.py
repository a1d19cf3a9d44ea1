"""Uout vs Gaussian vs standard dropout around BatchNorm: regjax's main study.

Trains a BatchNorm CNN with each noise op (a) inside every block, where its output
reaches the next BatchNorm, and (b) only after the last BatchNorm, in the head.
Each op runs at its customary setting (dropout 0.5, Gaussian dropout 0.5, Uout
beta 0.1) and at the other settings' noise variance (matched s2: dropout and Gaussian
dropout at rate q have s2 = q/(1-q), Uout at beta has s2 = beta**2/3).
For every run it records test accuracy and loss, the variance shift at every BN
layer (regjax.diagnostics.variance_shift) and the test accuracy after
regjax.diagnostics.recalibrate_batch_stats. Seeds, and the settings of one
(op, placement), train together in one jax.vmap.

`--orders` instead sweeps block orders (the ten conv/bn/act/drop/pool orders of a
public MNIST experiment, one run each there) with one noise setting.

    python examples/compare_dropout.py                 # default study on MNIST-1D
    python examples/compare_dropout.py --quick         # < 1 minute smoke run
    python examples/compare_dropout.py --orders all    # the ten block orders
"""

import argparse
import csv
import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import regjax
from regjax import diagnostics

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import DatasetUnavailableError, batch_indices, load_dataset  # noqa: E402
from models import ACTIVATIONS, default_cnn, parse_order  # noqa: E402
from training import (  # noqa: E402
    evaluate, init_key, init_state, make_optimizer, noise_key, train_step)

CUSTOMARY = {"dropout": 0.5, "gaussian": 0.5, "uout": 0.1}
METHODS = ("dropout", "gaussian", "uout")
PLACEMENTS = {"block": "before BN (every block)", "head": "after last BN (head only)"}
DEFAULT_ORDER = "conv-bn-act-drop-pool"

# A public experiment's test losses per block order (one run each, MNIST, ELU, dropout
# 0.2-0.3): a claim to re-test.
CLAIMED_ORDER_LOSS = {
    "conv-act-drop-bn-pool": 0.0426, "conv-act-drop-pool-bn": 0.0501,
    "conv-act-bn-pool-drop": 0.0491, "conv-act-bn-drop-pool": 0.0681,
    "conv-bn-act-drop-pool": 0.0389, "conv-bn-act-pool-drop": 0.0413,
    "conv-bn-drop-act-pool": 0.0514, "conv-drop-act-bn-pool": 0.0483,
    "conv-drop-act-pool-bn": 0.0472, "conv-drop-bn-act-pool": 0.0324,
}

# Two-sided 95 % Student-t quantiles by degrees of freedom (few seeds: a normal
# 1.96 would call noise significant far too often).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(dof: int) -> float:
  if dof <= 0:
    return math.inf
  return T95.get(dof) or T95[max(k for k in T95 if k <= dof)]


def noise_variance(method: str, value: float) -> float:
  if method == "none":
    return 0.0
  if method == "uout":
    return regjax.uout_noise_variance(value)
  return regjax.dropout_noise_variance(value)


def value_for_variance(method: str, s2: float) -> float:
  """The rate (dropout, gaussian) or beta (uout) whose noise variance is s2."""
  return math.sqrt(3 * s2) if method == "uout" else s2 / (1 + s2)


@dataclasses.dataclass(frozen=True)
class Config:
  method: str      # none | dropout | gaussian | uout
  placement: str   # none | block | head
  setting: str     # customary | matched | order sweep
  value: float     # rate or beta
  order: str = DEFAULT_ORDER

  @property
  def s2(self) -> float:
    return noise_variance(self.method, self.value)

  @property
  def label(self) -> str:
    if self.setting == "order sweep":
      return self.order
    if self.method == "none":
      return "no noise" + ("" if self.order == DEFAULT_ORDER else f" [{self.order}]")
    knob = "beta" if self.method == "uout" else "rate"
    where = {"block": "before BN", "head": "after BN"}[self.placement]
    text = f"{self.method} {knob}={self.value:.3g} {where}"
    return text + ("" if self.order == DEFAULT_ORDER else f" [{self.order}]")


def default_configs() -> list[Config]:
  """No noise, then every op x placement at its customary s2 and at the others'."""
  levels = sorted({noise_variance(m, v) for m, v in CUSTOMARY.items()})
  configs = [Config("none", "none", "baseline", 0.0)]
  for placement in PLACEMENTS:
    for method in METHODS:
      own = noise_variance(method, CUSTOMARY[method])
      configs.append(Config(method, placement, "customary", CUSTOMARY[method]))
      for s2 in levels:
        if not math.isclose(s2, own):
          configs.append(Config(method, placement, "matched", value_for_variance(method, s2)))
  return configs


def order_configs(orders: list[str], method: str, value: float) -> list[Config]:
  return [Config(method, "block", "order sweep", value, order) for order in orders]


# ---------------------------------------------------------------------------
# Training one group: every config of one noise op and block order, with all
# seeds, trains in a single jax.vmap (one compilation per group). Block and head
# strengths are both vmapped; the placement a config does not use gets strength
# 0, which regjax's ops apply as the exact identity (factor 1.0 for every unit).
# "No noise" therefore trains in the dropout group with both rates 0.

def _group_method(config: Config) -> str:
  return "dropout" if config.method == "none" else config.method


def _strengths(config: Config) -> tuple[float, float]:
  """(block, head) noise strength of a config."""
  return (config.value if config.placement == "block" else 0.0,
          config.value if config.placement == "head" else 0.0)


def _model(method: str, order: str, block_value, head_value, data, activation="relu"):
  return default_cnn(data["name"], data["num_classes"], order=order, activation=activation,
                     block_noise=method, block_noise_value=block_value,
                     head_noise=method, head_noise_value=head_value)


def train_group(method, order, configs, seeds, data, args, progress):
  """Trains every (config, seed) of one group; returns the runs and stacked states.

  The noise strengths are traced arguments, so the group compiles once. With
  ``args.vmap`` all runs train in one ``jax.vmap``; otherwise they train one
  after another through the same compiled step. On this 2-core CPU vmap does not
  pay (a vmapped conv step over 3 runs took 7x one run's time), on an
  accelerator it should. Runs with the same seed share their initialization
  and batch order, so differences between configs are paired.
  """
  runs = [(c, s) for c in configs for s in seeds]
  strengths = jnp.asarray([_strengths(c) for c, _ in runs], jnp.float32)
  keys = jnp.stack([jax.random.key_data(jax.random.key(s)) for _, s in runs])
  x_train, y_train = jnp.asarray(data["x_train"]), jnp.asarray(data["y_train"])
  n = x_train.shape[0]
  steps_per_epoch = n // args.batch_size
  tx = make_optimizer(args.lr, args.epochs, steps_per_epoch, args.weight_decay)

  def model(strength):
    return _model(method, order, strength[0], strength[1], data, args.activation)

  def init(key_data, strength):
    return init_state(model(strength), tx, init_key(jax.random.wrap_key_data(key_data)),
                      x_train[:2])

  def step(state, strength, x, y, idx, key_data, step_index):
    key = noise_key(jax.random.wrap_key_data(key_data), step_index)
    return train_step(model(strength), tx, state, x[idx], y[idx], key)

  def train(states, strengths, keys, seeds_of_runs, on_epoch):
    """Trains a stack of runs (one vmap) and returns them with per-epoch losses."""
    history = []
    for epoch in range(args.epochs):
      order_idx = np.stack([batch_indices(seed, epoch, n, args.batch_size)
                            for seed in seeds_of_runs], 1)
      losses = []
      for i in range(steps_per_epoch):
        states, metrics = vstep(states, strengths, x_train, y_train, order_idx[i], keys,
                                epoch * steps_per_epoch + i)
        losses.append(metrics["loss"])
      history.append(np.asarray(jnp.mean(jnp.stack(losses), 0)))
      on_epoch()
    return states, np.stack(history, 1)  # (runs, epochs)

  vinit = jax.jit(jax.vmap(init))
  vstep = jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, 0, 0, None)))
  seeds_of_runs = [seed for _, seed in runs]
  if args.vmap:
    states, history = train(vinit(keys, strengths), strengths, keys, seeds_of_runs,
                            lambda: progress.update(len(runs)))
  else:
    # A vmap of width 1 per run: the same compiled step serves every run.
    done = []
    for r in range(len(runs)):
      sl = slice(r, r + 1)
      done.append(train(vinit(keys[sl], strengths[sl]), strengths[sl], keys[sl],
                        seeds_of_runs[sl], lambda: progress.update(1)))
    states = jax.tree.map(lambda *a: jnp.concatenate(a), *[d[0] for d in done])
    history = np.concatenate([d[1] for d in done])
  return runs, states, history.tolist()


@functools.lru_cache(maxsize=None)
def _eval_fns(eval_model):
  """Eval-mode apply and jitted evaluate of a model, made once per model so the
  diagnostics' capture and the evaluation compile once for all its runs."""
  apply_fn = lambda v, x: eval_model.apply(v, x, train=False)  # noqa: E731
  evaluate_jit = jax.jit(lambda state, x, y: evaluate(eval_model, state, x, y, batch_size=1000))
  return apply_fn, evaluate_jit


def measure(runs, states, eval_model, data, args, shift_batches):
  """Per run: test/train metrics, variance shift per BN, metrics after recalibration."""
  apply_fn, evaluate_jit = _eval_fns(eval_model)
  results = []
  for r, (config, seed) in enumerate(runs):
    state = jax.tree.map(lambda a: a[r], states)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    test = evaluate_jit(state, data["x_test"], data["y_test"])
    train = evaluate_jit(state, data["x_train"], data["y_train"])
    shifts = diagnostics.variance_shift(apply_fn, variables, shift_batches)
    recal_stats = diagnostics.recalibrate_batch_stats(apply_fn, variables, shift_batches)
    recal = evaluate_jit(state.replace(batch_stats=recal_stats), data["x_test"], data["y_test"])
    results.append({
        "config": config.label, "method": config.method, "placement": config.placement,
        "setting": config.setting, "value": config.value, "s2": config.s2,
        "order": config.order, "seed": seed,
        "test_acc": float(test["acc"]), "test_loss": float(test["loss"]),
        "train_acc": float(train["acc"]), "train_loss": float(train["loss"]),
        "recal_test_acc": float(recal["acc"]), "recal_test_loss": float(recal["loss"]),
        "shift_per_layer": {p: s.mean_shift for p, s in shifts.items()},
        "delta_per_layer": {p: float(np.mean(s.delta)) for p, s in shifts.items()},
        "mean_shift": float(np.mean([s.mean_shift for s in shifts.values()])),
    })
  return results


# ---------------------------------------------------------------------------
# Summaries

def _mean_sd(values):
  values = np.asarray(values, np.float64)
  sd = float(values.std(ddof=1)) if values.size > 1 else float("nan")
  return float(values.mean()), sd


def _paired(a, b):
  """Mean of a - b over seeds, its 95 % half-width, and whether it is significant."""
  diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  if diff.size < 2:
    return float(diff.mean()), float("nan"), False
  half = t95(diff.size - 1) * diff.std(ddof=1) / math.sqrt(diff.size)
  return float(diff.mean()), float(half), bool(abs(diff.mean()) > half)


def summarize(results, baseline_label):
  by_config: dict[str, list] = {}
  for row in results:
    by_config.setdefault(row["config"], []).append(row)
  base = {r["seed"]: r for r in by_config.get(baseline_label, [])}
  summary = []
  for label, rows in by_config.items():
    rows = sorted(rows, key=lambda r: r["seed"])
    entry = {k: rows[0][k] for k in ("config", "method", "placement", "setting", "value", "s2",
                                     "order")}
    for key in ("test_acc", "test_loss", "train_acc", "recal_test_acc", "mean_shift"):
      entry[key], entry[key + "_sd"] = _mean_sd([r[key] for r in rows])
    entry["seeds"] = [r["seed"] for r in rows]
    entry["shift_per_layer"] = {
        p: float(np.mean([r["shift_per_layer"][p] for r in rows]))
        for p in rows[0]["shift_per_layer"]}
    entry["recal_gain"], entry["recal_gain_ci"], entry["recal_significant"] = _paired(
        [r["recal_test_acc"] for r in rows], [r["test_acc"] for r in rows])
    paired = [r for r in rows if r["seed"] in base]
    if base and label != baseline_label and paired:
      entry["vs_baseline"], entry["vs_baseline_ci"], entry["vs_baseline_significant"] = _paired(
          [r["test_acc"] for r in paired], [base[r["seed"]]["test_acc"] for r in paired])
    summary.append(entry)
  return summary


def method_contrasts(results) -> list[dict]:
  """Gaussian dropout and Uout against dropout at the same noise variance and placement:
  the study's central question (is Uout's advantage its shape or its small variance?)."""
  cells: dict[tuple, dict] = {}
  for r in results:
    if r["method"] != "none":
      key = (r["placement"], round(r["s2"], 6), r["order"])
      cells.setdefault(key, {}).setdefault(r["method"], {})[r["seed"]] = r["test_acc"]
  out = []
  for (placement, s2, order), by_method in cells.items():
    reference = by_method.get("dropout")
    if not reference:
      continue
    for method in ("gaussian", "uout"):
      if method not in by_method:
        continue
      seeds = sorted(set(reference) & set(by_method[method]))
      diff, half, significant = _paired([by_method[method][s] for s in seeds],
                                        [reference[s] for s in seeds])
      out.append({"placement": placement, "s2": s2, "order": order, "method": method,
                  "minus_dropout": diff, "ci": half, "significant": significant})
  return out


def format_contrasts(contrasts) -> str:
  lines = ["At matched noise variance, test accuracy minus dropout's (paired over seeds, "
           "95 % t-interval):"]
  for c in contrasts:
    where = PLACEMENTS.get(c["placement"], c["placement"])
    lines.append(f"  {where:26s} s2={c['s2']:.4f}  {c['method']:8s} - dropout: "
                 f"{100 * c['minus_dropout']:+5.1f} ± {100 * c['ci']:4.1f} points"
                 + ("" if c["significant"] else "  n.s."))
  return "\n".join(lines)


def _ranks(values) -> np.ndarray:
  """Ranks from 1, ties sharing their mean rank."""
  values = np.asarray(values, np.float64)
  order = np.argsort(values, kind="stable")
  ranks = np.empty(len(values))
  ranks[order] = np.arange(1, len(values) + 1)
  for v in np.unique(values):
    ranks[values == v] = ranks[values == v].mean()
  return ranks


def claimed_rank_correlation(summary, claimed_losses) -> tuple[float, int]:
  """Spearman correlation between our mean test losses and the claimed ones."""
  pairs = [(e["test_loss"], claimed_losses[e["order"]]) for e in summary
           if e["order"] in claimed_losses]
  if len(pairs) < 3:
    return float("nan"), len(pairs)
  ours, claimed = _ranks([p[0] for p in pairs]), _ranks([p[1] for p in pairs])
  return float(np.corrcoef(ours, claimed)[0, 1]), len(pairs)


def format_table(summary, claimed_losses=None) -> str:
  pct = lambda m, s: f"{100 * m:5.1f} ± {100 * s:3.1f}" if not math.isnan(s) else f"{100 * m:5.1f}"
  width = max(38, *(len(e["config"]) for e in summary))
  header = (f"{'configuration':{width}s} {'s2':>7s} {'test acc %':>13s} {'vs no noise':>14s} "
            f"{'test loss':>15s} {'BN shift':>9s} {'acc recal. %':>13s} {'recal. gain':>13s}")
  if claimed_losses:
    header += f" {'claimed loss':>12s}"
  lines = [header, "-" * len(header)]
  for e in summary:
    vs = ""
    if "vs_baseline" in e:
      vs = f"{100 * e['vs_baseline']:+5.1f}" + ("" if e["vs_baseline_significant"] else " n.s.")
    gain = f"{100 * e['recal_gain']:+5.1f}" + ("" if e["recal_significant"] else " n.s.")
    loss = (f"{e['test_loss']:.4f} ± {e['test_loss_sd']:.4f}"
            if not math.isnan(e["test_loss_sd"]) else f"{e['test_loss']:.4f}")
    line = (f"{e['config']:{width}s} {e['s2']:7.4f} {pct(e['test_acc'], e['test_acc_sd']):>13s} "
            f"{vs:>14s} {loss:>15s} {e['mean_shift']:9.3f} "
            f"{pct(e['recal_test_acc'], e['recal_test_acc_sd']):>13s} {gain:>13s}")
    if claimed_losses:
      claimed = claimed_losses.get(e["order"])
      line += f" {claimed:12.4f}" if claimed is not None else f" {'':>12s}"
    lines.append(line)
  lines.append("")
  lines.append("mean ± sd over seeds; 'vs no noise' and 'recal. gain' are paired (same seeds) "
               "differences in accuracy points,")
  lines.append("marked n.s. where the 95 % t-interval of the difference includes 0. "
               "BN shift: mean over BN layers and channels of max(real/moving, moving/real).")
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Plots

COLORS = {"none": "black", "dropout": "tab:blue", "gaussian": "tab:orange", "uout": "tab:green"}


def _style(entry) -> dict:
  """Colour by op, line style by placement, marker by noise level."""
  return {"color": COLORS.get(entry["method"], "tab:purple"),
          "linestyle": "--" if entry["placement"] == "head" else "-",
          "marker": "o" if entry["s2"] >= 0.1 else ("s" if entry["s2"] > 0 else "D")}


def plot_all(summary, results, run_dir) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  paths = []
  labels = [e["config"] for e in summary]
  y = np.arange(len(summary))
  fig, ax = plt.subplots(figsize=(9, 0.42 * len(summary) + 1.5))
  ax.barh(y - 0.2, [100 * e["test_acc"] for e in summary], 0.4,
          xerr=[100 * np.nan_to_num(e["test_acc_sd"]) for e in summary], label="trained BN stats")
  ax.barh(y + 0.2, [100 * e["recal_test_acc"] for e in summary], 0.4,
          xerr=[100 * np.nan_to_num(e["recal_test_acc_sd"]) for e in summary],
          label="after recalibration")
  ax.set_yticks(y, labels)
  ax.invert_yaxis()
  ax.set_xlabel("test accuracy (%), mean ± sd over seeds")
  lo = min(min(e["test_acc"], e["recal_test_acc"]) for e in summary)
  ax.set_xlim(max(0, 100 * lo - 10), 100)
  ax.legend(loc="lower left")
  ax.grid(axis="x", alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(run_dir, "accuracy.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(9, 5))
  for e in summary:
    layers = list(e["shift_per_layer"])
    ax.plot(range(len(layers)), [e["shift_per_layer"][p] for p in layers], label=e["config"],
            alpha=0.85, **_style(e))
  ax.set_xticks(range(len(layers)), [p.replace("/", "/\n") for p in layers], fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("variance shift  max(real/moving, moving/real)")
  ax.set_xlabel("BatchNorm layer (input to output)")
  ax.legend(fontsize=7, ncol=2)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(run_dir, "variance_shift.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(6, 6))
  for e in summary:
    rows = [r for r in results if r["config"] == e["config"]]
    style = _style(e)
    ax.scatter([100 * r["test_acc"] for r in rows], [100 * r["recal_test_acc"] for r in rows],
               label=e["config"], s=22, color=style["color"], marker=style["marker"],
               facecolors="none" if e["placement"] == "head" else style["color"])
  lo = 100 * min(min(r["test_acc"], r["recal_test_acc"]) for r in results)
  ax.plot([lo, 100], [lo, 100], color="gray", linewidth=1)
  ax.set_xlabel("test accuracy before recalibration (%)")
  ax.set_ylabel("test accuracy after recalibration (%)")
  ax.legend(fontsize=6)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  paths.append(os.path.join(run_dir, "recalibration.png"))
  fig.savefig(paths[-1], dpi=120)
  plt.close(fig)
  return paths


# ---------------------------------------------------------------------------
# CLI

def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--dataset", default="mnist1d",
                 choices=["mnist1d", "mnist", "fashion_mnist", "cifar10"])
  p.add_argument("--data-dir", default=None, help="tensorflow_datasets data_dir")
  p.add_argument("--seeds", type=int, default=3, help="seeds per configuration")
  p.add_argument("--epochs", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--weight-decay", type=float, default=1e-4)
  p.add_argument("--orders", default=None,
                 help="sweep block orders instead: 'all' (the published experiment's ten) or a "
                      "comma list "
                      "such as conv-bn-act-drop-pool,conv-drop-bn-act-pool")
  p.add_argument("--order-noise", default="dropout", choices=METHODS,
                 help="noise op used in the order sweep")
  p.add_argument("--order-value", type=float, default=0.25,
                 help="rate (beta for uout) used in the order sweep")
  p.add_argument("--activation", default="relu", choices=sorted(ACTIVATIONS),
                 help="CNN activation (the public order experiment used elu)")
  p.add_argument("--recal-batches", type=int, default=4,
                 help="training batches of 1000 used by the shift measurement and recalibration")
  p.add_argument("--out-dir", default=None, help="run folder (default runs/compare_dropout/<time>)")
  p.add_argument("--quick", action="store_true",
                 help="smoke run: 2 seeds, 2 epochs on 1000 training samples")
  p.add_argument("--vmap", action=argparse.BooleanOptionalAction, default=None,
                 help="train a group's runs in one jax.vmap (default: on for GPU/TPU, off on "
                      "CPU, where it is slower)")
  p.add_argument("--no-progress", action="store_true")
  args = p.parse_args(argv)
  if args.vmap is None:
    args.vmap = jax.default_backend() != "cpu"
  if args.quick:
    args.seeds, args.epochs = 2, 2
  if args.seeds < 1 or args.epochs < 1:
    p.error("--seeds and --epochs must be >= 1")
  return args


def main(argv=None):
  args = parse_args(argv)
  t0 = time.perf_counter()
  try:
    data = load_dataset(args.dataset, data_dir=args.data_dir)
  except DatasetUnavailableError as err:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from None
  if args.quick:
    data = {**data, "x_train": data["x_train"][:1000], "y_train": data["y_train"][:1000]}
  seeds = list(range(args.seeds))
  shift_batches = [data["x_train"][i * 1000:(i + 1) * 1000]
                   for i in range(max(1, min(args.recal_batches, len(data["x_train"]) // 1000)))]

  if args.orders:
    orders = list(CLAIMED_ORDER_LOSS) if args.orders == "all" else args.orders.split(",")
    orders = ["-".join(parse_order(o)) for o in orders]
    configs = order_configs(orders, args.order_noise, args.order_value)
    baseline_label = None
  else:
    configs = default_configs()
    baseline_label = configs[0].label

  groups: dict[tuple, list[Config]] = {}
  for c in configs:
    groups.setdefault((_group_method(c), c.order), []).append(c)

  from tqdm.auto import tqdm
  results, histories = [], {}
  with tqdm(total=len(configs) * len(seeds) * args.epochs, desc="training (run-epochs)",
            disable=args.no_progress) as progress:
    for (method, order), group in groups.items():
      progress.set_postfix_str(f"{method} {order}")
      runs, states, history = train_group(method, order, group, seeds, data, args, progress)
      # Noise modules hold no variables and are the identity in eval mode, so one
      # noise-free model evaluates every config of an order (one compilation).
      eval_model = default_cnn(data["name"], data["num_classes"], order=order,
                               activation=args.activation)
      results += measure(runs, states, eval_model, data, args, shift_batches)
      for r, (config, seed) in enumerate(runs):
        histories.setdefault(config.label, {})[seed] = history[r]

  summary = summarize(results, baseline_label)
  contrasts = [] if args.orders else method_contrasts(results)
  table = format_table(summary, CLAIMED_ORDER_LOSS if args.orders else None)
  if contrasts:
    table += "\n\n" + format_contrasts(contrasts)
  rank_correlation = None
  if args.orders:
    rank_correlation, n_orders = claimed_rank_correlation(summary, CLAIMED_ORDER_LOSS)
    if n_orders >= 3:
      table += (f"\n\nSpearman rank correlation of our mean test losses with the claimed ones "
                f"(one run each on MNIST, ELU): {rank_correlation:+.2f} over "
                f"{n_orders} orders.")
  elapsed = time.perf_counter() - t0

  run_dir = args.out_dir or os.path.join(
      "runs", "compare_dropout", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
  os.makedirs(run_dir, exist_ok=True)
  record = {
      "study": "orders" if args.orders else "placement",
      "args": vars(args), "dataset": data["name"],
      "train_size": int(len(data["x_train"])), "test_size": int(len(data["x_test"])),
      "summary": summary, "matched_variance_contrasts": contrasts,
      "claimed_order_rank_correlation": rank_correlation, "runs": results,
      "train_loss_per_epoch": histories,
      "elapsed_seconds": elapsed,
      "environment": {"regjax": regjax.__version__, "jax": jax.__version__,
                      "device": str(jax.devices()[0]), "python": platform.python_version(),
                      "cpu_count": os.cpu_count()},
      "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
  }
  with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(run_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
    fields = [k for k in results[0] if not isinstance(results[0][k], dict)]
    writer = csv.DictWriter(f, fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(results)
  plots = plot_all(summary, results, run_dir)

  print()
  print(f"{data['name']}: {len(data['x_train'])} train / {len(data['x_test'])} test, "
        f"{args.epochs} epochs, seeds {seeds}, {len(results)} runs in {elapsed:.0f} s")
  print(table)
  print(f"\nresults: {run_dir}/results.json, results.csv; plots: "
        + ", ".join(os.path.basename(p) for p in plots))
  print(f"run folder: {run_dir}")
  return record


if __name__ == "__main__":
  main()
