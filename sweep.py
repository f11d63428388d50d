"""lora-sweep's entry point: `python sweep.py [group=option ...] [key=value ...]`, `-m` for a sweep.

Hydra composes conf/ into one config per job; this file hands it to `lora_sweep.job.run.run_job` and turns a user error
into one readable paragraph and a non-zero exit status instead of a traceback. Before that, the pre-flight
(`lora_sweep.checks.preflight.PreflightCallback`, first in conf/config.yaml's hydra.callbacks) has checked every job's
config and files and exits with status 2, having written nothing, if any is wrong.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import CompactHydraException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import lora_sweep  # noqa: E402
from hydra_plugins._job_outcome import JobNotFinished, JobOutcome  # noqa: E402
from lora_sweep.config import register_configs  # noqa: E402
from lora_sweep.errors import UserError  # noqa: E402
from lora_sweep.paths import make_paths_absolute  # noqa: E402

lora_sweep.setup()
register_configs()
log = logging.getLogger("lora_sweep")


class JobFailed(JobNotFinished):
    """A sweep job that did not finish (FAILED or KILLED), carrying its outcome: launchers record it with this
    message and go on with the others; for a bug (not `user_error`) they show the job log's last lines too."""


class UserJobFailed(JobFailed, CompactHydraException):
    """A JobFailed whose message is all a user needs (a config, path or data problem, a NaN, an out-of-memory, a
    stop). Hydra prints a CompactHydraException as its message alone, so under the basic, Ray and Slurm launchers
    too it reads as one paragraph, not a traceback."""


def job_failed(outcome: JobOutcome) -> JobFailed:
    """The exception that hands a FAILED or KILLED outcome to the launcher through Hydra's JobReturn."""
    message = f"{outcome.status}: {outcome.reason.splitlines()[0] if outcome.reason else ''}"
    return (UserJobFailed if outcome.user_error or outcome.status == "KILLED" else JobFailed)(outcome, message)


CHOICE_GROUPS = ("model", "data", "noise", "loss", "optimizer", "precision", "network", "train")


def job_tags(hc, multirun: bool) -> dict[str, str]:
    """What the comparison report needs from Hydra: the job's place in the sweep (`lora_sweep.job_num`, the order
    of the sweep's overrides) and the option chosen in each config group (`lora_sweep.choice.<group>`), so a group
    change (noise=offset -> offset_ip) counts as one knob."""
    tags = {f"lora_sweep.choice.{group}": option if isinstance(option, str) else ",".join(map(str, option))
            for group, option in hc.runtime.choices.items() if group in CHOICE_GROUPS and option is not None}
    if multirun:
        tags["lora_sweep.job_num"] = str(hc.job.num)
    return tags


def share_cpu_cores(hc) -> None:
    """On gpu_queue CPU slots, split the cores between concurrent jobs (OMP_NUM_THREADS is read before the fork)."""
    slots = hc.launcher.get("cpu_slots") if "launcher" in hc else None
    if slots and os.environ.get("GPU_QUEUE_SLOT") is not None and os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(slots)))


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> JobOutcome:
    """One job. Its outcome reaches the launcher through Hydra's JobReturn: returned when FINISHED or SKIPPED,
    raised (`JobFailed`) when FAILED or KILLED in a sweep; a single run exits 1, 2 (bad input) or 130 (stopped)."""
    from lora_sweep.job.run import run_job

    lora_sweep.setup()  # a launcher's job process (forked, Ray, Slurm) runs this function, not the module's start
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    make_paths_absolute(cfg)  # relative paths mean where the command started, also with hydra.job.chdir=true
    output_dir = Path(cfg.train.output_dir or hc.runtime.output_dir)
    sweep_dir = Path(hc.sweep.dir) if multirun else None
    share_cpu_cores(hc)
    try:
        outcome = run_job(cfg, output_dir=output_dir, sweep_dir=sweep_dir, overrides=list(hc.overrides.task),
                          tags=job_tags(hc, multirun), job_num=hc.job.num if multirun else None)
    except UserError as exc:  # refused in its set-up, which recorded it
        log.error("%s", exc)
        if multirun:  # an exception, not sys.exit: Ray would treat an exiting worker as a crash and abort the sweep
            raise UserJobFailed(JobOutcome("FAILED", reason=str(exc), user_error=True), str(exc)) from None
        sys.exit(2)
    if outcome.status in ("FAILED", "KILLED"):
        if multirun:
            raise job_failed(outcome)
        sys.exit(130 if outcome.status == "KILLED" else 1)  # stopped: 130, as a stopped sweep and a shell exit
    return outcome


def cli(argv: list[str] | None = None) -> None:
    """`python sweep.py ...`: every misspelt key, unknown group option and value of the wrong type of the command
    line is refused before Hydra starts, all at once (Hydra stops at the first, and would advise adding a misspelt
    key with '+', which the run would ignore); then `main`. An error that escapes Hydra's
    composition or a sweep (a bad override or group option, a failed job) is printed as one paragraph, without
    Hydra's "Set the environment variable HYDRA_FULL_ERROR=1" line: bad input exits 2, a failed sweep 1, and a bug
    shows its whole traceback. With HYDRA_FULL_ERROR=1 set by the user, Hydra reports everything itself."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from lora_sweep.checks.command_line import command_line_problems, hydra_error_text

    problems = command_line_problems(sys.argv[1:] if argv is None else argv)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(2)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's run_and_report then re-raises what escapes, for us to print
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:
        print(hydra_error_text(error), file=sys.stderr)
        sys.exit(2)
    except CompactHydraException as error:  # a sweep with failed jobs: the launcher's summary told the story
        print(str(error), file=sys.stderr)
        sys.exit(1)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    cli()
