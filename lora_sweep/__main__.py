"""`python -m lora_sweep table|compare|cache|replay|import|export|ui`: the commands that are not trainings."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _table(args) -> int:
    from lora_sweep.compare.table import build_table, experiment_names, render

    known = experiment_names("*")
    unknown = [name for name in args.experiments if name not in known]
    if unknown:
        print(f"error: no experiment {', '.join(unknown)} in conf/experiment/; the experiments are: "
              f"{', '.join(known)}.", file=sys.stderr)
        return 2
    header, rows = build_table(args.experiments or None)
    sys.stdout.write(render(header, rows, args.format))
    return 0


# folders only lora-sweep makes under a cache root (and their staging names), so a wrong --dir loses nothing else
_STATES = re.compile(r"[0-9a-f]{16}")  # states/<config_hash>/<run_id>/state-step*.pt (training.checkpoint)
_STATE_FILE = re.compile(r"state-step\d{8,}\.pt")
_MODELS = re.compile(r"\.?(tiny-sdxl-v\d+-seed\d+|sdxl-base-config-[0-9a-f]{12})(\..*\.building)?")  # model.loading
_DATASETS = re.compile(r"\.?photos-v\d+(\..+)?")  # data.photos
_KEPT_NOTE = ("a stopped run resumes from them: `cache clean` keeps them, `cache clean --states` removes them too, "
              "`cache clean --finished-states` only those of finished runs")


@dataclass
class CachePart:
    """One kind of thing under the cache root: what it is, how many, bytes, the folders holding it."""

    kind: str  # entries | states | models | datasets | other
    what: str
    count: str
    size: int
    folders: list[Path] = field(default_factory=list)
    note: str = ""

    def line(self) -> str:
        return f"{self.what}: {self.count}, {_mib(self.size)}" + (f" ({self.note})" if self.note else "")


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _tree_size(path: Path) -> int:
    """Bytes of the files under `path` (links not followed)."""
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def _plural(n: int, noun: str, nouns: str = "") -> str:
    return f"{n:,} {noun if n == 1 else nouns or noun + 's'}"


def cache_inventory(root: Path) -> list[CachePart]:
    """Everything under the cache root `root` by kind, with sizes: cache entries, their digests and locks, training
    states, built models, bundled photos, and anything else (not lora-sweep's)."""
    from lora_sweep.data.cache import TensorCache

    parts, usage = [], TensorCache(root).usage()
    for kind, (count, size) in usage.items():
        if kind == "bookkeeping":
            parts.append(CachePart("entries", "file digests and locks", _plural(count, "file"), size))
        else:
            noun = {"latents": "latent", "text": "text-encoder"}.get(kind, kind)
            parts.append(CachePart("entries", kind, _plural(count, f"{noun} entry", f"{noun} entries"), size))
    states = _owned(root / "states", _STATES)
    if states:
        files = [f for s in states for f in s.rglob("state-step*.pt") if _STATE_FILE.fullmatch(f.name)]
        parts.append(CachePart("states", "training states", f"{_plural(len(files), 'state')} of "
                               f"{_plural(len({f.parent for f in files}), 'run')}",
                               sum(map(_tree_size, states)), states, _KEPT_NOTE))
    owned = set(states)
    for kind, pattern, what, note in (
            ("models", _MODELS, "built models", "rebuilt when needed"),
            ("datasets", _DATASETS, "bundled datasets", "written again from scikit-image when needed")):
        found = _owned(root / kind, pattern)
        if found:
            names = ", ".join(p.name for p in found if not p.name.startswith("."))
            parts.append(CachePart(kind, what, f"{len(found)} ({names})", sum(map(_tree_size, found)), found, note))
        owned |= set(found)
    tops = {".hashes", ".locks", *usage}
    others = [p for p in root.iterdir() if p.name not in tops | {"states", "models", "datasets"}]
    others += [p for name in ("states", "models", "datasets") if (root / name).is_dir()
               for p in (root / name).iterdir() if p not in owned and not (name == "states" and p.name == ".lock")]
    if others:
        parts.append(CachePart("other", "other files and folders", _plural(len(others), "item"),
                               sum(map(_tree_size, others)), note="not written by lora-sweep: never removed"))
    return parts


def _owned(folder: Path, pattern: re.Pattern) -> list[Path]:
    if not folder.is_dir() or folder.is_symlink():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and pattern.fullmatch(p.name))


def clean_cache(root: Path, parts: list[CachePart], *, states: bool) -> tuple[list[CachePart], list[CachePart]]:
    """Remove what is made again when needed (cache entries, built models, bundled datasets), and the training
    states only with `states`; never anything else. Returns (removed, kept)."""
    import contextlib

    from lora_sweep.data.cache import TensorCache

    TensorCache(root).clear()
    removed, kept = [], []
    for part in parts:
        if part.kind == "other" or part.kind == "states" and not states:
            kept.append(part)
            continue
        unsent = [run for folder in part.folders for run in _remove_keeping_unsent(folder)]
        removed.append(part)
        if unsent:
            kept.append(CachePart("states", "records MLflow has not received", _plural(len(unsent), "run"),
                                  sum(map(_tree_size, unsent)), note="send them with `python -m lora_sweep replay`"))
    for folder in ("states", "models", "datasets"):
        with contextlib.suppress(OSError):
            (root / folder).rmdir()  # only when empty
    return removed, kept


def _remove_keeping_unsent(folder: Path) -> list[Path]:
    """Remove `folder`, but for the records its runs could not send to MLflow (pending files and their copies, which
    `replay` sends): only those runs' states go. Returns the run folders kept."""
    import shutil

    from lora_sweep.tracking.replay import pending_files

    unsent = sorted({f.parent for f in pending_files(folder)})
    if not unsent:
        shutil.rmtree(folder, ignore_errors=True)
        return []
    for run in unsent:
        for state in run.glob("state-step*.pt"):
            state.unlink()
    for child in folder.iterdir():
        if child.is_dir() and not any(run.is_relative_to(child) or child.is_relative_to(run) for run in unsent):
            shutil.rmtree(child, ignore_errors=True)
    return unsent


def finished_run_states(root: Path, uri: str) -> tuple[list[Path], int]:
    """(state folders of runs the store at `uri` has FINISHED, count of run folders it does not know). A FINISHED
    run never resumes by itself, so its states are safe to remove."""
    from lora_sweep.tracking import store

    client, finished, unknown = store.client(uri), [], 0
    for config_folder in _owned(root / "states", _STATES):
        for run_folder in sorted(p for p in config_folder.iterdir() if p.is_dir() and not p.is_symlink()):
            try:
                status = client.get_run(run_folder.name).info.status
            except Exception:  # noqa: BLE001  (not a run of this store)
                unknown += 1
                continue
            if status == "FINISHED":
                finished.append(run_folder)
    return finished, unknown


def _clean_finished_states(root: Path, uri: str | None) -> int:
    import shutil

    from lora_sweep.checks.folders import store_problems
    from lora_sweep.tracking import store

    uri = store.tracking_uri(uri)
    problems = store_problems(uri)  # a server that does not answer would hang MLflow's retries for minutes
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        problems.append(f"--tracking-uri: there is no MLflow store at {uri} (the file does not exist), so no run is "
                        "known to have finished; give the store the runs were logged to.")
    if problems:
        print("error: " + "\n".join(problems), file=sys.stderr)
        return 2
    folders, unknown = finished_run_states(root, uri)
    size = sum(map(_tree_size, folders))
    unsent = 0
    for folder in folders:
        unsent += len(_remove_keeping_unsent(folder))
        if not any(folder.parent.iterdir()) or [p.name for p in folder.parent.iterdir()] == [".lock"]:
            shutil.rmtree(folder.parent, ignore_errors=True)
    print(f"cache at {root}: removed the training states of {_plural(len(folders), 'finished run')} in {uri}, "
          f"{_mib(size)}; kept those of unfinished runs (they resume from them)"
          + (f" and of {_plural(unknown, 'run')} this store does not know." if unknown else ".")
          + (f" Kept what MLflow has not received from {_plural(unsent, 'run')}: send it with "
             "`python -m lora_sweep replay`." if unsent else ""))
    return 0


def _cache(args) -> int:
    from lora_sweep.paths import default_cache_dir

    if (args.finished_states or args.tracking_uri) and (args.action != "clean" or args.states):
        print("error: --finished-states (with its --tracking-uri) goes with `cache clean` alone, not with info or "
              "--states (which removes every state).", file=sys.stderr)
        return 2
    if args.tracking_uri and not args.finished_states:
        print("error: --tracking-uri is only read with `cache clean --finished-states`.", file=sys.stderr)
        return 2
    root = Path(args.dir or default_cache_dir()).expanduser()
    if not root.is_dir():
        print(f"cache at {root}: the folder does not exist, so nothing is cached there"
              + (" and nothing was removed." if args.action == "clean" else "."))
        return 0
    parts = cache_inventory(root)
    if args.action == "info":
        print(f"cache at {root}: {_mib(sum(p.size for p in parts))} in all" + ("" if parts else ", empty."))
        for part in parts:
            print(f"  {part.line()}")
            for folder in part.folders if part.kind == "models" else ():  # a diffusers folder load_lora_weights uses
                print(f"    {folder}")
        return 0
    if args.finished_states:
        return _clean_finished_states(root, args.tracking_uri)
    removed, kept = clean_cache(root, parts, states=args.states)
    print(f"cache at {root}: " + (f"removed {_mib(sum(p.size for p in removed))}:" if removed else
                                  "nothing to remove."))
    for part in removed:
        print(f"  removed {part.line().replace(' (' + part.note + ')', '') if part.note else part.line()}")
    for part in kept:
        print(f"  kept {part.line()}")
    return 0


def _replay(args) -> int:
    from lora_sweep.paths import default_cache_dir
    from lora_sweep.tracking.replay import pending_files, replay_quietly

    roots = [Path(p).expanduser() for p in args.paths] or [Path(default_cache_dir()).expanduser() / "states"]
    files = pending_files(*roots)
    if not files:
        print(f"nothing to replay: no mlflow_pending.json under {', '.join(map(str, roots))}")
        return 0
    done = replay_quietly(files)
    for replayed in done:
        print(f"run {replayed.run_id}: sent {replayed.metrics} metrics and {replayed.others} other records"
              + (f", status {replayed.status}" if replayed.status else ""))
    return 0 if len(done) == len(files) else 1


def _import(args) -> int:
    from lora_sweep.kohya.experiment import run_import

    status, out, err = run_import([Path(p) for p in args.sources], args.name,
                                  Path(args.into) if args.into else None, args.force,
                                  Path(args.data) if args.data else None)
    sys.stdout.write(out)
    sys.stderr.write(err)
    return status


def _export(args) -> int:
    """A run's recorded config (its config.yaml artifact) or a composed one as sd-scripts v0.8.7's three files."""
    from mlflow.exceptions import MlflowException
    from omegaconf.errors import OmegaConfBaseException

    from lora_sweep.kohya.export import not_expressible, write_export

    if bool(args.run_id) == bool(args.config):
        print("error: give a RUN_ID or --config OVERRIDES (e.g. --config experiment=v53 model=sdxl "
              "model.path=/path/to/sdxl), not both.", file=sys.stderr)
        return 2
    try:
        cfg = _recorded_config(args.run_id, args.tracking_uri) if args.run_id else _composed_config(args.config)
        written = write_export(cfg, Path(args.out))
    except OmegaConfBaseException as exc:
        print(f"error: the config cannot be exported: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    except MlflowException as exc:  # no such run, or it recorded no config.yaml
        print(f"error: run {args.run_id}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    for line in not_expressible(cfg):  # command.sh's header, where the user sees it now
        print(f"warning: not in the kohya export: {line}", file=sys.stderr)
    return 0


def _recorded_config(run_id: str, uri: str | None):
    """The run's config.yaml artifact (the resolved config it trained with), typed by the schema."""
    import tempfile

    from omegaconf import OmegaConf

    from lora_sweep.config import Config
    from lora_sweep.tracking import store

    client = store.client(store.tracking_uri(uri))
    with tempfile.TemporaryDirectory() as scratch:
        recorded = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", scratch))
    return OmegaConf.merge(OmegaConf.structured(Config), recorded)


def _composed_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from lora_sweep.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base=None):
        return compose("config", overrides=overrides)


def _tiny_model(args) -> int:
    """Train the tiny model and print its recorded figures; the demo photos are measured, never trained on."""
    import json

    import numpy as np
    import skimage.data

    from lora_sweep.data.photos import PHOTOS
    from lora_sweep.model.tiny_sdxl import TINY_TRAINED_DIR
    from lora_sweep.model.tiny_training import TinyTrainingConfig, train

    photos = {name: (np.asarray(getattr(skimage.data, name)()), caption) for name, caption in PHOTOS.items()}
    out = Path(args.out) if args.out else TINY_TRAINED_DIR
    stages_from = Path(args.stages_from) if args.stages_from else None
    record = train(TinyTrainingConfig(seed=args.seed), out, photos, log=lambda line: print(line, flush=True),
                   stages_from=stages_from)
    print(json.dumps(record["figures"], indent=2))
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from lora_sweep import setup

    setup()
    parser = argparse.ArgumentParser(prog="python -m lora_sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    table = sub.add_parser("table", help="print the article's table from the composed experiment configs")
    table.add_argument("--format", choices=["text", "markdown", "csv"], default="text")
    table.add_argument("experiments", nargs="*", help="experiment names (default: every conf/experiment/v*.yaml)")
    cache = sub.add_parser(
        "cache", help="what the cache root holds (latent/text entries, training states, built models), or clean it",
        description="info (the default): every kind of thing under the cache root with its size. clean: remove the "
        "latent/text entries, built models and the bundled photos (all made again when needed); training states "
        "are kept unless --states, since a stopped run resumes from them. Clean when no sweep is running.")
    cache.add_argument("action", choices=["info", "clean"], nargs="?", default="info")
    cache.add_argument("--dir", help="cache root (default: $LORA_SWEEP_CACHE_DIR, else ~/.cache/lora-sweep)")
    cache.add_argument("--states", action="store_true",
                       help="clean: also remove the training states under <cache root>/states (runs cannot resume)")
    cache.add_argument("--finished-states", action="store_true",
                       help="clean: remove only the training states of runs the MLflow store has FINISHED (kept for "
                       "an explicit train.resume=PATH); entries, models and other runs' states stay")
    cache.add_argument("--tracking-uri", help="with --finished-states: the MLflow store (default: tracking.uri's: "
                       "$MLFLOW_TRACKING_URI, else ./mlflow.db)")
    replay = sub.add_parser(
        "replay", help="send what runs could not send to their MLflow store (mlflow_pending.json), end status too",
        description="A run whose store was unreachable at its end keeps the rest in mlflow_pending.json in its "
        "state folder; the next run of the same config sends it, or this command does. Sending twice sends "
        "nothing twice.")
    replay.add_argument("paths", nargs="*", help="pending files, or folders to search (default: the state root, "
                        "$LORA_SWEEP_CACHE_DIR/states or ~/.cache/lora-sweep/states)")
    imp = sub.add_parser(
        "import", help="a kohya config (GUI JSON, TOML, command line, LoRA metadata) as an experiment file",
        description="Reads kohya_ss GUI JSON configs, sd-scripts --config_file and --dataset_config TOMLs, files "
        "holding an `accelerate launch ... sdxl_train_network.py` command line and LoRA .safetensors metadata "
        "(kohya's ss_*, OneTrainer's ot_config) (a later source's flags win), and writes "
        "conf/experiment/user/NAME.yaml (and conf/<group>/user/NAME.yaml) with each line's source, then prints "
        "what became of every flag. A flag the "
        "sources leave out is sd-scripts v0.8.7's default.")
    imp.add_argument("sources", nargs="+", help="kohya files, in order")
    imp.add_argument("--name", help="the experiment's name (default: the first source's file name)")
    imp.add_argument("--into", help="write experiment/user/NAME.yaml (and <group>/user/NAME.yaml) under this folder "
                                    "instead of conf/; train with hydra.searchpath=[file://DIR]")
    imp.add_argument("--force", action="store_true", help="overwrite an existing NAME.yaml")
    imp.add_argument("--data", help="a folder holding the image folders a LoRA's metadata names")
    export = sub.add_parser(
        "export", help="write a run's or a config's sd-scripts v0.8.7 files: config.toml, dataset.toml, command.sh",
        description="kohya: the flags that train what the config trains (those away from v0.8.7's defaults), the "
        "datasets, and the accelerate command, headed by what kohya cannot hold (docs/kohya.md).")
    export.add_argument("format", choices=["kohya"])
    export.add_argument("run_id", nargs="?", help="an MLflow run: exports its recorded config.yaml")
    export.add_argument("--config", nargs="+", metavar="OVERRIDE",
                        help="compose conf/ with these overrides instead (experiment=v53 model=sdxl model.path=...)")
    export.add_argument("--out", default="kohya", help="the folder for the three files (default: ./kohya)")
    export.add_argument("--tracking-uri", help="with RUN_ID: the MLflow store (default: $MLFLOW_TRACKING_URI, else "
                        "./mlflow.db)")
    tiny = sub.add_parser(
        "tiny-model", help="train model=tiny (the tiny SDXL on its synthetic world; CPU minutes) and record it",
        description="Seeded: the VAE, the U-Net, then the VAE's decoder alone, from model/tiny_training.py's "
        "config; writes the diffusers "
        "folder and <folder>.json (config, sha256, first losses, PSNR, fit MSE, caption steering; "
        "docs/tiny-models.md).")
    tiny.add_argument("--out", help="the folder to write (default: the package's own assets/tiny_trained)")
    tiny.add_argument("--seed", type=int, default=0, help="the seed every draw comes from (default: 0)")
    tiny.add_argument("--stages-from", help="a folder written by stages 1-2 of this seed (its .json beside it): "
                      "read it and run stage 3 (the decoder) alone")
    sub.add_parser("compare", help="write the comparison report (see --help)", add_help=False)
    sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 over this project's store", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "compare":
        from lora_sweep.compare import report

        return report.main(rest)
    if args.command == "ui":
        from lora_sweep.tracking import ui

        return ui.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"table": _table, "cache": _cache, "replay": _replay, "import": _import,
            "export": _export, "tiny-model": _tiny_model}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
