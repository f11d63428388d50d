"""The pre-flight: every check files alone can answer, before any model loads, reported all at once.

`PreflightCallback` (first in conf/config.yaml's hydra.callbacks) runs `check_job` on every job of a run or sweep in
the launching process, before Hydra makes a folder or the parent run exists. It checks the config's values, the
dataset (folder tree, image headers, captions, buckets), prompts, the optimizer's learning rates and arguments, a
resume state, every folder a job writes and the store (`folders`), and the sweep as a whole (`sweep`).
Each problem has one source: a check skips what another names. A problem is one line naming the setting and file;
a `Fallback` is printed once as a warning. Any problem: exit 2, nothing written. Jobs read their files with the same
readers (`job.inputs`); only a job the launching process never saw (`needs_job_check`) runs `check_job` itself.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from lora_sweep.checks.folders import folder_problems
from lora_sweep.checks.validate import list_option_conflicts
from lora_sweep.errors import ConfigError, Fallback, UserError
from lora_sweep.paths import cache_root, remove_if_unused

log = logging.getLogger(__name__)
SAME_KIND_SHOWN = 10  # problem lines of one kind (same but for paths and numbers) listed before a summary
_LOGGED: set[str] = set()  # fallback lines already printed by this process
# sweep folder -> (store URI, experiment) its jobs log to: where lora_sweep.callbacks opens the parent run
SWEEP_TRACKING: dict[str, tuple[str, str]] = {}
# sweep folder -> {data.dataset.seen_key: files_seen}: lora_sweep.callbacks writes it for the jobs to compare
SWEEP_DATASETS: dict[str, dict[str, dict[str, list[int]]]] = {}


@dataclass
class Report:
    """What the pre-flight found for one job: `problems` (one line each; any stops it), `fallbacks`, and
    `warnings` (settings that work but may not do what was meant; printed once, never logged on the run)."""

    problems: list[str] = field(default_factory=list)
    fallbacks: list[Fallback] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def error(self) -> UserError:
        return UserError(format_problems([(p, []) for p in self.problems], jobs=1))

    def warnings_text(self) -> str:
        """Every fallback with all its paths (the run's `data/warnings.txt`)."""
        return "\n".join(f.full() for f in self.fallbacks) + "\n"


class Memo:
    """Scans, prompt parses and state reads made once per process, shared by a sweep's jobs and `job.inputs`."""

    def __init__(self) -> None:
        self.values: dict[tuple, Any] = {}

    def get(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self.values:
            self.values[key] = compute()
        return self.values[key]


def check_job(cfg: DictConfig, *, hydra_dir: tuple[str, Path] | None = None, memo: Memo | None = None,
              runs_here: bool = True) -> Report:
    """Every pre-flight check of one job config (paths absolute). `hydra_dir`: (setting, folder) Hydra will create
    for the job, if known; `runs_here`: the job trains on this machine (its device is checked). Never raises for
    what it finds; loads no model and writes nothing."""
    from lora_sweep.checks.validate import config_problems
    from lora_sweep.training.session import cuda_problem

    memo = memo or Memo()
    report = Report(problems=config_problems(cfg))
    if runs_here and (device := cuda_problem(cfg)) is not None:
        report.problems.append(device)
    _check_data(cfg, report, memo)
    _check_prompts(cfg, report, memo)
    report.problems += weights_folder_problems(cfg)
    report.fallbacks += unscored_weights(cfg)
    _attempt(report, lambda: _check_learning_rates(cfg))
    report.problems += _optimizer_arg_problems(cfg, memo)
    _attempt(report, lambda: _check_resume_state(cfg, memo))
    report.problems += folder_problems(cfg, hydra_dir, _scans(cfg, memo))
    report.warnings += [w for w in [checkpoint_alignment(cfg)] if w]
    return report


# the setting that spaces the steps a metric is logged at, by the metric's prefix
LOGGING_EVERY = {"fit/": "validation.every", "val/": "validation.every", "img/": "sampling.every"}


def checkpoint_alignment(cfg) -> str | None:
    """A warning when compare.select is set and train.save_every leaves LoRA files out at the steps its metric is
    logged at, so a best step may have no file; None when they line up (or the metric is logged at the start and
    the end only: the final LoRA covers the end)."""
    from lora_sweep.tracking.metric_spec import parse_metric_spec

    if cfg.compare.select is None:
        return None
    try:
        name = parse_metric_spec(cfg.compare.select, "compare.select").name
    except ValueError:  # config_problems states it, with the accepted forms
        return None
    setting = next((s for prefix, s in LOGGING_EVERY.items() if name.startswith(prefix)), None)
    every = int(OmegaConf.select(cfg, setting)) if setting else 0
    save_every = cfg.train.save_every
    if every == 0 or (save_every and every % save_every == 0):
        return None
    saved = f"saves a LoRA at multiples of {save_every} only" if save_every else "saves only the final LoRA"
    return (f"compare.select = {cfg.compare.select} picks each variant's best checkpoint among the steps {name} is "
            f"logged at ({setting} = {every}), and train.save_every = {save_every} {saved}, so a best step may have no "
            f"LoRA file to keep. Set train.save_every to {every} (or a divisor of it); it is not part of the config "
            "hash, so the runs stay the same configs.")


def needs_job_check() -> bool:
    """True in a job whose sweeper picks jobs as it runs (e.g. Optuna): the pre-flight saw only the base config.
    False in a single run, a BasicSweeper sweep and outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return False
    hc = HydraConfig.get()
    return getattr(hc.mode, "name", None) == "MULTIRUN" and not _expands_before_launch(hc.sweeper)


def _launches_here(config: DictConfig) -> bool:
    """True where the sweep's launcher runs its jobs on this machine (a cluster node may see other devices)."""
    target = str((config.hydra.get("launcher") or {}).get("_target_", ""))
    return target.endswith(("BasicLauncher", "GpuQueueLauncher"))


def _expands_before_launch(sweeper) -> bool:
    return str(sweeper.get("_target_", "")).endswith("BasicSweeper")


def _attempt(report: Report, check: Callable[[], None]) -> None:
    try:
        check()
    except UserError as error:
        report.problems += str(error).splitlines()


def _check_data(cfg, report: Report, memo: Memo) -> None:
    """Every training scan (data.dir and data.reg_data_dir, or each data.datasets / data.dataset_config subset, reg
    images balanced) and data.validation_dir: problems, fallbacks, captions' syntax and bucket problems under each
    dataset's settings."""
    from lora_sweep.data.captions import caption_syntax_fallbacks

    d = cfg.data
    specs, scans = training_scans(cfg, _train_folder(cfg), memo)
    report.fallbacks += [fallback for spec in specs for fallback in spec.fallbacks]
    for scan in scans:
        spec = specs[scan.items[0].dataset] if scan.items else None
        report.problems += scan.problems
        report.fallbacks += scan.fallbacks
        settings = _bucket_settings_or_none(spec) if spec is not None else None
        if settings is not None:
            report.problems += _bucket_problems(scan.items, settings, scan.setting)
    report.fallbacks += caption_syntax_fallbacks([item for scan in scans for item in scan.items])
    validation = d.validation_dir
    if validation is not None and Path(validation).is_dir():  # the config checks report a missing folder
        scan = scan_dataset(validation, d.caption_extension, "data.validation_dir", memo)
        report.problems += scan.problems
        report.fallbacks += scan.fallbacks
        settings = _bucket_settings_or_none(d)
        if settings is not None:
            report.problems += _bucket_problems(scan.items, settings, "data.validation_dir")


def _scans(cfg, memo: Memo) -> list:
    """The job's training scans and its validation folder's, of the folders that exist (memoized by `_check_data`)."""
    d = cfg.data
    scans = training_scans(cfg, _train_folder(cfg), memo)[1]
    if d.validation_dir is not None and Path(d.validation_dir).is_dir():
        scans.append(scan_dataset(d.validation_dir, d.caption_extension, "data.validation_dir", memo))
    return scans


def training_scans(cfg, train_folder: Path | None, memo: Memo | None = None, *,
                   skip_missing: bool = True) -> tuple[list, list]:
    """(DatasetSpecs, training scans) of the job: `subsets.dataset_specs(cfg, train_folder)` scanned folder by
    folder and subset by subset (once per memo; with `skip_missing`, folders that are not there are left to the
    config checks), reg images balanced (`dataset.balance_datasets`). A config the dataset checks refuse: ([], []),
    or its ConfigError without `skip_missing`."""
    from lora_sweep.data import dataset
    from lora_sweep.data.dataset import folder_setting
    from lora_sweep.data.subsets import Subset, dataset_specs

    memo = memo or Memo()
    try:
        specs = dataset_specs(cfg, train_folder)
    except UserError:  # the config checks name it (subsets.dataset_problems)
        if not skip_missing:
            raise
        return [], []

    def inspect(target, index: int, spec):
        if isinstance(target, Subset):
            folder, ext, setting, extra = target.image_dir, target.caption_extension, target.setting, (target,)
        else:
            folder, ext, setting = target[0], spec.template.caption_extension, folder_setting(spec, target[1])
            extra = (spec.template, target[1])
        if skip_missing and not Path(folder).is_dir():
            return None
        key = ("scan", str(Path(folder)), ext, setting, *extra, index)
        return memo.get(key, lambda: dataset.inspect_one(target, index, spec))

    return specs, dataset.inspect_datasets(specs, inspect)


def scan_dataset(folder, caption_extension: str, setting: str, memo: Memo | None = None):
    """`data.dataset.inspect_folder` of `folder` (named `setting` in messages), once per memo."""
    from lora_sweep.data.dataset import inspect_folder

    key = ("scan", str(Path(folder)), caption_extension, setting)
    return (memo or Memo()).get(key, lambda: inspect_folder(folder, caption_extension, setting=setting))


def _bucket_settings_or_none(d) -> dict | None:
    """The bucket settings of `d` (the data group or a DatasetSpec), or None when the config checks report a problem
    with them (assigning images with bucket_reso_steps=0 would crash instead of naming the setting)."""
    from lora_sweep.data.buckets import bucket_settings, check_bucket_options

    try:
        check_bucket_options(resolution=d.resolution, reso_steps=d.bucket_reso_steps, min_reso=d.min_bucket_reso,
                             max_reso=d.max_bucket_reso)
        return bucket_settings(d)
    except (UserError, ValueError, TypeError, ZeroDivisionError):
        return None


def _train_folder(cfg) -> Path | None:
    """data.dir, or the bundled photos if already written (a job writes them; they are known-good); None with
    data.datasets or data.dataset_config."""
    if cfg.data.datasets or cfg.data.dataset_config:
        return None
    if cfg.data.dir:
        return Path(cfg.data.dir)
    if cfg.data.name == "photos":
        from lora_sweep.data.photos import photos_path

        folder = photos_path(cache_root(cfg))
        return folder if folder.is_dir() else None
    return None


def _bucket_problems(items, settings: dict, setting: str) -> list[str]:
    from lora_sweep.data.buckets import assign_with_settings

    problems = []
    for item in items:
        try:
            assign_with_settings(item.size, settings)
        except ConfigError:  # the settings themselves: reported once by the config checks
            return []
        except UserError as error:
            problems.append(f"{setting}: image '{item.path}' ({item.size[0]}x{item.size[1]}): {error}")
    return problems


def _check_prompts(cfg, report: Report, memo: Memo) -> None:
    if cfg.sampling.prompt_file is not None and not Path(cfg.sampling.prompt_file).is_file():
        return  # the config checks name the missing file
    problems, fallbacks = parse_prompts(cfg, memo)
    report.problems += problems
    report.fallbacks += fallbacks


def weights_folder_problems(cfg) -> list[str]:
    """The evaluation.clip_model and evaluation.dino_model folders that cannot load (`embeddings.folder_problem`)."""
    from lora_sweep.sampling.embeddings import folder_problem

    e = cfg.evaluation
    found = [folder_problem(path, f"evaluation.{key}") for key, path in
             (("clip_model", e.clip_model), ("dino_model", e.dino_model)) if path]
    return [problem for problem in found if problem]


def unscored_weights(cfg) -> list[Fallback]:
    """A warning per evaluation.* folder given to a job that samples nothing: its metrics score the samples."""
    e, s = cfg.evaluation, cfg.sampling
    if s.prompts or s.prompt_file:
        return []
    return [Fallback(f"evaluation.{key}", "folder not used (nothing is sampled, so nothing is scored)", (str(path),),
                     f"Set sampling.prompts or sampling.prompt_file to log {metrics}.")
            for key, path, metrics in (("clip_model", e.clip_model, "img/clip_t and img/clip_i"),
                                       ("dino_model", e.dino_model, "img/dino")) if path]


def parse_prompts(cfg, memo: Memo | None = None) -> tuple[list[str], list[Fallback]]:
    """(problems, fallbacks) of `sampling.prompts` and `sampling.prompt_file` (file and line), once per memo."""
    from lora_sweep.sampling.prompts import check_prompts

    s = cfg.sampling
    if not s.prompts and not s.prompt_file:
        return [], []
    prompts = s.prompts if isinstance(s.prompts, str) else list(s.prompts)

    def parse() -> tuple[list[str], list[Fallback]]:
        _, problems, fallbacks = check_prompts(prompts, prompt_file=s.prompt_file, default_steps=s.steps,
                                               default_cfg=s.cfg, default_seed=s.seed, default_negative=s.negative)
        return problems, fallbacks

    key = ("prompts", repr(prompts), s.prompt_file, s.steps, s.cfg, s.seed, s.negative)
    return (memo or Memo()).get(key, parse)


def _check_learning_rates(cfg) -> None:
    from lora_sweep.training import optim

    t = cfg.train
    if not isinstance(t.lr, (int, float)) or t.lr < 0 or cfg.optimizer.name not in optim.OPTIMIZERS:
        return  # reported by the config checks
    with warnings.catch_warnings():  # the low-lr advice is printed when the optimizer is built
        warnings.simplefilter("ignore")
        optim.check_learning_rates(cfg.optimizer.name, lr=t.lr, text_encoder_lr=t.text_encoder_lr,
                                   train_text_encoder=cfg.network.train_text_encoder, args=dict(cfg.optimizer.args),
                                   optimizer_args=list(cfg.optimizer.optimizer_args))


def _optimizer_arg_problems(cfg, memo: Memo) -> list[str]:
    """Problems of `optimizer.args` against the optimizer class (names and values), once per (optimizer, args)."""
    import json

    from omegaconf import OmegaConf

    from lora_sweep.training import optim

    name = cfg.optimizer.name
    try:
        option = optim.OPTIMIZERS[optim.resolve_optimizer_name(name)]
    except UserError:
        return []  # reported by the config checks
    args = OmegaConf.to_container(cfg.optimizer.args, resolve=True)
    strings = list(cfg.optimizer.optimizer_args)
    quiet = logging.getLogger("bitsandbytes")  # its CPU-kernel notice on import is not about the user's input
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return memo.get(("optimizer", name, json.dumps(args, sort_keys=True, default=repr), *strings),
                        lambda: optim.optimizer_arg_problems(name, args, strings))
    except ImportError as error:
        return [f"optimizer={name}: cannot import {option.import_path.replace(':', '.')} ({error}); install the "
                "package that provides it."]
    finally:
        quiet.setLevel(level)


def _check_resume_state(cfg, memo: Memo) -> None:
    from lora_sweep.config import config_hash
    from lora_sweep.training.checkpoint import read_meta, resolve_state_arg
    from lora_sweep.training.resume import check_state_config, check_steps_left

    t = cfg.train
    if t.resume in ("auto", "never") or not Path(t.resume).exists():
        return  # auto: states live under the config hash, which includes train.max_steps
    state = resolve_state_arg(t.resume)
    meta = memo.get(("state", str(state)), lambda: read_meta(state))
    steps = _max_train_steps(cfg, memo)
    if steps is not None:
        check_steps_left(state, int(meta.get("step", 0)), steps, t.max_train_epochs)
    check_state_config(cfg, meta, state, config_hash(cfg))  # a setting the state cannot follow: one paragraph


def _max_train_steps(cfg, memo: Memo) -> int | None:
    """The job's optimizer steps (`length.max_train_steps`: train.max_train_epochs converted from the scans); None
    when its dataset cannot be counted (the data checks name why)."""
    from lora_sweep.training.length import max_train_steps

    if cfg.train.max_train_epochs is None:
        return cfg.train.max_steps
    specs, scans = training_scans(cfg, _train_folder(cfg), memo)
    try:
        return max_train_steps(cfg, specs, scans) if scans else None
    except UserError:  # an image no bucket fits: `_check_data` names it
        return None


def announce(fallbacks: list[Fallback]) -> None:
    """Print each fallback as a warning, once per process."""
    for fallback in fallbacks:
        if fallback.line() not in _LOGGED:
            _LOGGED.add(fallback.line())
            log.warning("%s", fallback.line())


def _shape(line: str) -> str:
    """A problem line without its quoted paths and numbers: lines of the same kind share it."""
    return re.sub(r"\d+", "#", re.sub(r"'[^']*'", "'…'", line))


def format_problems(grouped: list[tuple[str, list[str]]], *, jobs: int) -> str:
    """The exit message: one line per problem (with the jobs it hits unless all), at most SAME_KIND_SHOWN per kind."""
    count = len(grouped)
    head = (f"Pre-flight found {count} problem{'s' * (count != 1)}"
            + (f" in a sweep of {jobs} jobs" if jobs > 1 else "")
            + f"; nothing was started or written. Fix {'them' if count != 1 else 'it'} and run again:")
    lines, per_kind = [head], defaultdict(int)
    for problem, hit in grouped:
        per_kind[_shape(problem)] += 1
        if per_kind[_shape(problem)] <= SAME_KIND_SHOWN:
            hit = [label for label in hit if label]  # "": a problem of the whole sweep, not of some jobs
            where = "" if jobs <= 1 or not hit or len(hit) == jobs else f"  [{_jobs_label(hit)}]"
            lines.append(f"- {problem}{where}")
    for shape, n in per_kind.items():
        if n > SAME_KIND_SHOWN:
            lines.append(f"- ... and {n - SAME_KIND_SHOWN} more like: {shape}")
    return "\n".join(lines)


def _jobs_label(hit: list[str]) -> str:
    shown = ", ".join(hit[:4])
    return f"job{'s' * (len(hit) != 1)} {shown}" + (f" and {len(hit) - 4} more" if len(hit) > 4 else "")


class PreflightCallback(Callback):
    """Hydra callback: the pre-flight of a run or of every job of a sweep; list it first in hydra.callbacks.
    Exits 2 on problems, and on an exception in the checks (Hydra would only warn and start the jobs unchecked)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _unused_folder_removed(config.hydra.run.dir):
            _guarded(self._run_start, config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        with _unused_folder_removed(config.hydra.sweep.dir):
            _guarded(self._multirun_start, config)

    def _run_start(self, config: DictConfig) -> None:
        report = check_job(_job_copy(config), hydra_dir=("hydra.run.dir", Path(config.hydra.run.dir)))
        report.problems[:0] = list_option_conflicts(config)  # needs the hydra node _job_copy drops
        _finish([("", report)], jobs=1)

    def _multirun_start(self, config: DictConfig) -> None:
        from lora_sweep.checks.sweep import mixed_tracking_problem, sweep_problems, tracking_target

        memo, results, targets, jobs = Memo(), [], {}, {}
        for label, job_config, error in sweep_job_configs(config):
            if error is not None:
                results.append((label, Report(problems=[f"the job cannot be composed: {error}"])))
                continue
            job = _job_copy(job_config)
            report = check_job(job, hydra_dir=("hydra.sweep.dir", Path(config.hydra.sweep.dir)), memo=memo,
                               runs_here=_launches_here(config))
            report.problems[:0] = list_option_conflicts(job_config)
            results.append((label, report))
            targets[label], jobs[label] = tracking_target(job), job
        if len(set(targets.values())) > 1:
            results.append(("", Report(problems=[mixed_tracking_problem(targets)])))
        elif targets:
            SWEEP_TRACKING[str(config.hydra.sweep.dir)] = next(iter(targets.values()))
        count = len(results) - (len(set(targets.values())) > 1)
        results.append(("", Report(problems=sweep_problems(config, jobs, count))))
        _finish(results, jobs=count)
        SWEEP_DATASETS[str(config.hydra.sweep.dir)] = datasets_seen(memo)


def datasets_seen(memo: Memo) -> dict[str, dict[str, list[int]]]:
    """{`seen_key`: `files_seen`} of every folder the pre-flight scanned, with each caption extension it used."""
    from lora_sweep.data.dataset import files_seen, seen_key

    return {seen_key(scan, key[2]): files_seen(scan, key[2]) for key, scan in memo.values.items() if key[0] == "scan"}


@contextlib.contextmanager
def _unused_folder_removed(folder: str) -> Iterator[None]:
    """On a refusal, remove the run's or sweep's folder if `paths.new_dir` made it and it is still empty."""
    try:
        yield
    except SystemExit:
        remove_if_unused(folder)
        raise


def _guarded(check: Callable[[DictConfig], None], config: DictConfig) -> None:
    try:
        check(config)
    except Exception as error:  # noqa: BLE001  (a bug in a check: stop, never go on unchecked)
        log.exception("Pre-flight: internal error while checking the configuration (%s: %s). Nothing was started "
                      "or written. This is a bug in lora-sweep's checks; please report it with the command line and "
                      "the traceback above. The setting it was checking may hold an unusual value.",
                      type(error).__name__, error)
        sys.exit(2)


def sweep_job_configs(config: DictConfig) -> list[tuple[str, DictConfig | None, str | None]]:
    """(label, config, None) for every job as BasicSweeper expands it and the launchers compose it; (label, None,
    error) where that fails. Another sweeper (e.g. Optuna): the base config stands for its jobs."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from lora_sweep.checks.command_line import hydra_error_text

    sweeper = config.hydra.sweeper
    if not _expands_before_launch(sweeper):
        log.info("pre-flight: the sweeper %s picks its jobs as it runs; checking the sweep's base config now and "
                 "each job when it starts", sweeper.get("_target_"))
        return [("the sweep's base config", config, None)]
    loader = GlobalHydra.instance().config_loader()
    arguments = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    arguments += list(config.hydra.overrides.task)
    try:
        parsed = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    except Exception as error:  # Hydra's own message (a bad sweep syntax)
        return [("the sweep", None, hydra_error_text(error))]
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    configs = []
    for num, overrides in enumerate(jobs):
        label = f"#{num}" + "".join(f" {o}" for o in overrides if o.split("=", 1)[0] in swept)
        try:
            configs.append((label, loader.load_sweep_config(config, list(overrides)), None))
        except Exception as error:  # shown as a single run shows it
            configs.append((label, None, hydra_error_text(error)))
    return configs


def _job_copy(config: DictConfig) -> DictConfig:
    """The job's own config (no hydra node) with absolute paths, as run_job will see it."""
    from lora_sweep.paths import make_paths_absolute

    cfg = copy.deepcopy(config)
    with open_dict(cfg):
        cfg.pop("hydra", None)
    make_paths_absolute(cfg)
    return cfg


def _finish(results: list[tuple[str, Report]], *, jobs: int) -> None:
    """Exit 2 with every problem (grouped over jobs), or print the fallbacks (grouped) and go on."""
    problems: dict[str, list[str]] = defaultdict(list)
    fallbacks: dict[str, Fallback] = {}
    for label, report in results:
        for problem in report.problems:
            problems[problem].append(label)
        for fallback in report.fallbacks:
            fallbacks.setdefault(fallback.line(), fallback)
    if problems:
        log.error("%s", format_problems(list(problems.items()), jobs=jobs))
        sys.exit(2)
    announce(list(fallbacks.values()))
    for warning in dict.fromkeys(w for _, report in results for w in report.warnings):
        if warning not in _LOGGED:
            _LOGGED.add(warning)
            log.warning("%s", warning)
