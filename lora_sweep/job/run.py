"""One job's life: set-up, an MLflow (child) run around `train`, and one end status written once.

Set-up, in order: read its inputs once -> the device -> writable folders -> the store -> the config's lock
(`ConfigLock` on `<state root>/<config_hash>/`; sweep.on_busy: wait or skip) -> replay what this config's runs could
not send (`tracking.replay`) -> skip-finished (same config hash and `skip_key`; not when train.resume names a state)
-> the resume plan (`plan_resume`).
Outcomes: FINISHED (trained to max_steps, never without its LoRA files), KILLED (SIGINT/TERM/HUP, with a state; or
stopped by sweep.stop_early's rule, with a state and the `lora_sweep.stopped_early` tag),
FAILED (the reason as the `lora_sweep.failure` tag). A SIGKILL leaves the run RUNNING until `close_stale_runs`
marks it KILLED. A sweep's job that fails before its run exists still gets a FAILED child run; a job without a run
of its own (skipped, failed before one) ends in its status file. Knows MLflow, not launchers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra_plugins._job_outcome import JobOutcome
from lora_sweep.atomic import write_text
from lora_sweep.checks import preflight as preflight_lib
from lora_sweep.checks.folders import check_job_folders, check_writable
from lora_sweep.config import config_hash, flatten, to_container
from lora_sweep.data.cache_keys import file_sha256
from lora_sweep.data.fingerprint import Fingerprint
from lora_sweep.errors import UserError, disk_full_error, is_out_of_memory
from lora_sweep.job.finished import dataset_of, finished_match, skip_key
from lora_sweep.job.inputs import JobInputs, read_inputs
from lora_sweep.job.names import read_swept_keys, run_label
from lora_sweep.job.status import JobSink, StatusFile, StopOnSignal, status_file_path
from lora_sweep.paths import make_paths_absolute
from lora_sweep.tracking import store
from lora_sweep.tracking.logger import RunLogger
from lora_sweep.tracking.metric_spec import parse_metric_spec
from lora_sweep.tracking.replay import PENDING_NAME, ends_the_run, pending_files, replay_quietly
from lora_sweep.tracking.siblings import SweepPeers
from lora_sweep.tracking.stale import close_stale_runs
from lora_sweep.tracking.stopped import stop_record
from lora_sweep.training import optim, schedules
from lora_sweep.training.checkpoint import (
    ConfigLock,
    find_resumable,
    list_states,
    read_meta,
    resolve_state_arg,
    run_folder,
)
from lora_sweep.training.failures import failure_reason
from lora_sweep.training.stop_early import STOPPED_EARLY_TAG, Decision, EarlyStop, StopEarlyOptions

log = logging.getLogger(__name__)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


@dataclass
class _Ready:
    """What a job's set-up established before its MLflow run exists."""

    client: Any
    exp_id: str
    chash: str
    state_root: Path
    lock: ConfigLock
    fingerprint: Fingerprint
    skip_key: str
    inputs: JobInputs  # handed to training
    resume_from: Path | None = None
    continued_run: str | None = None
    resume_changed: str = ""  # the settings this config changes from the resumed state's (training.resume)
    checked: preflight_lib.Report | None = None  # the fallbacks of the job's reads, logged on the run


def run_job(cfg, *, output_dir: Path, sweep_dir: Path | None = None, overrides: list[str] | None = None,
            tags: dict[str, str] | None = None, job_num: int | None = None) -> JobOutcome:
    """Train one config as an MLflow run (new, or the unfinished one its latest state belongs to).

    A set-up failure is recorded (`_failed_before_run`), then raised. A training failure returns a FAILED outcome,
    an interrupt a KILLED one. `tags` are added to the run's (sweep.py: the job number and group choices)."""
    make_paths_absolute(cfg)  # before the hash: relative paths are from where the command started
    extra_tags = dict(tags or {})
    swept = read_swept_keys(sweep_dir)
    label = run_label(cfg.tracking.variant, overrides, swept)  # run name, `variant` tag, the queue's label
    status = StatusFile(label, status_file_path(sweep_dir, job_num))
    status.update(force=True)  # the queue shows the run name from the start
    with contextlib.ExitStack() as held:
        found: dict[str, Any] = {"extra_tags": extra_tags}
        try:
            ready = _set_up(cfg, Path(output_dir), sweep_dir, label, status, held, found)
        except KeyboardInterrupt:
            reason = "interrupted before training started"
            log.warning("stopped: %s", reason)
            status.update(force=True, state="killed", reason=reason)
            return JobOutcome("KILLED", None, reason=reason)
        except Exception as exc:
            _failed_before_run(cfg, exc, label=label, status=status, output_dir=Path(output_dir), sweep_dir=sweep_dir,
                               overrides=overrides, found=found)
            raise
        if isinstance(ready, JobOutcome):  # SKIPPED: written in its status file
            return ready
        try:
            return _train_in_run(cfg, ready, label=label, status=status, output_dir=Path(output_dir),
                                 sweep_dir=sweep_dir, overrides=overrides, extra_tags=extra_tags)
        except Exception as exc:  # the run could not be created: recorded as in set-up
            _failed_before_run(cfg, exc, label=label, status=status, output_dir=Path(output_dir), sweep_dir=sweep_dir,
                               overrides=overrides, found=found)
            raise


def _set_up(cfg, output_dir: Path, sweep_dir: Path | None, label: str, status: StatusFile,
            held: contextlib.ExitStack, found: dict[str, Any]) -> _Ready | JobOutcome:
    """Read the job's files, then check what only the job can know (device, store, folders, lock), skip-finished,
    resume. `found` collects what is known so far, for a failure's record. Returns SKIPPED or what training needs."""
    from lora_sweep.training.length import resolve_max_steps
    from lora_sweep.training.session import check_device

    inputs = read_inputs(cfg, sweep_dir)  # a file gone or changed since the pre-flight: one UserError naming it
    resolve_max_steps(cfg, inputs.specs, inputs.train_scans)  # train.max_train_epochs: what every later step reads
    found["scans"] = inputs.scans  # the cache's space is checked with the folders
    device = check_device(cfg)  # what the pre-flight could not see: a queue's GPU slot, a cluster node's GPUs
    checked = preflight_lib.Report(fallbacks=[*inputs.fallbacks, *([device] if device is not None else [])])
    preflight_lib.announce(checked.fallbacks)
    client, exp_id, state_root = _open_store(cfg, output_dir, sweep_dir, found)
    chash = config_hash(cfg)
    found["chash"] = chash
    lock = _take_lock(cfg, ConfigLock(state_root / chash), chash, label, status)
    if isinstance(lock, JobOutcome):
        return lock
    held.callback(lock.release)
    fingerprint = dataset_of(cfg, inputs.scans)
    key = skip_key(cfg, chash, fingerprint)
    found.update(fingerprint=fingerprint, skip_key=key)
    replay_quietly(pending_files(state_root / chash))  # an earlier run's end, before deciding what it finished
    if cfg.sweep.skip_finished and cfg.train.resume in ("auto", "never"):  # a state asked for is resumed, as kohya
        done = finished_match(client, exp_id, chash, key, fingerprint, label)
        if done is not None:
            status.update(force=True, state="skipped", run_id=done[0], reason=done[1])
            return JobOutcome("SKIPPED", done[0], reason=done[1])
    resume_from, continued_run, changed = plan_resume(cfg, client, exp_id, chash, state_root, fingerprint.digest)
    return _Ready(client, exp_id, chash, state_root, lock, fingerprint, key, inputs, resume_from, continued_run,
                  changed, checked)


def _open_store(cfg, output_dir: Path, sweep_dir: Path | None, found: dict[str, Any]) -> tuple[Any, str, Path]:
    """(client, experiment id, state root), with the job's folders and the store's artifact folder proven writable,
    and, in a single run, stale runs closed."""
    uri = store.tracking_uri(cfg.tracking.uri)
    found["uri"] = uri
    state_root = check_job_folders(cfg, output_dir, uri, found.get("scans", ()))
    client = store.client(uri)  # a store MLflow cannot use: a UserError naming it
    exp_id = store.experiment_id(client, cfg.tracking.experiment)
    found.update(client=client, exp_id=exp_id)
    artifacts = store.local_artifact_folder(client, exp_id)
    if artifacts is not None:
        check_writable(artifacts, "tracking.uri (artifact folder)")
    if sweep_dir is None:  # a sweep's callback does this once for all its jobs
        close_stale_runs(client, exp_id, by="a new run of lora-sweep", state_root=state_root)
    return client, exp_id, state_root


def _take_lock(cfg, lock: ConfigLock, chash: str, label: str, status: StatusFile) -> ConfigLock | JobOutcome:
    """The config's lock, waited for (sweep.on_busy=wait), or a SKIPPED outcome (sweep.on_busy=skip)."""
    if lock.try_acquire():
        return lock
    holder = lock.describe_holder()
    if cfg.sweep.on_busy == "skip":
        reason = (f"config {chash} is being trained by {holder}; skipped (sweep.on_busy=wait to wait for it, "
                  "then resume or skip)")
        log.warning("skipped %s: %s", label, reason)
        status.update(force=True, state="skipped", reason=reason)
        return JobOutcome("SKIPPED", None, reason=reason)
    log.warning("config %s is being trained by %s: waiting for it to end (sweep.on_busy=skip to skip instead)",
                chash, holder)
    status.update(force=True, note=f"waiting for {holder.split(' (')[0]}")
    while not lock.try_acquire():
        time.sleep(1.0)
    status.update(force=True, note="")
    log.info("config %s is free again: going on", chash)
    return lock


def _train_in_run(cfg, ready: _Ready, *, label: str, status: StatusFile, output_dir: Path, sweep_dir: Path | None,
                  overrides: list[str] | None, extra_tags: dict[str, str] | None = None) -> JobOutcome:
    """Create (or reopen) the job's run and train in it; once the run exists, any ending gives it a status and a
    reason."""
    from lora_sweep.training.train import NonFiniteLoss

    client, chash, resume_from = ready.client, ready.chash, ready.resume_from
    tags = {**_run_tags(cfg, label, chash, output_dir, sweep_dir, overrides), **(extra_tags or {})}
    logger = _open_run(cfg, ready, label, tags)
    outcome, sink = JobOutcome("FAILED", logger.run_id), None
    checked = ready.checked or preflight_lib.Report()
    try:
        ready.lock.note(run_id=logger.run_id)
        status.update(force=True, run_id=logger.run_id)
        _record_inputs(cfg, ready, logger, checked, output_dir)

        def warn(fallback) -> None:
            checked.fallbacks.append(fallback)
            preflight_lib.announce([fallback])
            log_fallbacks(logger, checked, output_dir)

        sink = JobSink(logger, status, label, on_warning=warn)
        outcome = _train(cfg, ready, logger, sink, output_dir, sweep_dir)
    except KeyboardInterrupt:
        outcome.status, outcome.reason = "KILLED", "interrupted (Ctrl-C twice)"
        outcome.stop_signal = signal.SIGINT
    except (UserError, NonFiniteLoss) as exc:
        outcome.reason = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"  # its own words
        outcome.user_error = True
    except Exception as exc:  # OOM, disk full, anything else (then with the traceback's tail)
        kept = list_states(run_folder(ready.state_root, chash, logger.run_id)) or [resume_from]  # None: no state
        outcome.reason = failure_reason(cfg, exc, kept[-1], output_dir)
        outcome.user_error = is_out_of_memory(exc) or disk_full_error(exc) is not None
    finally:
        if sink is not None:
            sink.bar.close()
        try:  # at the end, so fallbacks found while training count
            logger.log_params({"data.warnings": len(checked.fallbacks)})
        except Exception as exc:  # noqa: BLE001  (the run must still be closed)
            log.warning("could not log data.warnings: %s", exc)
        pending = logger.end(outcome.status, outcome.reason or None)
    _closing_line(cfg, outcome, client.tracking_uri, ready.exp_id, pending)
    return outcome


def _record_inputs(cfg, ready: _Ready, logger, checked, output_dir: Path) -> None:
    """What the run trains from, before it trains: its params (what changed, on a continued run), the config, the
    kohya export and the pre-flight's fallbacks."""
    params = run_params(cfg)
    if ready.continued_run:
        _say_changed_params(logger, ready.client.get_run(logger.run_id).data.params, params)
    logger.log_params(params)
    _log_config(cfg, logger, output_dir)
    _log_kohya_export(cfg, logger, output_dir, ready.inputs.prompts)
    log_fallbacks(logger, checked, output_dir)


def _train(cfg, ready: _Ready, logger, sink, output_dir: Path, sweep_dir: Path | None) -> JobOutcome:
    """Train in the open run until it ends, a signal stops it or sweep.stop_early does; the outcome says which."""
    from lora_sweep.training.train import StateTarget, train

    states = StateTarget(run_folder(ready.state_root, ready.chash, logger.run_id), logger.run_id, ready.chash,
                         ready.resume_from, ready.fingerprint.digest)
    stopper = early_stop(cfg, ready.client, logger.run_id, sweep_dir)
    with StopOnSignal() as stop:
        result = train(cfg, output_dir=output_dir, sink=sink, should_stop=lambda: stop.requested, states=states,
                       scans=ready.inputs.train_scans, specs=ready.inputs.specs,
                       validation_scan=ready.inputs.validation_scan,
                       prompts=ready.inputs.prompts, stop_early=stopper)
    if result.stopped_early is not None:
        record = result.stopped_early.record()
        logger.set_tags({STOPPED_EARLY_TAG: record})
        # stopped_early: the launchers complete the job (it fails nothing) and show why
        return JobOutcome("KILLED", logger.run_id, reason=stopped_early_reason(result.stopped_early),
                          final_loss=result.final_loss, files=result.files,
                          stopped_early=stop_record({STOPPED_EARLY_TAG: record}).describe())
    stopped_by = signal.Signals(stop.signum).name if stop.signum else "request"
    return JobOutcome("KILLED" if result.interrupted else "FINISHED", logger.run_id,
                      reason=f"stopped by {stopped_by}" if result.interrupted else "",
                      final_loss=result.final_loss, files=result.files,
                      stop_signal=stop.signum if result.interrupted else None)


def early_stop(cfg, client, run_id: str, sweep_dir: Path | None) -> EarlyStop | None:
    """sweep.stop_early's hook for run `run_id` (its peers: the sweep's other runs), or None when it is off."""
    o = cfg.sweep.stop_early
    if o.metric is None:
        return None
    try:
        spec = parse_metric_spec(o.metric, "sweep.stop_early.metric")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    options = StopEarlyOptions(spec, o.rule, o.grace_steps, o.min_peers, o.margin, o.timeout)
    return EarlyStop(options, SweepPeers(client, run_id, _parent_run_id(sweep_dir), sweep_dir))


def stopped_early_reason(decision: Decision) -> str:
    """The run's KILLED reason: which rule stopped it where, and how a rerun continues it."""
    return (f"stopped early by sweep.stop_early at step {decision.step} (rule {decision.rule}: {decision.metric} = "
            f"{decision.value:.6g}, compared with {decision.compared_with:.6g}); its state is kept: rerun this config "
            "without sweep.stop_early.metric to resume it to train.max_steps")


def _open_run(cfg, ready: _Ready, label: str, tags: dict[str, str]) -> RunLogger:
    """The job's run: a new one, or the unfinished one its state belongs to (reopened, any gap in its history said),
    tagged with the dataset, the skip key and what a resume changed; its pending file in the run's state folder."""
    tags = {**tags, "lora_sweep.dataset": ready.fingerprint.digest, "lora_sweep.skip_key": ready.skip_key}
    if cfg.network.network_weights:  # the starting LoRA's content, beside its path in the params
        tags["lora_sweep.network_weights_sha256"] = file_sha256(cfg.network.network_weights)
    if ready.resume_from:
        tags["lora_sweep.resumed_from"] = str(ready.resume_from)
    if ready.resume_changed:
        tags["lora_sweep.resume_changed"] = store.fit(ready.resume_changed, store.MAX_TAG_CHARS, "the job's log")
    every = cfg.tracking.flush_every
    if ready.continued_run:
        logger = RunLogger.reopen(ready.client, ready.continued_run, tags=tags, flush_every=every)
    else:
        logger = RunLogger.start(ready.client, ready.exp_id, name=label, tags=tags, flush_every=every)
    logger.pending_file = run_folder(ready.state_root, ready.chash, logger.run_id) / PENDING_NAME
    if ready.continued_run:
        _say_history_gap(logger, read_meta(ready.resume_from)["step"])
        if STOPPED_EARLY_TAG in ready.client.get_run(ready.continued_run).data.tags:  # it trains on: no longer stopped
            ready.client.delete_tag(ready.continued_run, STOPPED_EARLY_TAG)
    return logger


def run_params(cfg, *, composed_if_refused: bool = False) -> dict[str, Any]:
    """The run's MLflow params: the config flattened, with what the optimizer ran with over the composed values, so
    the table and compare show what ran: optimizer.args.* as built (optimizer.optimizer_args applied, kohya's rules
    too; sequences as lists, as the config writes them), and for Adafactor with relative_step=True the schedule
    v0.8.7 uses (optimizer.scheduler "adafactor:<lr>") and train.lr None (it is built with lr=None).
    `composed_if_refused`: for a failure's record, the composed values where the arguments are refused."""
    params = flatten(to_container(cfg))
    o = cfg.optimizer
    try:
        name = optim.resolve_optimizer_name(o.name)
        kwargs = optim.optimizer_arguments(name, to_container(o.args), list(o.optimizer_args)).kwargs
    except UserError:
        if composed_if_refused:
            return params
        raise
    used = {f"optimizer.args.{k}": list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    if optim.finds_own_step(name, kwargs):
        used |= {"optimizer.scheduler": schedules.adafactor_name(cfg.train.lr), "train.lr": None}
    composed = [k for k in params if k == "optimizer.args" or k.startswith("optimizer.args.")]
    return {k: v for k, v in params.items() if k not in composed} | used


def _say_changed_params(logger: RunLogger, logged: dict[str, str], params: dict[str, Any]) -> None:
    """A continued run keeps the params it started with (MLflow cannot change one): the settings this process
    changes (only unhashed ones, e.g. train.device) go in one warning and the `lora_sweep.resume_changed` tag."""
    changed = {k: (logged[k], v) for k, v in params.items()
               if k in logged and logged[k] != store.fit(str(v), store.MAX_PARAM_CHARS, "the run's config.yaml")}
    if changed:
        text = "; ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
        log.warning("run %s goes on with settings changed since it started (its params keep the first values): %s",
                    logger.run_id, text)
        logger.set_tags({"lora_sweep.resume_changed": store.fit(text, store.MAX_TAG_CHARS, "the job's log")})


def _say_history_gap(logger: RunLogger, state_step: int) -> None:
    """A process killed while MLflow lagged took the metrics after the store's last step with it; training goes on
    after the state's step, so those steps stay missing: say so in the log and a tag, never silently."""
    if logger.skip_through_step < state_step:
        gap = f"{max(logger.skip_through_step + 1, 1)}-{state_step}"
        log.warning("MLflow run %s has no metrics for steps %s: the process that trained them ended before the store "
                    "took them; training resumes after step %d", logger.run_id, gap, state_step)
        logger.set_tags({"lora_sweep.history_gap": gap})


def log_fallbacks(logger: RunLogger, checked: preflight_lib.Report, output_dir: Path) -> None:
    """Log the job's fallbacks as the run's `data/warnings.txt` (each with all its paths); rewritten as training
    finds more."""
    if checked.fallbacks:
        logger.log_artifact(write_text(Path(output_dir) / "warnings.txt", checked.warnings_text()), "data")


def _run_tags(cfg, label: str, chash: str, output_dir: Path, sweep_dir: Path | None,
              overrides: list[str] | None) -> dict[str, str]:
    tags = {store.ROLE: "job", "variant": label, "config_hash": chash, "git_commit": git_commit(),
            "gpu": os.environ.get("CUDA_VISIBLE_DEVICES", ""), "output_dir": str(output_dir),
            "lora_sweep.overrides": store.fit(" ".join(overrides or []), store.MAX_TAG_CHARS, "the run's config.yaml"),
            **store.process_tags()}
    parent = _parent_run_id(sweep_dir)
    if parent:
        tags["mlflow.parentRunId"] = parent  # a continued run moves to the sweep that continues it
    return tags


def _log_config(cfg, logger: RunLogger, output_dir: Path) -> None:
    """The resolved config as the run's `config.yaml` (params are cut at MLflow's limits)."""
    from omegaconf import OmegaConf

    path = write_text(output_dir / "config.yaml", OmegaConf.to_yaml(to_container(cfg)))
    logger.log_artifact(path)


def _log_kohya_export(cfg, logger: RunLogger, output_dir: Path, prompts: list) -> None:
    """sd-scripts v0.8.7's config.toml, dataset.toml and command.sh for this config, as the run's `kohya/`."""
    from lora_sweep.kohya.export import write_export

    for path in write_export(cfg, output_dir / "kohya", prompts):
        logger.log_artifact(path, "kohya")


def _status_reason(reason: str, user_error: bool) -> str:
    """What the queue shows: a user's error whole, a bug's first line (the traceback stays in the job's log)."""
    if not reason:
        return ""
    return reason if user_error else reason.splitlines()[0]


def _failed_before_run(cfg, exc: BaseException, *, label: str, status: StatusFile, output_dir: Path,
                       sweep_dir: Path | None, overrides: list[str] | None, found: dict[str, Any]) -> None:
    """Record a job that failed before its run existed: in a sweep, as a FAILED child run (its id in the status
    file); otherwise, or if that fails, in the status file."""
    user_error = isinstance(exc, UserError)
    reason = str(exc) if user_error else f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"
    run_id = None
    if _parent_run_id(sweep_dir):
        run_id = _record_failed_run(cfg, reason, label=label, output_dir=output_dir, sweep_dir=sweep_dir,
                                    overrides=overrides, found=found)
    if run_id:
        status.update(force=True, run_id=run_id)
    else:
        status.update(force=True, state="failed", reason=_status_reason(reason, user_error), user_error=user_error)


def _record_failed_run(cfg, reason: str, *, label: str, output_dir: Path, sweep_dir: Path | None,
                       overrides: list[str] | None, found: dict[str, Any]) -> str | None:
    """Best effort (the store itself may be what failed): the run id, or None."""
    try:
        client = found.get("client") or store.client(found.get("uri") or store.tracking_uri(cfg.tracking.uri))
        exp_id = found.get("exp_id") or store.experiment_id(client, cfg.tracking.experiment)
        chash = found.get("chash")
        if chash is None:
            with contextlib.suppress(Exception):
                chash = config_hash(cfg)
        tags = {**_run_tags(cfg, label, chash or "", output_dir, sweep_dir, overrides), **found.get("extra_tags", {})}
        tags["lora_sweep.stage"] = "set-up"
        logger = RunLogger.start(client, exp_id, name=label, tags=tags, flush_every=1)
        with contextlib.suppress(Exception):
            logger.log_params(run_params(cfg, composed_if_refused=True))
            _log_config(cfg, logger, output_dir)
        logger.end("FAILED", reason)
        return logger.run_id
    except Exception as exc:
        log.warning("could not record the failure of %s in MLflow: %s", label, str(exc).splitlines()[0][:200])
        return None


def plan_resume(cfg, client, exp_id: str, chash: str, root: Path,
                dataset: str | None = None) -> tuple[Path | None, str | None, str]:
    """(state to resume from, run to continue, the settings changed from the state's). auto: the newest state of an
    unfinished run of this config hash in this experiment, if it trained on the same files (`dataset` digest; none:
    a hint names a state of a config this one could continue); PATH: that state, in its own run if it is that
    unfinished run's newest, else in a new run, under this config where every change is one a state follows
    (`resume.check_state_config`, else a UserError)."""
    from lora_sweep.training import resume

    mode = cfg.train.resume
    if mode == "never":
        return None, None, ""

    def resumable(run_id: str) -> bool:
        return store.resumable_run(client, exp_id, run_id)

    if mode == "auto":
        state = find_resumable(root / chash, resumable)
        other_files = resume.dataset_change(read_meta(state), dataset) if state is not None else {}
        if other_files:
            old, new = other_files[resume.DATASET]
            log.warning("not resuming %s: it trained on other files (dataset %s, now %s); this config starts fresh "
                        "in a new run", state, old, new)
            state = None
        if state is not None:
            log.info("resuming config %s from %s (train.resume=never to start over)", chash, state)
            return state, state.parent.name, ""
        near = resume.nearest_state(cfg, root, chash, dataset)
        if near is not None:
            log.info("no state of config %s: starting fresh. A state of a config differing only in settings a resume "
                     "follows exists (%s); to continue it instead: train.resume=%s", chash, resume.describe(near[1]),
                     near[0])
        return None, None, ""
    state = resolve_state_arg(mode)
    meta = read_meta(state)
    resume.check_steps_left(state, int(meta.get("step", 0)), cfg.train.max_steps, cfg.train.max_train_epochs)
    changes = resume.check_state_config(cfg, meta, state, chash, dataset)
    if changes:
        changed = resume.describe(changes)
        log.warning("train.resume: %s was saved by config %s, this is %s: resuming it in a new run, following this "
                    "config's %s", state, meta["config_hash"], chash, changed)
        return state, None, changed
    if meta["config_hash"] != chash:  # no setting that a training computes with differs
        return state, None, ""
    newest = list_states(state.parent)
    same_run = resumable(meta["run_id"]) and newest and newest[-1].resolve() == state.resolve()
    return state, (meta["run_id"] if same_run else None), ""  # an older state starts a new run: one timeline per run


def _parent_run_id(sweep_dir: Path | None) -> str | None:
    if sweep_dir is None:
        return None
    marker = Path(sweep_dir) / store.PARENT_FILE
    return marker.read_text().strip() if marker.exists() else None


def _closing_line(cfg, outcome: JobOutcome, uri: str, exp_id: str | None = None, pending: Path | None = None) -> None:
    """The job's last log line, with the command that browses its store; a bug's failure includes its traceback.
    With a `pending` file it says what MLflow shows until that file is replayed."""
    from lora_sweep.tracking.ui import browse_command

    where = f"MLflow run {outcome.run_id} in experiment '{cfg.tracking.experiment}' ({uri})"
    browse = f"Browse with `{browse_command(uri, cfg.tracking.experiment, exp_id)}`."
    if pending is not None:
        shown = "shows RUNNING" if ends_the_run(pending) else f"shows {outcome.status} but lacks some metrics"
        browse = (f"MLflow still {shown} until `python -m lora_sweep replay {pending}` (the next run of this config "
                  f"does it too). {browse}")
    here = " here;" if pending is not None else ""
    if outcome.status == "FINISHED":
        log.info("FINISHED%s %s: final loss %.4f; LoRA: %s (kohya) and %s (diffusers). %s",
                 here, where, outcome.final_loss, outcome.files["kohya"], outcome.files["diffusers"], browse)
    elif outcome.status == "FAILED" and not outcome.user_error:
        log.error("FAILED%s %s: %s%s", here, where, outcome.reason, f"\n{browse}" if pending is not None else "")
    else:
        reason = (outcome.reason or "").rstrip()
        log.error("%s%s %s: %s %s", outcome.status, here, where,
                  reason + ("" if not reason or reason.endswith(".") else "."), browse)
