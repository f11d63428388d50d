"""`python -m lora_sweep table|compare|cache|ui`: the commands that are not trainings."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _table(args) -> int:
    from lora_sweep.compare.table import build_table, render

    header, rows = build_table(args.experiments or None)
    sys.stdout.write(render(header, rows, args.format))
    return 0


def _cache(args) -> int:
    from pathlib import Path

    from lora_sweep.data.cache import TensorCache, default_cache_dir

    root = Path(args.dir or default_cache_dir())
    store = TensorCache(root)
    if args.action == "clean":
        freed = store.clear()
        print(f"removed the cache at {root}: {freed / 2**20:.1f} MiB freed")
    else:
        print(f"cache at {root}: {store.size_bytes() / 2**20:.1f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="print the article's table from the composed experiment configs")
    table.add_argument("--format", choices=["text", "markdown", "csv"], default="text")
    table.add_argument("experiments", nargs="*", help="experiment names (default: every conf/experiment/v*.yaml)")
    cache = sub.add_parser("cache", help="report the size of the shared latent/text cache, or remove it")
    cache.add_argument("action", choices=["info", "clean"], nargs="?", default="info")
    cache.add_argument("--dir", help="cache folder (default: data.cache_dir's default)")
    sub.add_parser("compare", help="write the comparison report (see --help)", add_help=False)
    sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 over this project's store", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "compare":
        from lora_sweep.compare import report

        return report.main(rest)
    if args.command == "ui":
        from lora_sweep.compare import ui

        return ui.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"table": _table, "cache": _cache}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
