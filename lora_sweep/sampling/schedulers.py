"""The sampling scheduler: SDXL base's own Euler by default, or a kohya `--sample_sampler` name built as sd-scripts
v0.8.7's `get_my_scheduler` builds it (docs/kohya-reference.md §9).

v0.8.7 gives every sampler the same four arguments (1000 train timesteps, betas 0.00085..0.012 "scaled_linear"),
`algorithm_type` for dpmsolver / dpmsolver++, `prediction_type="v_prediction"` under `--v_parameterization`, and
turns `clip_sample` on where the class has it off; everything else is the diffusers class's default as of diffusers
0.25.0, v0.8.7's pin (`DIFFUSERS_0_25_DEFAULTS` restores the two that changed since). Unlike v0.8.7,
which builds DDIM for a name it does not know, a name outside `SAMPLERS` is refused before the model loads.
"""

from __future__ import annotations

import difflib
import inspect
import warnings

# kohya's --sample_sampler choices -> the diffusers scheduler class v0.8.7 builds for them
SAMPLERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpm_2": "KDPM2DiscreteScheduler",
    "dpm_2_a": "KDPM2AncestralDiscreteScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "dpmsingle": "DPMSolverSinglestepScheduler",
    "k_lms": "LMSDiscreteScheduler",
    "k_euler": "EulerDiscreteScheduler",
    "k_euler_a": "EulerAncestralDiscreteScheduler",
    "k_dpm_2": "KDPM2DiscreteScheduler",
    "k_dpm_2_a": "KDPM2AncestralDiscreteScheduler",
}
# v0.8.7's SCHEDULER_LINEAR_START / _END / SCHEDULER_TIMESTEPS / SCHEDLER_SCHEDULE (library/train_util.py)
KOHYA_SCHEDULER_ARGS = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}
# defaults of diffusers 0.25.0 (v0.8.7's pin) that later versions changed: the last step ends at sigma_min, not 0
DIFFUSERS_0_25_DEFAULTS = {
    "DPMSolverMultistepScheduler": {"final_sigmas_type": "sigma_min"},
    "DPMSolverSinglestepScheduler": {"final_sigmas_type": "sigma_min", "lower_order_final": True},
}
# SDXL base 1.0's scheduler_config.json, as in lora_sweep/assets/sdxl_base/scheduler/ (a test checks it)
SDXL_EULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


def sampler_problem(name: str | None, setting: str, *, per_prompt: bool = False) -> str | None:
    """One paragraph naming `setting` when `name` is not a kohya sampler name, else None. None is SDXL base's Euler
    for `sampling.sampler`; a prompt's `--ss` (`per_prompt`) must name one."""
    if (name is None and not per_prompt) or name in SAMPLERS:
        return None
    close = difflib.get_close_matches(str(name).lower(), SAMPLERS, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    accepted = f"Accepted: {', '.join(SAMPLERS)} (kohya's --sample_sampler names)"
    if per_prompt:
        return f"{setting}: '{name}' is not a kohya sampler.{hint} {accepted}. (kohya v0.8.7 would use DDIM for it.)"
    return f"{setting}: '{name}' is not a kohya sampler.{hint} {accepted}, or null for SDXL base's own Euler."


def build_scheduler(name: str | None, *, v_prediction: bool = False):
    """A fresh diffusers scheduler for sampler `name`: None -> EulerDiscreteScheduler(**SDXL_EULER_CONFIG) (SDXL
    base's, epsilon as before); a `SAMPLERS` name -> the class and arguments v0.8.7's `get_my_scheduler` uses, with
    `v_prediction` as its `--v_parameterization`. Raises KeyError for another name (checked before the model loads)."""
    import diffusers

    if name is None:
        return diffusers.EulerDiscreteScheduler(**SDXL_EULER_CONFIG)
    scheduler_class = getattr(diffusers, SAMPLERS[name])
    arguments = {**KOHYA_SCHEDULER_ARGS, **DIFFUSERS_0_25_DEFAULTS.get(SAMPLERS[name], {})}
    if name in ("dpmsolver", "dpmsolver++"):
        arguments["algorithm_type"] = name
    if v_prediction:
        arguments["prediction_type"] = "v_prediction"
    clip_sample = inspect.signature(scheduler_class).parameters.get("clip_sample")
    if clip_sample is not None and clip_sample.default is False:
        arguments["clip_sample"] = True  # v0.8.7 turns clip_sample on wherever the class has it off (heun)
    with warnings.catch_warnings():  # diffusers calls algorithm_type "dpmsolver" deprecated; v0.8.7 uses it
        warnings.simplefilter("ignore", FutureWarning)
        return scheduler_class(**arguments)
