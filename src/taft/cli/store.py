"""The store commands of `taft`: shards train, compose, forget, store verify|info|ids|resume, report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from taft.cli.parser import (add_backbone_args, add_compute_args, add_data_args, add_evaluation_args,
                             add_executor_args, add_feature_args, add_log_arg, add_training_args, cache_dtype,
                             check_executor_options, compute_device, data_source, dp_config_from_args, execution,
                             feature_source, load_backbone_from, model_spec, open_dataset, train_config)
from taft.cli import store_growth
from taft.cli.interrupt import interruptible
from taft.cli.run import check_classes
from taft.spec import LINEAR_METHODS
from taft.cli.types import nonnegative_int, positive_int
from taft.errors import TaftError


def add_parsers(sub) -> None:
    """The store commands' sub-parsers."""
    from taft.store import PLAN_KINDS, SHARD_MIN_STEPS, WEIGHTINGS

    p = sub.add_parser("shards", help="train a model store of K shards in parallel")
    shards_sub = p.add_subparsers(dest="shards_command", required=True, metavar="SUBCOMMAND")
    p = shards_sub.add_parser(
        "train", help="train K shards in parallel into a model store and compose them",
        description="Split the data into K shards (seeded, stratified), train one Δw per shard on the shared "
                    "trunk-feature cache, compose them, and write a model store (manifest.json, shards/, "
                    "composed.safetensors, forgotten.json, audit.jsonl).")
    add_data_args(p, "train")
    p.add_argument("--store", type=Path, required=True, help="new (or empty) store directory")
    p.add_argument("--shards", type=positive_int, default=4, help="number of shards K (default 4)")
    p.add_argument("--plan", choices=PLAN_KINDS, default="random",
                   help="random: class-stratified balanced shards (default); class: whole classes per shard")
    p.add_argument("--plan-from", type=Path, metavar="FILE_OR_STORE",
                   help="reuse the shard plan of a store (or a plan JSON), restricted to the data's ids; a store's "
                        "--threads too (rebuild a store without forgotten ids)")
    p.add_argument("--weighting", choices=WEIGHTINGS, default="uniform", help="composition weights (default uniform)")
    p.add_argument("--val-data", type=Path, help="held-out image folder or text table: the composed model's top-1 on "
                                                 "it is printed (default: on the training data; nothing with --dp)")
    p.add_argument("--threads", type=positive_int, help="torch threads per shard (default max(1, cores // workers)); part of "
                                               "the recipe: retraining reuses it")
    add_executor_args(p)
    add_backbone_args(p)
    add_training_args(p, methods=LINEAR_METHODS, shards=True, min_steps=SHARD_MIN_STEPS)
    add_log_arg(p)
    p.epilog = ("With --dp every shard is trained with DP-SGD on its own disjoint data (the budget is per shard; "
                "--delta must be below 1/n of each shard) and the store records the guarantee of the composed model "
                "(the max over shards). --weighting size is refused with --dp. A DP store is not bit-reproducible "
                "unless --dp-seed is given (each shard's DP-SGD seed is then derived from it).")
    add_compute_args(p, autocast=True, threads=False)
    add_feature_args(p, loader_workers=False)
    p.set_defaults(func=cmd_shards_train)

    p = sub.add_parser("merge", help="task arithmetic: Δw = Σ wᵢ Δwᵢ of taft or probe checkpoints on one base "
                                     "(any real weights; negative ones subtract a task), exact")
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CKPT")
    p.add_argument("--weights", help="one real weight per checkpoint, e.g. 1,-1 or 0.5,0.5 (default 1/n each)")
    p.add_argument("--out", type=Path, required=True, help="the merged checkpoint (an ordinary checkpoint)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("compose", help="compose a store's shards (uniform, by size, or a subset)")
    p.add_argument("store", type=Path)
    p.add_argument("--weighting", choices=WEIGHTINGS, help="uniform or size (default: the store's current)")
    p.add_argument("--shards", help="compose only these shards, e.g. 0,2,5 (default: all trained shards)")
    p.add_argument("--out", type=Path, help="write the composed checkpoint here and leave the store unchanged")
    p.set_defaults(func=cmd_compose)

    p = sub.add_parser("forget", help="remove example ids from a store (drop or retrain their shards)")
    p.add_argument("store", type=Path)
    p.add_argument("--ids", type=Path, required=True, help="file of ids: one per line, or a JSON list")
    p.add_argument("--mode", choices=["drop", "retrain"], required=True,
                   help="drop: remove the shards holding the ids from the composition (no training); retrain: "
                        "retrain only those shards without the ids")
    add_accept_changed_data_arg(p)
    add_executor_args(p)
    add_log_arg(p)
    add_compute_args(p, threads=False)
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("store", help="inspect, verify or repair a model store")
    store_sub = p.add_subparsers(dest="store_command", required=True, metavar="SUBCOMMAND")
    p = store_sub.add_parser("verify", help="check a store against its manifest (and repair it)")
    p.add_argument("store", type=Path)
    p.add_argument("--repair", action="store_true", help="fix what needs no training: finish a committed "
                   "operation, recompute the composed model, rewrite forgotten.json, cut a torn audit line, remove "
                   "unreferenced files")
    p.set_defaults(func=cmd_store_verify)
    p = store_sub.add_parser("info", help="what a store holds")
    p.add_argument("store", type=Path)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_store_info)
    p = store_sub.add_parser("ids", help="list a store's example ids, one per line (e.g. to pick ids to forget)",
                             description="The example ids a store holds, one per line, shard by shard (forgotten "
                                         "ids removed). Ids are what the data gives: a folder's image paths "
                                         "(airplane/0000.jpg), a table's --id-column or <file stem>:<row>, "
                                         "Fashion-MNIST's train/<index>.")
    p.add_argument("store", type=Path)
    p.add_argument("--shard", type=nonnegative_int, metavar="N", help="only shard N's ids")
    p.add_argument("--forgotten", action="store_true", help="list the forgotten ids instead")
    p.set_defaults(func=cmd_store_ids)
    p = store_sub.add_parser("resume", help="complete an interrupted store operation")
    p.add_argument("store", type=Path)
    add_accept_changed_data_arg(p)
    add_executor_args(p)
    add_compute_args(p, threads=False)
    p.set_defaults(func=cmd_store_resume)
    store_growth.add_parsers(store_sub)

    p = sub.add_parser("report", help="write a Markdown report (with PNG plots) of a store",
                       description="Shard sizes, per-shard and composed accuracy on labelled data (when --data or "
                                   "--dataset is given), and the audit log, as report.md plus PNG plots.")
    p.add_argument("store", type=Path)
    p.add_argument("--out", type=Path, help="report directory (default: <store>-report beside the store)")
    add_evaluation_args(p)
    p.set_defaults(func=cmd_report)


def add_accept_changed_data_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accept-changed-data", action="store_true",
                   help="retrain even if the examples of the shards to retrain changed in the data source since the "
                        "store was trained (features rebuilt from it); noted in the audit log")


def cmd_shards_train(args: argparse.Namespace) -> None:
    """Train a model store: K shards in parallel on one trunk-feature cache entry, composed."""
    from taft.model import Classifier
    from taft.store import ModelStore
    from taft.store.create import check_dp
    from taft.train.sources import chosen_mode
    from taft.wording import counted
    from taft.store.store import reused_plan

    device = compute_device(args)
    dp = dp_config_from_args(args)
    check_dp(dp, args.weighting)  # before the features are computed
    check_executor_options(args)
    backbone = load_backbone_from(args)
    spec, config = model_spec(args, backbone), train_config(args)
    dataset = open_dataset(args, backbone)
    model = Classifier.from_spec(backbone, dataset.class_names, spec)
    if chosen_mode(model, dataset, feature_source(args), config.augment, "training data") == "stream":
        features = dataset  # every shard runs the trunk on its own batches; nothing is cached
    else:
        features = model.to(device).cache_features(dataset, dtype=cache_dtype(args), autocast=args.autocast,
                                                   progress=not args.quiet)
    plan, threads = args.plan, args.threads
    if args.plan_from is not None:
        plan, plan_threads = reused_plan(args.plan_from, features.ids)
        threads = threads if threads is not None else plan_threads  # a store's threads: the same float summation
    with interruptible(args.store):
        store = ModelStore.create(args.store, features, model, config,
                                  shards=None if args.plan_from else args.shards, plan=plan, threads=threads,
                                  min_steps=args.min_steps, weighting=args.weighting, source=data_source(args), dp=dp,
                                  execution=execution(args))
    info = store.info()
    trained = [s["index"] for s in info["shards"] if s["status"] == "trained"]
    print(f"store {args.store}: {len(trained)} of {counted(info['plan']['k'], 'shard')} trained on "
          f"{counted(info['plan']['n'], 'example')} ({args.method} k={args.k}); composed model: "
          f"{args.store / 'composed.safetensors'}")
    if args.val_data is not None or (dp is None and features is not dataset):  # a private store releases no
        composed_summary(store, model, features, args)                      # statistic of its training data
    if info.get("privacy"):
        from taft.privacy import describe

        print(f"privacy: {describe(info['privacy'])}")


def composed_summary(store, model, features, args: argparse.Namespace) -> None:
    """Print the composed model's top-1 on --val-data (or on the training data), with the at-chance warning."""
    from dataclasses import replace

    import torch

    from taft.train import evaluate
    from taft.train.trainer import warn_if_at_chance
    from taft.wording import counted

    composed = store.load_composed(model.backbone).classifier.to(model.device)
    data, split = features, "training"
    if args.val_data is not None:
        val = replace(data_source(args), path=args.val_data, dataset=None).open(composed)
        data, split = composed.cache_features(val, dtype=cache_dtype(args), autocast=args.autocast,
                                              progress=not args.quiet), "validation"
    result = evaluate(composed, data)
    print(f"composed model: {split} top-1 {100 * result.top1:.2f}% on {counted(len(data), 'example')}")
    warn_if_at_chance(result.top1, torch.tensor(list(data.labels)), split)


def _shards_list(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise TaftError(f"--shards takes shard indices separated by commas, e.g. 0,2,5; got {text!r}") from e


def shard_list(shards: list[int]) -> str:
    """"shard [3]", "shards [0, 2]"."""
    return f"{'shard' if len(shards) == 1 else 'shards'} {shards}"


def cmd_merge(args: argparse.Namespace) -> None:
    from taft.checkpoint import checkpoint_content_sha256
    from taft.store import merge_checkpoints

    weights = None
    if args.weights is not None:
        try:
            weights = [float(w) for w in args.weights.split(",")]
        except ValueError as e:
            raise TaftError(f"--weights takes numbers separated by commas, e.g. 1,-1; got {args.weights!r}") from e
    if args.out.exists() and any(args.out.resolve() == c.resolve() for c in args.checkpoints):
        raise TaftError(f"--out {args.out} is one of the checkpoints to merge; write the result elsewhere")
    path = merge_checkpoints(args.checkpoints, weights, args.out)
    shown = ", ".join(f"{w:g}" for w in (weights or [1 / len(args.checkpoints)] * len(args.checkpoints)))
    print(f"merged {len(args.checkpoints)} checkpoints with weights {shown} into {path} "
          f"(content sha256 {checkpoint_content_sha256(path)[:16]}…)")


def cmd_compose(args: argparse.Namespace) -> None:
    from taft.store import ModelStore

    if args.out is not None and args.out.resolve().is_relative_to(args.store.resolve()):
        raise TaftError(f"--out {args.out} is inside the store; export to a file outside it, or leave out --out "
                        "to change the store's own composition")
    store = ModelStore(args.store)
    generation = store.manifest.generation
    path = store.compose(weighting=args.weighting, shards=_shards_list(args.shards), out=args.out)
    if args.out is None:
        info = store.info()
        c = info["composed"]
        what = f"{shard_list(c['shards'])} ({info['composition']['weighting']})"
        if info["generation"] == generation:
            print(f"nothing to do: already composed with {what} in {path}")
            return
        print(f"composed {what} into {path} (content sha256 {c['content_sha256'][:16]}…)")
    else:
        print(f"wrote {path}")


def cmd_forget(args: argparse.Namespace) -> None:
    from taft.store import ModelStore, read_ids
    from taft.wording import counted

    device = compute_device(args)
    ids = read_ids(args.ids)
    check_executor_options(args)
    store = ModelStore(args.store)
    m = store.manifest
    retrained = [i for i in m.holding(ids) if m.retrainable(i)] if args.mode == "retrain" else []
    features = store.training_features(shards=retrained, device=device, progress=not args.quiet) if retrained else None
    with interruptible(args.store):
        r = store.forget(ids, args.mode, features=features, execution=execution(args),
                         accept_changed_data=args.accept_changed_data)
    if r.noop:
        print(f"nothing to do: {'the id was' if len(r.already) == 1 else f'all {len(r.already)} ids were'} already "
              "forgotten (logged)")
        return
    what = "dropped" if r.mode == "drop" else "retrained"
    info = store.info()
    content = (info["composed"] or {}).get("content_sha256")
    print(f"forgot {counted(len(r.forgotten), 'id')} ({len(r.already)} already forgotten); {what} "
          f"{shard_list(r.shards)}; "
          f"composed content sha256 {content[:16] + '…' if content else 'none (no shard left)'}"
          + ("; completed an interrupted forget" if r.resumed else ""))
    if r.undated:
        were = "was" if len(r.undated) == 1 else "were"
        print(f"{shard_list(r.undated)} {were} imported without training data: dropped instead of retrained")
    privacy = info.get("privacy")
    if privacy:
        from taft.privacy import describe

        print(f"privacy: {describe(privacy)}")


def cmd_store_verify(args: argparse.Namespace) -> None:
    from taft.store import ModelStore
    from taft.store.store import is_store

    store = ModelStore(args.store)
    if args.store.is_dir() and not is_store(args.store) and store.creation() is None:
        raise TaftError(f"{args.store} is not a model store (no manifest.json); nothing to verify or repair")
    report = store.verify(repair=args.repair)
    for line in report.lines():
        print(line)
    if not report.ok:
        raise TaftError(f"store {args.store} has {len(report.problems)} problem(s)"
                        + ("" if args.repair else "; see above, or run with --repair"))


def cmd_store_ids(args: argparse.Namespace) -> None:
    from taft.store import ModelStore

    store = ModelStore(args.store)
    for i in (store.forgotten if args.forgotten else store.ids(args.shard)):
        print(i)


def cmd_store_info(args: argparse.Namespace) -> None:
    from taft.store import ModelStore
    from taft.wording import counted

    store = ModelStore(args.store)
    creation = store.creation()
    if creation is not None:  # no manifest yet: nothing else to show
        line = (f"store {args.store} is being created: its creation (started {creation.time}) was interrupted, "
                f"{creation.progress()}; rerun the same `taft shards train` command, or `taft store resume "
                f"{args.store}`, to finish it")
        print(json.dumps({"store": str(store.root), "creation": creation.describe(),
                          "progress": creation.progress()}, indent=1) if args.json else line)
        return
    info = store.info()
    if args.json:
        print(json.dumps(info, indent=1))
        return
    cfg = info["train_config"]
    print(f"store        {info['store']} (generation {info['generation']}, updated {info['updated']})")
    print(f"model        {info['method']} k={info['tangent_blocks']} on {info['backbone']} "
          f"(fingerprint {info['fingerprint'][:16]}…)")
    print(f"classes      {len(info['class_names'])}: {', '.join(info['class_names'][:12])}")
    print(f"training     {', '.join(f'{k}={v}' for k, v in sorted(cfg.items()))}; threads {info['threads']}")
    p = info["plan"]
    print(f"plan         {p['kind']}, {p['k']} shards, seed {p['seed']}, {p['n']} examples")
    for s in info["shards"]:
        eps = ""
        if "dp" in info:  # the shard's ε (all its releases); "-" for none, or no finite guarantee
            e = (s.get("privacy") or {}).get("epsilon")
            eps = f"ε={'-' if e is None else format(e, '.4g'):<8} "
        print(f"  shard {s['index']:>3}  {s['status']:<8} n={s['n']:<6} seed={s['seed']:<11} {eps}"
              f"{s['file'] or '-'}")
    c = info["composition"]
    print(f"composition  {c['weighting']}, shards {c['members']}" + (" (subset)" if c.get("subset") else ""))
    comp = info["composed"]
    print(f"composed     {comp['file']} content sha256 {comp.get('content_sha256', '?')[:16]}… (tensors; file "
          f"sha256 {comp['sha256'][:16]}…, {comp['n']} examples)" if comp else "composed     none")
    if "dp" in info:
        from taft.privacy import describe

        print(f"privacy      {describe(info['privacy']) if info['privacy'] else 'none (no shard composed)'}")
    for a in info.get("additions", []):
        source = (a["data"].get("source") or {})
        where = source.get("data") or source.get("dataset") or ("no data: drop-only" if a["op"] == "import" else "-")
        print(f"{a['op']:<12} {a['time']}: {shard_list(a['shards'])} ({where})"
              + (f", re-added {counted(len(a['readded']), 'forgotten id')}" if a.get("readded") else ""))
    print(f"forgotten    {counted(info['forgotten'], 'id')}; audit log {counted(info['audit_entries'], 'entry', 'entries')}")
    if info["pending"]:
        print(f"pending      interrupted {info['pending']} (taft store resume {args.store})")


def cmd_store_resume(args: argparse.Namespace) -> None:
    from taft.store import ModelStore

    check_executor_options(args)
    device = compute_device(args)
    store = ModelStore(args.store)
    features = store.training_features(device=device, progress=not args.quiet) if store.resume_retrains() else None
    with interruptible(args.store):
        done = store.resume(features=features, execution=execution(args), accept_changed_data=args.accept_changed_data)
    print(done)


def cmd_report(args: argparse.Namespace) -> None:
    from taft.store import ModelStore
    from taft.store.report import write_report

    device = compute_device(args)
    features = None
    if args.data is not None or args.dataset is not None:
        classifier, _ = ModelStore(args.store).load_composed()
        dataset = open_dataset(args, classifier)
        check_classes(dataset.class_names, classifier.class_names)
        features = classifier.to(device).cache_features(dataset, autocast=args.autocast, progress=not args.quiet)
    out = args.out or args.store.with_name(args.store.name + "-report")
    print(f"report: {write_report(args.store, out, features, device=device)}")
