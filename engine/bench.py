"""`lethe bench`: unlearning quality and cost of every method against retraining.

For each seed the original model is trained once (cached under `--cache`), then K reference
models for the per-sample membership test (`engine.references`, cached too; their cost is
reported against one training of the original), the scenario's forget set is drawn, `retrain`
runs as the gold standard, then every method runs on the same original and is verified with
the same metrics, on the `audit` half of the held-out split only (methods read `calibration`).
Printed: mean ± std over seeds of acc_forget / acc_retain / acc_test / mia_forget (percent),
the avg gap to retrain in points, the per-sample test's forget flag rate against retrain's,
the never-trained control's and the original model's (the test's power), js_original,
seconds and time ratio (seconds / retrain seconds, measured in the same run).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from engine.archs import Classifier
from engine.balance import BALANCERS
from engine.checkpoint import load_model, state_to_bytes
from engine.datasets import Dataset, DatasetSpec, load_dataset
from engine.evidence import ReferenceStats
from engine.methods import DEFAULT_METHOD, METHODS
from engine.metrics import GAP_NAMES, gaps
from engine.references import DEFAULT_K, train_references
from engine.runtime import DeviceData, pick_device
from engine.training import Recipe, timed_train
from engine.unlearning import unlearn

SCENARIOS = ("random", "class", "small")
DEFAULT_ARCH = {"mnist5k": "small_cnn", "mnist": "small_cnn", "fashion_mnist": "small_cnn"}
RANDOM_FRACTION = 0.10
SMALL_COUNT = 10


def forget_set(dataset: Dataset, scenario: str, seed: int) -> npt.NDArray[np.int64]:
    """The scenario's forget set, drawn reproducibly from `seed`."""
    train = dataset.train_indices
    rng = np.random.default_rng([seed, SCENARIOS.index(scenario)])
    if scenario == "random":
        return np.sort(rng.choice(train, size=round(RANDOM_FRACTION * len(train)), replace=False))
    if scenario == "small":
        return np.sort(rng.choice(train, size=SMALL_COUNT, replace=False))
    if scenario == "class":
        chosen: npt.NDArray[np.int64] = train[dataset.labels[train] == seed % dataset.num_classes]
        return chosen
    raise ValueError(f"unknown scenario {scenario!r}; known: {SCENARIOS}")


def original_model(
    arch: str, data: DeviceData, recipe: Recipe, cache: Path
) -> tuple[Classifier, float]:
    """Train (or load from the cache) the model every method starts from."""
    ds = data.dataset
    path = cache / f"{ds.name}-{arch}-{_cache_key(ds, arch, recipe)}.safetensors"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        model = load_model(arch, ds.num_classes, ds.input_shape, path, device=data.device)
        return model, float(json.loads(meta.read_text())["seconds"])
    model, _, seconds = timed_train(arch, ds.num_classes, data, ds.train_indices, recipe)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(state_to_bytes(model))
    meta.write_text(json.dumps({"seconds": seconds, "recipe": recipe.to_dict()}))
    return model, seconds


def _cache_key(ds: Dataset, arch: str, recipe: Recipe, *extra: Any) -> str:
    return hashlib.sha256(
        json.dumps([ds.fingerprint(), arch, recipe.to_dict(), *extra], sort_keys=True).encode()
    ).hexdigest()[:16]


def reference_statistics(
    arch: str, data: DeviceData, recipe: Recipe, cache: Path, k: int = DEFAULT_K
) -> ReferenceStats:
    """K reference models' OUT statistics over the training split (or the cached ones); their
    seconds are in `meta["seconds"]`."""
    ds = data.dataset
    path = cache / f"{ds.name}-{arch}-{_cache_key(ds, arch, recipe, 'references', k)}.npz"
    if path.exists():
        return ReferenceStats.from_bytes(path.read_bytes())
    stats = train_references(arch, ds.num_classes, data, ds.train_indices, recipe, k=k,
                             seed=recipe.seed)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(stats.to_bytes())
    return stats


Variant = tuple[str, str, dict[str, Any]]


def _variants(methods: Sequence[str], ablation: bool,
              extra: Sequence[Variant] = ()) -> list[Variant]:
    """(label, method, options) for each configuration to run; the ablation adds the default
    method once per balancer, `extra` any labelled variant (all share the run's retrain)."""
    runs: list[Variant] = [(m, m, {}) for m in methods if m != "retrain"]
    if ablation:
        runs += [(f"{DEFAULT_METHOD}[{b}]", DEFAULT_METHOD, {"balancer": b}) for b in BALANCERS]
    return runs + list(extra)


def parse_variant(text: str) -> Variant:
    """`method:key=value,key=value` (JSON values) -> a labelled variant, e.g.
    `feature_constraint:per_sample_targets=false`."""
    method, _, rest = text.partition(":")
    if method not in METHODS:
        raise SystemExit(f"unknown method {method!r} in variant {text!r}")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"variant option {item!r} is not key=value")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return text, method, options


def run_bench(
    *,
    dataset_kind: str,
    uri: str,
    scenarios: Sequence[str],
    seeds: int,
    methods: Sequence[str],
    ablation: bool,
    arch: str,
    recipe: Recipe,
    cache: Path,
    device: str | None,
    references: int = DEFAULT_K,
    log: Any = sys.stderr,
    on_record: Callable[[list[dict[str, Any]]], None] | None = None,
    first_seed: int = 0,
    variants: Sequence[Variant] = (),
) -> list[dict[str, Any]]:
    """Run the benchmark and return one record per (method, scenario, seed), plus one
    `{"method": "references", ...}` cost record per seed when `references` > 0.
    `on_record` is called with the records so far after each new one (partial results)."""
    records = _Records(on_record)
    dev = pick_device(device)
    for seed in range(first_seed, first_seed + seeds):
        ds = load_dataset(DatasetSpec(dataset_kind, uri, {"split_seed": seed}), dataset_kind)
        data = DeviceData(ds, dev)
        seed_recipe = Recipe(**{**recipe.to_dict(), "seed": seed})
        original, train_s = original_model(arch, data, seed_recipe, cache)
        log.write(f"seed {seed}: original model ready (trained in {train_s:.1f}s)\n")
        stats = None
        if references:
            stats = reference_statistics(arch, data, seed_recipe, cache, references)
            records.append(_cost_record(seed, stats, train_s, str(dev)))
            log.write(f"seed {seed}: {stats.k} references ready ({stats.meta['seconds']:.1f}s)\n")
        for scenario in scenarios:
            forget = forget_set(ds, scenario, seed)
            retain = np.setdiff1d(ds.train_indices, forget)
            common = dict(arch=arch, num_classes=ds.num_classes, data=data, forget_idx=forget,
                          retain_idx=retain, recipe=seed_recipe, teacher_seed=10_000 + seed,
                          seed=seed, reference_stats=stats)
            ref = unlearn(original, method="retrain", **common)  # type: ignore[arg-type]
            ref_metrics = ref.metrics
            ref_rec = _record("retrain", scenario, seed, ref_metrics, ref_metrics, {},
                              ref.evidence, ref.evidence)
            records.append(ref_rec)
            log.write(f"  {scenario}: retrain {ref.seconds:.2f}s{_flag_log(ref_rec)}\n")
            for label, method, options in _variants(methods, ablation, variants):
                res = unlearn(original, method=method, options=options, **common)  # type: ignore[arg-type]
                rec = _record(label, scenario, seed, res.metrics, ref_metrics, res.method_config,
                              res.evidence, ref.evidence)
                rec["extra"] = res.extra
                records.append(rec)
                log.write(f"  {scenario}: {label} {res.seconds:.2f}s avg_gap {rec['avg_gap']:.2f}"
                          f"{_flag_log(rec)}\n")
    return list(records)


class _Records(list[dict[str, Any]]):
    """A list of records that reports itself after every append."""

    def __init__(self, on_record: Callable[[list[dict[str, Any]]], None] | None) -> None:
        super().__init__()
        self._on_record = on_record

    def append(self, record: dict[str, Any]) -> None:
        super().append(record)
        if self._on_record is not None:
            self._on_record(list(self))


def _cost_record(seed: int, stats: ReferenceStats, train_seconds: float, device: str) -> dict[str, Any]:
    """The one-time cost of the reference statistics against one training of the original."""
    seconds = float(stats.meta["seconds"])
    return {
        "method": "references", "scenario": "-", "seed": seed, "k": stats.k,
        "seconds": seconds, "seconds_per_reference": stats.meta["seconds_per_reference"],
        "train_seconds": train_seconds, "ratio_to_training": seconds / train_seconds,
        "amortised_seconds": {str(n): seconds / n for n in (10, 100, 1000)},
        "pool_size": stats.meta["pool_size"], "device": device,
    }


def _flag_log(rec: dict[str, Any]) -> str:
    if rec.get("flag_forget") is None:
        return ""
    return (f" flags forget {rec['flag_forget']:.3f} control {rec['flag_control']:.3f} "
            f"original {rec['flag_original']:.3f}")


def _flag_fields(evidence: dict[str, Any] | None, retrain: dict[str, Any] | None) -> dict[str, Any]:
    """The per-sample test's rates (unlearned forget, control, original; retrain's forget)."""
    if not evidence or evidence.get("references", {}).get("status") != "ready":
        return {"flag_forget": None}
    out = {
        "flag_forget": evidence["forget"]["rate"],
        "flag_forget_interval": evidence["forget"]["interval"],
        "flag_control": evidence["control"]["rate"],
        "flag_original": evidence["original"]["rate"],
        "flag_control_original": evidence["control_original"]["rate"],
        "forget_vs_control_p": evidence["forget_vs_control_p"],
        "original_vs_control_p": evidence["original_vs_control_p"],
        "distinguishes": evidence["distinguishes"],
        "flag_n": evidence["forget"]["n"],
        "control_n": evidence["control"]["n"],
    }
    if retrain and retrain.get("references", {}).get("status") == "ready":
        out["retrain_flag_forget"] = retrain["forget"]["rate"]
        out["retrain_flag_forget_interval"] = retrain["forget"]["interval"]
    return out


def _record(
    method: str,
    scenario: str,
    seed: int,
    metrics: dict[str, Any],
    reference: dict[str, Any],
    config: dict[str, Any],
    evidence: dict[str, Any] | None = None,
    retrain_evidence: dict[str, Any] | None = None,
) -> dict[str, Any]:
    g = gaps(metrics, reference)
    return {
        "method": method,
        "scenario": scenario,
        "seed": seed,
        **{k: metrics[k] for k in ("acc_forget", "acc_retain", "acc_test", "mia_forget",
                                   "js_original", "zrf", "feature_distance",
                                   "seconds", "steps", "device")},
        "avg_gap": 100.0 * g["avg_gap"],
        "time_ratio": metrics["seconds"] / reference["seconds"],
        "retrain": {k: reference[k] for k in (*GAP_NAMES, "seconds")},
        **_flag_fields(evidence, retrain_evidence),
        "config": config,
    }


def _ms(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    arr = np.asarray(values, dtype=float) * scale
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def _flag_ms(rs: list[dict[str, Any]], key: str) -> str:
    values = [r[key] for r in rs if r.get(key) is not None]
    return _ms(values, 100, 1) if values else "-"


def format_table(records: list[dict[str, Any]]) -> str:
    """Markdown table per scenario (mean ± std over seeds), then the references' cost."""
    costs = [r for r in records if r["method"] == "references"]
    runs = [r for r in records if r["method"] != "references"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        groups[(r["scenario"], r["method"])].append(r)
    lines = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        n = len({r["seed"] for r in runs if r["scenario"] == scenario})
        lines += [
            f"\n### {scenario} ({n} seeds; accuracies, MIA and flag rates in %, mean ± std; "
            "accuracies on the audit split)\n",
            "| method | acc_forget | acc_retain | acc_test | mia_forget | avg gap (pt) "
            "| flag forget | flag retrain | flag control | flag original "
            "| js_original | seconds | time ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for (scen, method), rs in groups.items():
            if scen != scenario:
                continue
            label = method if len(rs) == n else f"{method} ({len(rs)} of {n} seeds)"
            lines.append(
                f"| {label} | {_ms([r['acc_forget'] for r in rs], 100)} "
                f"| {_ms([r['acc_retain'] for r in rs], 100)} "
                f"| {_ms([r['acc_test'] for r in rs], 100)} "
                f"| {_ms([r['mia_forget'] for r in rs], 100)} "
                f"| {_ms([r['avg_gap'] for r in rs])} "
                f"| {_flag_ms(rs, 'flag_forget')} | {_flag_ms(rs, 'retrain_flag_forget')} "
                f"| {_flag_ms(rs, 'flag_control')} | {_flag_ms(rs, 'flag_original')} "
                f"| {_ms([r['js_original'] for r in rs], 1, 4)} "
                f"| {_ms([r['seconds'] for r in rs])} "
                f"| {_ms([r['time_ratio'] for r in rs], 1, 3)} |"
            )
    if costs:
        k = costs[0]["k"]
        amortised = " / ".join(_ms([c["amortised_seconds"][n] for c in costs], 1, 2)
                               for n in ("10", "100", "1000"))
        lines += [
            f"\n### reference statistics (one-time cost per model, K = {k}, {len(costs)} seeds)\n",
            "| K references (s) | one training (s) | ratio | per request over 10 / 100 / 1,000 (s) |",
            "|---|---|---|---|",
            f"| {_ms([c['seconds'] for c in costs], 1, 1)} "
            f"| {_ms([c['train_seconds'] for c in costs], 1, 1)} "
            f"| {_ms([c['ratio_to_training'] for c in costs])} "
            f"| {amortised} |",
        ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lethe bench", description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist5k", help="dataset kind (mnist5k, cifar10, npz, ...)")
    p.add_argument("--uri", default="", help="dataset location for kinds read from disk")
    p.add_argument("--scenario", default="random",
                   help=f"one of {', '.join(SCENARIOS)}, a comma list, or 'all'")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run are first-seed .. first-seed + seeds - 1 (to split a run)")
    p.add_argument("--methods", default="all",
                   help="'all', 'none' (with --ablation) or a comma list of method names")
    p.add_argument("--ablation", action="store_true",
                   help=f"also run {DEFAULT_METHOD} with each balancer ({', '.join(BALANCERS)})")
    p.add_argument("--variant", action="append", default=[], type=parse_variant,
                   help="also run METHOD:key=value,... (repeatable; e.g. "
                        "feature_constraint:per_sample_targets=false)")
    p.add_argument("--references", type=int, default=DEFAULT_K,
                   help="K reference models for the per-sample test (0: skip the test)")
    p.add_argument("--arch", default=None, help="architecture (default: small_cnn / resnet18)")
    p.add_argument("--epochs", type=int, default=Recipe.epochs)
    p.add_argument("--lr", type=float, default=Recipe.lr)
    p.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    p.add_argument("--throughput", action="store_true",
                   help="time an unlearning step against a plain training step (resnet18, 32x32)")
    p.add_argument("--loops", action="store_true",
                   help="with --throughput: also time the shipped unlearning loop against train_model")
    p.add_argument("--throughput-batch", type=int, default=256)
    p.add_argument("--throughput-steps", type=int, default=20)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: auto)")
    p.add_argument("--cache", type=Path, default=Path("var/bench-cache"))
    p.add_argument("--json", type=Path, default=None, help="write one record per run here")
    p.add_argument("--suite", choices=["robust"], default=None,
                   help="run the robustness suite instead (`lethe bench --suite robust --help`)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--suite" in argv:
        from engine.suite import main as suite_main

        return suite_main(argv)
    args = build_parser().parse_args(argv)
    if args.throughput:
        from engine.throughput import measure

        result: dict[str, Any] = measure(arch=args.arch or "resnet18", batch_size=args.throughput_batch,
                                         steps=args.throughput_steps, device=args.device)
        if args.loops:
            from engine.throughput import measure_loops

            result = {"step": result, "loops": measure_loops(arch=args.arch or "resnet18",
                                                             device=args.device)}
        print(json.dumps(result, indent=1))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return 0
    scenarios = SCENARIOS if args.scenario == "all" else tuple(args.scenario.split(","))
    for s in scenarios:
        if s not in SCENARIOS:
            raise SystemExit(f"unknown scenario {s!r}; known: {', '.join(SCENARIOS)}")
    named = {"all": list(METHODS), "none": []}
    methods = named[args.methods] if args.methods in named else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    arch = args.arch or DEFAULT_ARCH.get(args.dataset, "resnet18")
    recipe = Recipe(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    records = run_bench(
        dataset_kind=args.dataset, uri=args.uri, scenarios=scenarios, seeds=args.seeds,
        methods=methods, ablation=args.ablation, arch=arch, recipe=recipe,
        cache=args.cache, device=args.device, references=args.references,
        first_seed=args.first_seed, variants=args.variant,
        on_record=(lambda rs: args.json.write_text(json.dumps(rs, indent=1))) if args.json else None,
    )
    print(f"lethe bench --dataset {args.dataset} --arch {arch} --seeds {args.seeds} "
          f"(device {records[0]['device'] if records else '?'}, torch {torch.__version__})")
    print(format_table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
