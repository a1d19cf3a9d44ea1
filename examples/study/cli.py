"""Command line of the study: options, checks, the run, and what it writes."""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import sys
import time

import data as data_lib
import models

from study import environment, experiments, theory
from study.claims import to_markdown
from study.configs import Config
from study.runner import Settings

ALL = ("theory", "headline", "recalibration", "dose", "width", "depth", "orders")
DEFAULT = ("theory", "headline", "recalibration")
DEFAULT_TRAIN_SIZE = {"mnist1d": 1000}  # fewer samples than MNIST-1D's 4000: room to overfit
QUICK = {
  "seeds": 2,
  "epochs": 2,
  "train_size": 256,
  "theory_samples": 2**14,
  "order_epochs": 1,
  "aux_seeds": 2,
  "order_seeds": 2,
}
# --quick also shrinks the grids, so every experiment runs in seconds.
QUICK_GRIDS = {
  "dose": {"levels": (0.1, 1.0)},
  "width": {"widths": (8, 64)},
  "depth": {"depths": (2, 3)},
}
FULL = {"seeds": 10, "aux_seeds": 3, "order_seeds": 5}


class _Parser(argparse.ArgumentParser):
  """argparse, but a bad option is one line on stderr (no usage block)."""

  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="compare_dropout.py",
    description="Uout vs Gaussian vs standard dropout around BatchNorm: theory checks, "
    "training experiments, and claims.md with a verdict per claim. Nothing is downloaded.",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  a = p.add_argument
  a(
    "--dataset",
    default="mnist1d",
    choices=tuple(data_lib.DATASETS),
    help="mnist1d and digits are built in; the others need a prepared TFDS --data-dir",
  )
  a("--data-dir", default=None, help="TFDS data directory (mnist, fashion_mnist, cifar10)")
  a(
    "--train-size",
    type=int,
    default=None,
    help="training examples used (default: 1000 for mnist1d, all otherwise)",
  )
  a(
    "--experiments",
    default=None,
    help=f"comma list from {','.join(ALL)} (default: {','.join(DEFAULT)}; --full: all)",
  )
  a("--full", action="store_true", help="every experiment, with more seeds")
  a(
    "--seeds",
    type=int,
    default=None,
    help="seeds per configuration of the headline (default 5, --full 10, --quick 2)",
  )
  a(
    "--aux-seeds",
    type=int,
    default=None,
    help="seeds per configuration of dose, width and depth (default 3, --quick 2)",
  )
  a("--epochs", type=int, default=None, help="training epochs (default 60, --quick 2)")
  a("--batch-size", type=int, default=64, help="training batch size")
  a("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay to 0)")
  a("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
  a(
    "--activation",
    default="relu",
    choices=sorted(models.ACTIVATIONS),
    help="activation of the headline, dose, width and depth networks",
  )
  a(
    "--orders",
    default=None,
    help="block orders of the order sweep: 'all' (the quoted table's ten and the IC order) "
    "or a comma list such as conv-bn-act-drop-pool,act-bn-drop-conv-pool; implies the "
    "orders experiment",
  )
  a(
    "--order-noise",
    default="dropout",
    choices=experiments.METHODS,
    help="noise op of the order sweep",
  )
  a(
    "--order-value",
    type=float,
    default=0.25,
    help="its rate (in [0, 1)) or, for uout, its beta (>= 0)",
  )
  a("--order-seeds", type=int, default=None, help="seeds per order (default 3, --full 5)")
  a(
    "--order-epochs",
    type=int,
    default=None,
    help="epochs of the order sweep, on the full training set, batch 128, ELU (default 20, "
    "--quick 1)",
  )
  a(
    "--margin",
    type=float,
    default=1.0,
    help="equivalence margin in accuracy points for 'no difference' claims (TOST)",
  )
  a(
    "--target",
    type=float,
    default=2.0,
    help="interval half-width in points the output computes seed counts for",
  )
  a(
    "--theory-samples",
    type=int,
    default=None,
    help="Monte Carlo samples per theory check (default 2**20, --quick 2**14)",
  )
  a("--out-dir", default=None, help="run folder (default runs/compare_dropout/<time>)")
  a(
    "--quick",
    action="store_true",
    help="smoke run: 2 seeds, 2 epochs, 256 training samples, small Monte Carlo (explicit "
    "options win)",
  )
  a(
    "--vmap",
    action=argparse.BooleanOptionalAction,
    default=None,
    help="train a group's runs in one jax.vmap (default: on for GPU/TPU, off on CPU)",
  )
  a("--no-progress", action="store_true", help="no progress bar")
  return p


def parse_args(argv=None) -> argparse.Namespace:
  p = build_parser()
  args = p.parse_args(argv)
  given = {k for k, v in vars(args).items() if v is not None}
  for k, v in (QUICK if args.quick else {}).items():
    if k not in given:
      setattr(args, k, v)
  for k, v in (FULL if args.full else {}).items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  defaults = {
    "seeds": 5,
    "aux_seeds": 3,
    "epochs": 60,
    "order_seeds": 3,
    "order_epochs": 20,
    "theory_samples": 2**20,
  }
  for k, v in defaults.items():
    if getattr(args, k) is None:
      setattr(args, k, v)
  if args.train_size is None:
    args.train_size = DEFAULT_TRAIN_SIZE.get(args.dataset)
  args.experiments = _experiment_list(p, args)
  _check(p, args)
  if args.vmap is None:
    import jax  # pylint: disable=import-outside-toplevel

    args.vmap = jax.default_backend() != "cpu"
  return args


def _experiment_list(p, args) -> tuple[str, ...]:
  if args.experiments is None:
    names = list(ALL if args.full else DEFAULT)
  else:
    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = [n for n in names if n not in ALL]
    if unknown or not names:
      p.error(f"--experiments: unknown {unknown or names}; choose from {','.join(ALL)}")
  if args.orders and "orders" not in names:
    names.append("orders")
  if "recalibration" in names and "headline" not in names:
    names.insert(names.index("recalibration"), "headline")
  return tuple(n for n in ALL if n in names)


def _check(p, args) -> None:
  for name in (
    "seeds",
    "aux_seeds",
    "epochs",
    "order_seeds",
    "order_epochs",
    "batch_size",
    "theory_samples",
  ):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
  if args.data_dir is not None and args.dataset in data_lib.BUILT_IN_DATASETS:
    p.error(f"--data-dir applies to the TFDS datasets, not {args.dataset} (it is built in)")
  if args.train_size is not None and args.train_size < args.batch_size:
    p.error(f"--train-size must be >= --batch-size ({args.batch_size}); got {args.train_size}")
  for name in ("lr", "margin", "target"):
    value = getattr(args, name)
    if not (math.isfinite(value) and value > 0):
      p.error(f"--{name} must be a finite number > 0; got {value}")
  if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
    p.error(f"--weight-decay must be a finite number >= 0; got {args.weight_decay}")
  v = args.order_value
  if args.order_noise == "uout":
    if not (math.isfinite(v) and v >= 0):
      p.error(f"--order-value (uout beta) must be a finite number >= 0; got {v}")
  elif not 0 <= v < 1:
    p.error(f"--order-value ({args.order_noise} rate) must be in [0, 1); got {v}")
  if args.orders:
    try:
      args.order_list = experiments.order_list(args.orders)
    except ValueError as err:
      p.error(f"--orders: {err}")
  else:
    args.order_list = experiments.order_list(None)


def _load(args):
  data = data_lib.load_dataset(args.dataset, data_dir=args.data_dir)
  if args.train_size is not None:
    n = len(data["x_train"])
    if args.quick:
      args.train_size = min(args.train_size, n)
    if args.train_size > n:
      raise data_lib.DatasetUnavailableError(
        f"--train-size {args.train_size} exceeds the {n} training examples of {args.dataset}"
      )
    subset = data_lib.load_dataset(args.dataset, data_dir=args.data_dir, train_size=args.train_size)
    return subset, data
  return data, data


def _run_epochs(args, n_orders: int) -> int:
  def grid(name, fn):
    return len(fn(*QUICK_GRIDS[name].values()) if args.quick else fn())

  aux = args.aux_seeds * args.epochs
  counts = {
    "headline": len(experiments.headline_configs()) * args.seeds * args.epochs,
    "dose": grid("dose", experiments.dose_configs) * aux,
    "width": grid("width", experiments.width_configs) * aux,
    "depth": grid("depth", experiments.depth_configs) * aux,
    "orders": n_orders * args.order_seeds * args.order_epochs,
  }
  return sum(v for k, v in counts.items() if k in args.experiments)


def run(args) -> dict:
  t0 = time.perf_counter()
  record: dict = {
    "args": {k: v for k, v in vars(args).items()},
    "experiments": {},
    "environment": environment.describe(),
    "timings": {},
  }
  claims = []
  if "theory" in args.experiments:
    t = time.perf_counter()
    rows = theory.run_theory_checks(n=args.theory_samples)
    record["experiments"]["theory"] = {"rows": rows, "text": theory.format_theory(rows)}
    claims += experiments.theory_claims(rows)
    record["timings"]["theory"] = time.perf_counter() - t
  training = [e for e in args.experiments if e != "theory"]
  if training:
    data, full = _load(args)
    record["dataset"] = {
      "name": data["name"],
      "train_size": len(data["x_train"]),
      "test_size": len(data["x_test"]),
    }
    settings = Settings(
      epochs=args.epochs,
      batch_size=args.batch_size,
      lr=args.lr,
      weight_decay=args.weight_decay,
      activation=args.activation,
      vmap=args.vmap,
    )
    from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel

    with tqdm(
      total=_run_epochs(args, len(args.order_list)),
      desc="training (run-epochs)",
      disable=args.no_progress,
      file=sys.stderr,
    ) as bar:
      ctx = experiments.Context(
        data,
        list(range(args.seeds)),
        settings,
        bar,
        margin=args.margin / 100,
        target_half_width=args.target / 100,
        shift_batches=experiments._shift_batches(data),
      )
      claims += _train_experiments(args, ctx, full, record)
  record["claims"] = [c.__dict__ for c in claims]
  record["elapsed_seconds"] = time.perf_counter() - t0
  return {"record": record, "claims": claims}


def _train_experiments(args, ctx, full, record) -> list:
  claims, results = [], record["experiments"]
  aux = list(range(args.aux_seeds))
  for name in args.experiments:
    if name == "theory":
      continue
    t = time.perf_counter()
    if name == "headline":
      out = experiments.run_headline(ctx)
    elif name == "recalibration":
      out = experiments.run_recalibration(ctx, results["headline"])
    elif name == "orders":
      order_settings = Settings(
        epochs=args.order_epochs,
        batch_size=min(128, len(full["x_train"])),
        lr=args.lr,
        weight_decay=args.weight_decay,
        activation="elu",
        vmap=args.vmap,
      )
      out = experiments.run_orders(
        ctx,
        args.order_list,
        args.order_noise,
        args.order_value,
        data=full,
        settings=order_settings,
        seeds=list(range(args.order_seeds)),
      )
    else:
      grid = QUICK_GRIDS[name] if args.quick else {}
      out = experiments.EXPERIMENTS[name](ctx, seeds=aux, **grid)
    results[name] = out
    claims += out["claims"]
    record["timings"][name] = time.perf_counter() - t
  return claims


def write(result: dict, run_dir: str) -> list[str]:
  record, claims = result["record"], result["claims"]
  os.makedirs(run_dir, exist_ok=True)
  with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1, default=_json_default)
  rows = [
    r
    for name, e in record["experiments"].items()
    if name != "theory"
    for r in e.get("rows", [])
    if "test_acc" in r
  ]
  if rows:
    with open(os.path.join(run_dir, "results.csv"), "w", newline="", encoding="utf-8") as f:
      fields = [k for k in rows[0] if not isinstance(rows[0][k], (dict, list))]
      writer = csv.DictWriter(f, fields, extrasaction="ignore")
      writer.writeheader()
      writer.writerows(rows)
  env = record["environment"]
  cpu = env.get("cpu_details") or {}
  header = (
    f"# Claims tested by `compare_dropout.py`\n\nRun of {record['date']} on "
    f"{env['cpu']} (family {cpu.get('family')} model {cpu.get('model')}, "
    f"{' '.join(cpu.get('simd', []))}; {env['cpu_count']} cores), {env['backend']}, "
    f"jax {env['jax']}, "
    f"flax {env['flax']}, regjax {env['regjax']}; {record['elapsed_seconds']:.0f} s. "
    f"Experiments: {', '.join(record['experiments'])}."
  )
  with open(os.path.join(run_dir, "claims.md"), "w", encoding="utf-8") as f:
    f.write(to_markdown(claims, header))
  from study import plots  # pylint: disable=import-outside-toplevel

  return plots.plot_all(record, run_dir)


def _json_default(o):
  if isinstance(o, Config):
    return o.label
  if hasattr(o, "tolist"):
    return o.tolist()
  if isinstance(o, (set, tuple)):
    return list(o)
  return str(o)


def main(argv=None) -> dict:
  args = parse_args(argv)
  try:
    result = run(args)
  except data_lib.DatasetUnavailableError as err:
    print(f"error: {err}", file=sys.stderr)
    raise SystemExit(2) from None
  record = result["record"]
  record["date"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  run_dir = args.out_dir or os.path.join(
    "runs", "compare_dropout", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  )
  plots = write(result, run_dir)
  print_report(record, run_dir, plots)
  return record


def print_report(record, run_dir, plots) -> None:
  ds = record.get("dataset")
  print()
  if ds:
    print(f"{ds['name']}: {ds['train_size']} train / {ds['test_size']} test")
  for name, e in record["experiments"].items():
    print(f"\n== {name} ({record['timings'][name]:.0f} s) ==\n{e['text']}")
  print(f"\nclaims: {run_dir}/claims.md")
  with open(os.path.join(run_dir, "claims.md"), encoding="utf-8") as f:
    print(f.read())
  print(
    f"results: {run_dir}/results.json, results.csv; plots: "
    + ", ".join(os.path.basename(p) for p in plots)
  )
  print(f"total {record['elapsed_seconds']:.0f} s")
