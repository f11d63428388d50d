"""lora-sweep's entry point: `python sweep.py [group=option ...] [key=value ...]`, `-m` for a sweep.

Hydra composes conf/ into one config per job (the pre-flight callback checks them first); `main` hands each to
`lora_sweep.job.run.run_job`. A user error is one paragraph and a non-zero exit status, not a traceback.
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
    """A sweep job that ended FAILED or KILLED, carrying its outcome to the launcher."""


class UserJobFailed(JobFailed, CompactHydraException):
    """A JobFailed whose message is all a user needs (bad input, NaN, out of memory, a stop): Hydra prints a
    CompactHydraException as its message alone, under every launcher."""


def job_failed(outcome: JobOutcome) -> JobFailed:
    """The exception that hands a FAILED or KILLED outcome to the launcher through Hydra's JobReturn."""
    message = f"{outcome.status}: {outcome.reason.splitlines()[0] if outcome.reason else ''}"
    return (UserJobFailed if outcome.user_error or outcome.status == "KILLED" else JobFailed)(outcome, message)


CHOICE_GROUPS = ("model", "data", "noise", "loss", "optimizer", "precision", "network", "train")


def job_tags(hc, multirun: bool) -> dict[str, str]:
    """The report's tags from Hydra: `lora_sweep.job_num` (in a sweep) and `lora_sweep.choice.<group>`, the option
    of each config group, so a group change counts as one knob."""
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
    """One job: returns its outcome when FINISHED or SKIPPED; FAILED or KILLED raises `JobFailed` in a sweep, and
    exits a single run with 1, 2 (bad input) or 128 + the signal that stopped it (130 SIGINT, 143 SIGTERM)."""
    from lora_sweep.job.run import run_job

    lora_sweep.setup()  # a launcher's job process runs this function, not the module's start
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
        if multirun:  # not sys.exit: Ray aborts the sweep when a worker exits
            raise UserJobFailed(JobOutcome("FAILED", reason=str(exc), user_error=True), str(exc)) from None
        sys.exit(2)
    if outcome.status in ("FAILED", "KILLED"):
        if multirun:
            raise job_failed(outcome)
        sys.exit(128 + (outcome.stop_signal or 2) if outcome.status == "KILLED" else 1)  # as a shell reports it
    return outcome


def cli(argv: list[str] | None = None) -> None:
    """`python sweep.py ...`: the command line's problems, all at once (exit 2), then `main`. A composition error
    prints as one paragraph (exit 2), a sweep with failed jobs exits 1, a bug shows its traceback. A user's
    HYDRA_FULL_ERROR=1 leaves all reporting to Hydra."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from lora_sweep.checks.command_line import command_line_problems, config_problems_beside, hydra_error_text
    from lora_sweep.checks.preflight import format_problems

    argv = sys.argv[1:] if argv is None else argv
    problems = command_line_problems(argv)
    if problems:  # with the config's own problems, so every problem is reported at once
        problems += config_problems_beside(argv)
        print(format_problems([(p, []) for p in problems], jobs=1), file=sys.stderr)
        sys.exit(2)
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        main()
        return
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then re-raises what escapes, for us to print
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as error:
        print(hydra_error_text(error), file=sys.stderr)
        sys.exit(2)
    except CompactHydraException as error:  # failed jobs: the launcher's summary said the rest
        print(str(error), file=sys.stderr)
        sys.exit(1)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    cli()
