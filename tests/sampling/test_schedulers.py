"""kohya's --sample_sampler names build the diffusers schedulers sd-scripts v0.8.7's `get_my_scheduler` builds."""

from __future__ import annotations

import pytest
from conftest import compose_config

from lora_sweep.checks.validate import config_problems
from lora_sweep.config import config_hash
from lora_sweep.sampling.schedulers import SAMPLERS, SDXL_EULER_CONFIG, build_scheduler, sampler_problem

# name -> (class, the config values v0.8.7 (diffusers 0.25.0) gives it that decide the sampling)
EXPECTED = {
    "ddim": ("DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True,
                               "set_alpha_to_one": True}),
    "pndm": ("PNDMScheduler", {"timestep_spacing": "leading", "steps_offset": 0, "skip_prk_steps": False,
                               "set_alpha_to_one": False}),
    "lms": ("LMSDiscreteScheduler", {"timestep_spacing": "linspace", "steps_offset": 0, "use_karras_sigmas": False}),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "linspace", "steps_offset": 0,
                                         "interpolation_type": "linear", "final_sigmas_type": "zero"}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {"timestep_spacing": "linspace", "steps_offset": 0}),
    "heun": ("HeunDiscreteScheduler", {"timestep_spacing": "linspace", "steps_offset": 0, "clip_sample": True}),
    "dpm_2": ("KDPM2DiscreteScheduler", {"timestep_spacing": "linspace", "steps_offset": 0}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {"timestep_spacing": "linspace", "steps_offset": 0}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "solver_order": 2,
                                                  "lower_order_final": True, "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                    "lower_order_final": True, "final_sigmas_type": "sigma_min"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                   "lower_order_final": True, "final_sigmas_type": "sigma_min"}),
}
EXPECTED.update({f"k_{name}": EXPECTED[name] for name in ("lms", "euler", "euler_a", "dpm_2", "dpm_2_a")})


def test_the_names_are_kohyas_choices():
    assert list(SAMPLERS) == ["ddim", "pndm", "lms", "euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "dpmsolver",
                              "dpmsolver++", "dpmsingle", "k_lms", "k_euler", "k_euler_a", "k_dpm_2", "k_dpm_2_a"]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_name_builds_v087s_scheduler(name):
    class_name, values = EXPECTED[name]
    scheduler = build_scheduler(name)
    assert type(scheduler).__name__ == class_name
    common = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "prediction_type": "epsilon"}
    assert {key: scheduler.config[key] for key in {**common, **values}} == {**common, **values}
    assert build_scheduler(name, v_prediction=True).config.prediction_type == "v_prediction"


def test_the_default_is_sdxl_bases_euler():
    scheduler = build_scheduler(None, v_prediction=True)
    assert type(scheduler).__name__ == "EulerDiscreteScheduler"
    assert {key: scheduler.config[key] for key in SDXL_EULER_CONFIG} == SDXL_EULER_CONFIG


def test_a_bad_name_is_one_paragraph_with_a_suggestion():
    assert sampler_problem(None, "sampling.sampler") is None and sampler_problem("k_euler_a", "x") is None
    problems = config_problems(compose_config("sampling.sampler=eular_a"))
    assert len(problems) == 1 and problems[0].startswith(
        "sampling.sampler: 'eular_a' is not a kohya sampler. Did you mean 'euler_a'? Accepted: ddim, pndm, lms, ")
    assert "ddpm" not in problems[0] and "\n" not in problems[0]


def test_the_default_keeps_the_hash_and_a_sampler_changes_it():
    plain = compose_config()
    assert plain.sampling.sampler is None
    assert config_hash(compose_config("sampling.sampler=null")) == config_hash(plain)
    assert config_hash(compose_config("sampling.sampler=euler_a")) != config_hash(plain)
