"""Bad configs fail at compose time, before anything heavy loads, with a message that names the field."""

from __future__ import annotations

import time

import pytest
from conftest import compose_config

from lora_sweep.checks.validate import config_problems
from lora_sweep.tracking.metric_spec import DIRECTIONS

BAD = [  # (overrides, the field the message must name), across every group
    (["model.name=sd15"], "model.name"),
    (["model.resolution=0"], "model.resolution"),
    (["data=folder", "data.dir=/nonexistent/lora-sweep-data"], "data.dir"),
    (["data.validation_dir=/nonexistent/val"], "data.validation_dir"),
    (["data.validation_split=1.0"], "data.validation_split"),
    (["data.bucket_reso_steps=48"], "data.bucket_reso_steps"),
    (["data.latent_sample=mode"], "data.latent_sample"),
    (["data.caption_extension=txt"], "data.caption_extension"),
    (["data.keep_tokens=-1"], "data.keep_tokens"),
    (["data.max_token_length=100"], "data.max_token_length"),
    (["noise.offset=-0.1"], "noise.offset"),
    (["noise.multires_discount=1.5"], "noise.multires_discount"),
    (["noise.ip_gamma=-1"], "noise.ip_gamma"),
    (["noise.min_timestep=-1"], "noise.min_timestep"),
    (["noise.max_timestep=1001"], "noise.max_timestep"),
    (["noise.min_timestep=500", "noise.max_timestep=500"], "noise.min_timestep"),
    (["loss.type=l3"], "loss.type"),
    (["loss.huber_c=0"], "loss.huber_c"),
    (["loss.min_snr_gamma=-1"], "loss.min_snr_gamma"),
    (["optimizer.name=sgd"], "optimizer.name"),
    (["optimizer.lr=-1"], "optimizer.lr"),
    (["optimizer.scheduler=step"], "optimizer.scheduler"),
    (["optimizer.scheduler=constant", "optimizer.warmup_steps=10"], "optimizer.warmup_steps"),
    (["precision.name=fp4"], "precision.name"),
    (["network.rank=0"], "network.rank"),
    (["network.alpha=-1"], "network.alpha"),  # 0 is alpha = rank, as v0.8.7
    (["network.dropout=1.0"], "network.dropout"),
    (["network.rank_dropout=1.0"], "network.rank_dropout"),
    (["network.module_dropout=-0.1"], "network.module_dropout"),
    (["network.scale_weight_norms=-1"], "network.scale_weight_norms"),
    (["train.grad_accum=0"], "train.grad_accum"),
    (["train.seed=-1"], "train.seed"),
    (["train.max_grad_norm=-1"], "train.max_grad_norm"),
    (["train.keep_states=0"], "train.keep_states"),
    (["train.save_every=-5"], "train.save_every"),
    (["train.save_every_epochs=-1"], "train.save_every_epochs"),
    (["train.output_name=a/b"], "train.output_name"),
    (["train.resume=/nonexistent/state-step00000001.pt"], "train.resume"),
    (["train.on_nan=ignore"], "train.on_nan"),
    (["train.device=tpu"], "train.device"),
    (["train.max_consecutive_skips=0"], "train.max_consecutive_skips"),
    (["sweep.on_busy=queue"], "sweep.on_busy"),
    (["sampling.steps=0"], "sampling.steps"),
    (["sampling.width=100"], "sampling.width"),
    (["sampling.prompt_file=/nonexistent/prompts.txt"], "sampling.prompt_file"),
    (["sampling.every=5"], "sampling.every"),
    (["sampling.sampler=eular_a"], "sampling.sampler"),  # no prompts: nothing to sample
    (["validation.timesteps=[100,1000]"], "validation.timesteps"),
    (["validation.every=5", "validation.fit_images=0"], "validation.every"),  # no fit or held-out images
    (["validation.fit_images=-1"], "validation.fit_images"),
    (["tracking.flush_every=0"], "tracking.flush_every"),
]


@pytest.mark.parametrize("overrides,field", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_each_bad_value_names_its_field(overrides, field):
    problems = config_problems(compose_config(*overrides))
    assert any(p.startswith(field) or f" {field}" in p for p in problems), problems


def test_kohyas_dropouts_accept_zero_and_refuse_one_with_the_reason():
    assert config_problems(compose_config("network.rank_dropout=0", "network.module_dropout=0.5",
                                          "network.scale_weight_norms=0")) == []
    [problem] = config_problems(compose_config("network.rank_dropout=1"))
    assert problem.startswith("network.rank_dropout: must be a probability in [0, 1) (null is off;")
    assert "multiplies the LoRA's scale by 1 / (1 - p): p = 1 divides by zero" in problem


MARKS = {"network.dropout": "F.dropout", "network.rank_dropout": "1 / (1 - p)",
         "network.module_dropout": "skips every module"}


@pytest.mark.parametrize(("override", "reason"), [
    ("network.dropout=3", "F.dropout refuses p outside [0, 1], and p = 1 zeroes every output"),
    ("network.rank_dropout=1.5", "p = 1 divides by zero, p > 1 zeroes every rank under a negative scale"),
    ("network.module_dropout=1.5", "p >= 1 skips every module at every step, so nothing trains"),
])
def test_each_dropout_says_its_own_reason(override, reason):
    """The tester's values (item 2): each key's reason, and no other key's."""
    key = override.split("=")[0]
    [problem] = config_problems(compose_config(override))
    assert problem.startswith(f"{key}: must be a probability in [0, 1)") and reason in problem
    assert [mark for other, mark in MARKS.items() if mark in problem] == [MARKS[key]]


def test_a_value_from_network_args_is_named_as_such():
    """The tester's item 5: rank_dropout=1.5 came from network_args, so the message names that, not network.*."""
    problems = config_problems(compose_config('network.network_args=["conv_dim=abc","rank_dropout=1.5"]'))
    assert problems[0].startswith("network.network_args rank_dropout=1.5: must be a probability in [0, 1)")
    assert problems[1] == "network.network_args: conv_dim='abc' is not int (v0.8.7 converts it with int())."
    [conv] = config_problems(compose_config('network.network_args=["conv_dim=-1"]'))
    assert conv.startswith("network.network_args conv_dim=-1: must be null (no LoCon)")


def test_table_covers_at_least_fifteen_values_across_every_group():
    groups = {field.split(".")[0] for _, field in BAD}
    assert len(BAD) >= 15
    assert {"model", "data", "noise", "loss", "optimizer", "precision", "network", "train", "sampling",
            "validation", "tracking"} <= groups


def test_all_problems_are_reported_together():
    problems = config_problems(compose_config("train.grad_accum=0", "loss.type=l3", "network.dropout=2"))
    fields = ("loss.type", "network.dropout", "train.grad_accum")
    assert len(problems) == 3 and all(map(str.startswith, problems, fields)), problems


def test_enum_messages_list_the_options():
    message = "\n".join(config_problems(
        compose_config("train.on_nan=ignore", "optimizer.scheduler=step", "precision.name=fp4")))
    assert "skip_step" in message and "cosine" in message and "fp8_bf16" in message


def test_good_combinations_pass(tmp_path):
    assert config_problems(compose_config("sampling.every=5", "sampling.prompts=[a cat]", "validation.every=5",
                                          "data.validation_split=0.2", "train.save_every_epochs=2")) == []
    state = tmp_path / "state-step00000001.pt"
    state.write_bytes(b"")
    assert config_problems(compose_config(f"train.resume={state}")) == []


def test_validation_is_fast_and_loads_no_model():
    start = time.perf_counter()
    cfg = compose_config("model=sdxl", "model.path=/nonexistent/sdxl.safetensors")
    assert any("model.path" in p for p in config_problems(cfg))
    assert time.perf_counter() - start < 5


def test_zero_is_off_like_null_for_optional_strengths():
    """kohya tests these as `if args.x:`; a GUI's default 0 must not fail a run (sd-scripts #1275)."""
    assert config_problems(compose_config("noise=none", "noise.adaptive_scale=0")) == []
    assert config_problems(compose_config("noise=offset", "noise.adaptive_scale=0")) == []
    assert config_problems(compose_config("loss.min_snr_gamma=0")) == []
    problems = config_problems(compose_config("noise=none", "noise.adaptive_scale=0.1"))
    assert any("noise.adaptive_scale" in p for p in problems)  # a real strength still needs an offset


def test_fixed_resolution_without_buckets_must_suit_the_vae():
    problems = config_problems(compose_config("data.enable_bucket=false", "data.resolution=100"))
    assert any(p.startswith("data.resolution: must be a multiple of 8") for p in problems), problems
    assert config_problems(compose_config("data.enable_bucket=false", "data.resolution='832,1216'")) == []


@pytest.mark.parametrize("overrides, starts", [
    (["noise.offset=-1", "noise.ip_gamma=-0.1"], ["noise.offset = -1.0 is negative", "noise.ip_gamma = -0.1"]),
    (["noise.offset=-1", "noise.min_timestep=600", "noise.max_timestep=500"],
     ["noise.offset = -1.0 is negative", "noise.min_timestep = 600 is not below noise.max_timestep = 500"]),
    (["loss.huber_c=2", "loss.min_snr_gamma=-1"], ["loss.huber_c = 2.0", "loss.min_snr_gamma = -1.0"]),
    (["validation.timesteps=[2000,-5]"],
     ["validation.timesteps: must be in [0, 1000), got 2000", "validation.timesteps: must be in [0, 1000), got -5"]),
    (["data.resolution=abc", "data.bucket_reso_steps=33", "data.min_bucket_reso=2048", "data.max_bucket_reso=32"],
     ["data.resolution: 'abc'", "data.bucket_reso_steps: 33", "data.min_bucket_reso (2048) is larger than "
      "data.max_bucket_reso (32)"]),
    (["optimizer.scheduler=step", "optimizer.warmup_steps=-1"], ["optimizer.scheduler", "optimizer.warmup_steps"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and "=" in v[0] else None)
def test_every_bad_value_of_one_group_is_reported_not_the_first(overrides, starts):
    """Each group's check names every problem, not the first (offset does not hide ip_gamma and the timesteps,
    huber_c does not hide min_snr_gamma, 2000 does not hide -5, a bad resolution does not hide the buckets)."""
    problems = config_problems(compose_config(*overrides))
    assert len(problems) == len(starts), problems
    for problem, start in zip(problems, starts, strict=True):
        assert problem.startswith(start), (problem, start)


def test_a_resume_value_that_is_no_file_is_shown_as_typed(tmp_path, monkeypatch):
    """`train.resume=sometimes` is shown as typed, not "got /tmp/userA/sometimes" (made absolute, hiding the typo)."""
    from lora_sweep.paths import make_paths_absolute

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("train.resume=sometimes")
    make_paths_absolute(cfg)
    assert [p for p in config_problems(cfg) if p.startswith("train.resume")] == [
        "train.resume: must be auto, never, a state file (state-step*.pt) or a run's state folder, got 'sometimes' "
        "(no such file or folder; a relative path is read from the folder the command was started in)."]
    (tmp_path / "states").mkdir()  # a relative path that exists is still made absolute, and accepted
    cfg = compose_config("train.resume=states")
    assert make_paths_absolute(cfg) == {"train.resume": str(tmp_path / "states")}
    assert not [p for p in config_problems(cfg) if p.startswith("train.resume")]


def test_a_relative_dataset_config_and_reg_folder_are_hashed_as_the_paths_meant(tmp_path, monkeypatch):
    """`data.dataset_config=ds.toml` and `data.reg_data_dir=reg` are made absolute against the launch folder before the
    hash, like data.dir: the same file started from two folders is two configs, and Slurm or Ray jobs find it."""
    from lora_sweep.paths import make_paths_absolute

    monkeypatch.chdir(tmp_path)
    cfg = compose_config("data.dataset_config=ds.toml", "data.reg_data_dir=reg")
    assert make_paths_absolute(cfg) == {"data.dataset_config": str(tmp_path / "ds.toml"),
                                        "data.reg_data_dir": str(tmp_path / "reg")}


def test_max_token_length_takes_kohyas_choices_and_the_guis_75():
    for value in ("null", "75", "150", "225"):
        assert config_problems(compose_config(f"data.max_token_length={value}")) == []
    assert config_problems(compose_config("data.max_token_length=300")) == [
        "data.max_token_length: must be null, 75, 150 or 225 (kohya's --max_token_length: the text tokens of a "
        "caption, in chunks of 75; null and 75 are the same), got 300."]


# the table of default directions as the messages list it (issue 30's metrics may add rows)
METRIC_TABLE = ", ".join(f"{m} ({d})" for m, d in DIRECTIONS.items())


@pytest.mark.parametrize(("override", "message"), [
    ("compare.select=my/score", "compare.select = 'my/score': my/score has no default direction; write "
                                f"my/score:max or my/score:min. Metrics with a default direction: {METRIC_TABLE}."),
    ("compare.select=fit/loss:lowest",
     "compare.select = 'fit/loss:lowest': the direction after ':' must be max or min, not 'lowest'."),
    ("sweep.stop_early.metric=:min",
     "sweep.stop_early.metric = ':min' names no metric: write METRIC[:max|min], e.g. fit/loss or img/diversity:max. "
     f"Metrics with a default direction: {METRIC_TABLE}."),
    ("sweep.stop_early.rule=mean", "sweep.stop_early.rule: 'mean' is not one of median, diverged."),
    ("sweep.stop_early.grace_steps=-1", "sweep.stop_early.grace_steps: must be >= 0, got -1."),
    ("sweep.stop_early.min_peers=0", "sweep.stop_early.min_peers: must be > 0, got 0."),
    ("sweep.stop_early.margin=-0.1", "sweep.stop_early.margin: must be a finite number >= 0 (diverged: how much worse "
                                     "than the run's step-0 value, in the metric's units), got -0.1."),
    ("sweep.stop_early.margin=nan", "sweep.stop_early.margin: must be a finite number >= 0 (diverged: how much worse "
                                    "than the run's step-0 value, in the metric's units), got nan."),
    ("sweep.stop_early.timeout=0", "sweep.stop_early.timeout: must be a finite number of seconds > 0 (how long the "
                                   "store may take to answer), got 0.0."),
])
def test_a_bad_metric_spec_or_stop_rule_gets_one_paragraph(override, message):
    assert config_problems(compose_config(override)) == [message]


def test_every_bad_stop_early_and_select_value_is_reported_at_once():
    problems = config_problems(compose_config(
        "compare.select=my/score", "sweep.stop_early.metric=fit/loss:up", "sweep.stop_early.rule=mean",
        "sweep.stop_early.min_peers=0", "sweep.stop_early.timeout=-1"))
    assert [p.split(" ")[0].rstrip(":") for p in problems] == [
        "sweep.stop_early.metric", "sweep.stop_early.rule", "sweep.stop_early.min_peers", "sweep.stop_early.timeout",
        "compare.select"]
    assert config_problems(compose_config(
        "compare.select=my/score:max", "sweep.stop_early.metric=val/loss", "sweep.stop_early.rule=diverged",
        "sweep.stop_early.grace_steps=0", "sweep.stop_early.min_peers=1", "sweep.stop_early.margin=0.5",
        "validation.every=100", "data.validation_split=0.1")) == []


NEVER_JUDGED = ("so the rule would never judge a run. Stop on a metric logged at evaluation steps: fit/loss or "
                "val/loss (validation.every > 0), or a scorecard metric img/copying, img/diversity, img/clip_t, "
                "img/clip_i, img/dino (sampling.every > 0); or leave sweep.stop_early.metric null.")
EVERY = "validation.every=100"
SAMPLING = ("sampling.every=100", "sampling.prompts=[a cat]")


@pytest.mark.parametrize(("overrides", "why"), [
    (("val/loss", EVERY), "val/loss needs held-out images (data.validation_split or data.validation_dir), and none "
                          "are set"),
    (("fit/loss", EVERY, "validation.fit_images=0", "data.validation_split=0.1"),
     "fit/loss is not logged while validation.fit_images is 0"),
    (("fit/loss",), "fit/loss is logged only at step 0 and at the end while validation.every is 0"),
    (("val/loss", "data.validation_split=0.1"),
     "val/loss is logged only at step 0 and at the end while validation.every is 0"),
    (("fit/loss_auc", EVERY), "fit/loss_auc is logged only at the end of a run"),
    (("img/copying", "sampling.prompts=[a cat]"),
     "img/copying is logged at sampling steps (sampling.every > 0 with prompts), and sampling.every is 0"),
    (("img/drift:min",), "img/drift is logged at sampling steps (sampling.every > 0 with prompts), and "
                         "sampling.every is 0"),
    (("img/clip_t", *SAMPLING), "img/clip_t needs evaluation.clip_model, which is null"),
    (("img/dino", *SAMPLING), "img/dino needs evaluation.dino_model, which is null"),
    (("img/diversity", *SAMPLING, "sampling.seeds=[7]"),
     "img/diversity needs two seeds per prompt or more (sampling.seeds), and there is one"),
    (("train/loss", EVERY), "train/loss is each variant's own objective (its loss weighting differs), not a common "
                            "yardstick, and it is logged every step"),
])
def test_a_stop_metric_never_logged_at_an_evaluation_step_is_refused(overrides, why):
    metric, *rest = overrides
    assert config_problems(compose_config(f"sweep.stop_early.metric={metric}", *rest)) == [
        f"sweep.stop_early.metric is {metric}, but {why}, {NEVER_JUDGED}"]


def test_a_stop_metric_logged_at_evaluation_steps_is_accepted():
    for overrides in (("fit/loss", EVERY), ("val/loss", EVERY, "data.validation_split=0.1"),
                      ("img/copying", *SAMPLING), ("img/diversity", *SAMPLING, "sampling.seeds=[1,2]"),
                      ("my/score:max",)):  # a metric of the user's own: it may be logged anywhere
        metric, *rest = overrides
        assert config_problems(compose_config(f"sweep.stop_early.metric={metric}", *rest)) == [], overrides
