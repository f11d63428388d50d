"""What a job reads of its files before it trains, once: its dataset scans and its prompts. The pre-flight checked them,
maybe hours earlier; the job reads them for use (the fingerprint, training, the run's warnings), and what changed
meanwhile so that it cannot train is one UserError naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lora_sweep.checks.preflight import Memo, check_job, needs_job_check, scan_dataset, training_scans
from lora_sweep.data.captions import caption_syntax_fallbacks
from lora_sweep.data.dataset import FolderScan, dataset_changes
from lora_sweep.data.photos import data_folder
from lora_sweep.data.subsets import DatasetSpec
from lora_sweep.errors import Fallback, UserError
from lora_sweep.job.names import read_datasets_seen
from lora_sweep.training.evaluate import read_prompts

CHANGED = "A file this job reads changed after the pre-flight checked it, so the job did not start training:"


@dataclass
class JobInputs:
    specs: list[DatasetSpec]  # the datasets trained on (subsets.dataset_specs)
    train_scans: list[FolderScan]  # data.dir (or the bundled photos, written first if needed) and data.reg_data_dir,
    # or each subset of data.datasets / data.dataset_config; reg images balanced
    validation_scan: FolderScan | None  # data.validation_dir
    fallbacks: list[Fallback]  # the datasets' (subsets left out, keys without effect), the scans', the prompts'
    prompts: list  # the sample PromptSpecs, parsed with the Sampler's defaults (training.evaluate.read_prompts)

    @property
    def scans(self) -> list[FolderScan]:
        """Every scan the job reads: the training scans, then the validation folder's."""
        return [*self.train_scans, *([self.validation_scan] if self.validation_scan is not None else [])]


def read_inputs(cfg, sweep_dir: Path | None = None) -> JobInputs:
    """Scan the training datasets (`preflight.training_scans`) and data.validation_dir and parse the prompts. Raises
    UserError: `CHANGED` and every problem, including a dataset file removed, changed or added since the sweep's
    pre-flight recorded it (`job.names.read_datasets_seen(sweep_dir)`). A job the launching process never checked
    (`preflight.needs_job_check`) runs `check_job` first, sharing its scans."""
    memo = Memo()
    if needs_job_check():
        report = check_job(cfg, memo=memo)
        if report.problems:
            raise report.error()
    d = cfg.data
    folder = None if d.datasets or d.dataset_config else data_folder(cfg)
    specs, train_scans = training_scans(cfg, folder, memo, skip_missing=False)
    validation = None
    if d.validation_dir:
        validation = scan_dataset(Path(d.validation_dir), d.caption_extension, "data.validation_dir", memo)
    prompts, prompt_problems, prompt_fallbacks = read_prompts(cfg)
    inputs = JobInputs(specs, train_scans, validation, [], prompts)
    seen = read_datasets_seen(sweep_dir)
    problems = [p for s in inputs.scans for p in s.problems] + prompt_problems
    problems += [line for s in inputs.scans for line in dataset_changes(s, seen)]
    if problems:
        raise UserError(" ".join([CHANGED, *problems]))
    syntax = caption_syntax_fallbacks([item for scan in train_scans for item in scan.items])
    dropped = [f for spec in specs for f in spec.fallbacks]
    inputs.fallbacks = dropped + [f for s in inputs.scans for f in s.fallbacks] + syntax + prompt_fallbacks
    return inputs
