"""The commands that grow a store: `taft store add` (new examples become new shards) and `taft store import`
(checkpoints trained elsewhere become shards)."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from taft.cli.parser import (add_compute_args, add_data_args, add_executor_args, add_log_arg,
                             check_executor_options, compute_device, data_source, execution)
from taft.cli.interrupt import interruptible
from taft.cli.types import positive_int
from taft.errors import TaftError


def add_parsers(store_sub) -> None:
    """`store add` and `store import`, under `taft store`."""
    from taft.store import PLAN_KINDS

    p = store_sub.add_parser(
        "add", help="add new examples to a store as new shards (nothing already trained is retrained)",
        description="The new examples become new shards trained with the store's recipe, then the store recomposes. "
                    "Their classes must be the store's; an id the store holds, or forgot, is refused.")
    p.add_argument("store", type=Path)
    add_data_args(p, "train")
    p.add_argument("--shards", type=positive_int, metavar="M",
                   help="number of new shards (default: as many as keep the store's mean shard size)")
    p.add_argument("--plan", choices=PLAN_KINDS, help="how the new examples are split (default: the store's plan kind)")
    p.add_argument("--readd-forgotten", action="store_true",
                   help="train again on ids the store forgot (refused otherwise); written to the audit log")
    add_executor_args(p)
    add_log_arg(p)
    add_compute_args(p, threads=False)
    p.set_defaults(func=cmd_store_add)

    p = store_sub.add_parser(
        "import", help="make checkpoints trained elsewhere (same base and recipe) shards of a store",
        description="Each checkpoint (a `taft train` run or another store's shard, on the store's backbone, method, "
                    "k, pooling, base head, classes and recipe: anything else is named and refused) becomes a new "
                    "shard, its file copied unchanged. Without --data/--dataset it is drop-only: forgetting an id it "
                    "holds drops it. With its data it can be retrained.")
    p.add_argument("store", type=Path)
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CKPT")
    add_data_args(p, "train")
    p.add_argument("--readd-forgotten", action="store_true",
                   help="accept checkpoints trained on ids the store forgot (refused otherwise); logged")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_compute_args(p, threads=False)
    p.set_defaults(func=cmd_store_import)


def features_for(store, args: argparse.Namespace, backbone, check=None):
    """(trunk features of the data the arguments name, its source): opened in the store's classes (`check(dataset)`
    runs before the trunk does), built like the creation's features (its cache dtype and autocast); for a store
    that streams, the dataset itself (its shards run the trunk on every batch)."""
    import torch

    created = store.data_source
    source = data_source(args)
    if created is not None:
        source = replace(source, cache_dtype=created.cache_dtype, autocast=created.autocast)
    model = store.template(backbone)
    dataset = source.open(model)
    if check is not None:
        check(dataset)
    if (store.manifest.data.get("features") or {}).get("streamed"):
        return dataset, source
    dtype = {"float32": torch.float32, "float16": torch.float16}[source.cache_dtype]
    features = model.to(compute_device(args)).cache_features(dataset, dtype=dtype, autocast=source.autocast,
                                                             progress=not args.quiet)
    return features, source


def cmd_store_add(args: argparse.Namespace) -> None:
    from taft.store import ModelStore
    from taft.store.add import check_new_ids
    from taft.wording import counted

    if args.data is None and args.dataset is None:
        raise TaftError("give the new examples with --data or --dataset")
    check_executor_options(args)
    store = ModelStore(args.store)
    backbone = store.backbone()
    m = store.manifest
    features, source = features_for(store, args, backbone, lambda d: check_new_ids(m, d.ids, args.readd_forgotten))
    with interruptible(args.store):
        r = store.add(features, shards=args.shards, plan=args.plan, source=source, backbone=backbone,
                      readd_forgotten=args.readd_forgotten, execution=execution(args))
    info = store.info()
    again = f"; re-added {counted(len(r.readded), 'forgotten id')}" if r.readded else ""
    print(f"added {counted(r.n, 'example')} to store {args.store} as {'shard' if len(r.shards) == 1 else 'shards'} "
          f"{r.shards}{again}; composed content sha256 {info['composed']['content_sha256'][:16]}…"
          + ("; completed an interrupted addition" if r.resumed else ""))


def cmd_store_import(args: argparse.Namespace) -> None:
    from taft.store import ModelStore
    from taft.wording import counted

    store = ModelStore(args.store)
    features = source = None
    if args.data is not None or args.dataset is not None:
        features, source = features_for(store, args, store.backbone())
    with interruptible(args.store):
        r = store.import_checkpoints(args.checkpoints, features=features, source=source,
                                     readd_forgotten=args.readd_forgotten)
    info = store.info()
    how = "retrainable (their data is recorded)" if r.retrainable else "drop-only (no data given)"
    print(f"imported {counted(len(r.shards), 'checkpoint')} into store {args.store} as shards {r.shards} "
          f"({counted(r.n, 'example')}; {how}); composed content sha256 {info['composed']['content_sha256'][:16]}…"
          + ("; completed an interrupted import" if r.resumed else ""))
    if info.get("privacy"):
        from taft.privacy import describe

        print(f"privacy: {describe(info['privacy'])}")
