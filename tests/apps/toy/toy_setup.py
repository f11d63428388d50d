"""What the toy app sets up in each process that runs it: the `toy_job_dir` resolver a job folder name may use
(`hydra.sweep.subdir=${toy_job_dir:${hydra.job.num},${label}}`). The app's entry point calls `setup`; a launcher's
`job_setup` setting makes each job process call it too, before Hydra resolves the job's folder."""

from __future__ import annotations


def setup() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("toy_job_dir"):
        OmegaConf.register_new_resolver("toy_job_dir", lambda num, label: f"job-{num}-{label}")
