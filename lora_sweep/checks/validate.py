"""What a composed config's types cannot say: ranges, enums, combinations, paths, and keys added with '+'.

`config_problems` lists every problem, each naming its field and what it accepts. An optional strength of 0 is off,
like null (`noise.adaptive_scale`, `loss.min_snr_gamma`): kohya tests them as `if args.x:`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig

from lora_sweep.errors import ConfigError, ConfigErrors, Problems, UserError, problem_messages
from lora_sweep.paths import absolute

MODELS = ("tiny", "tiny_random", "sdxl")
DATASETS = ("photos", "folder")
ON_NAN = ("stop", "skip_step")
DEVICES = ("auto", "cpu", "cuda")
LATENT_SAMPLE = ("sample", "mean")
RESUME = ("auto", "never")
ON_BUSY = ("wait", "skip")
STOP_EARLY_RULES = ("median", "diverged")
MAX_TOKEN_LENGTHS = (None, 75, 150, 225)  # kohya's --max_token_length choices, plus the GUI's 75 (= null)
SEED_MAX = 2**32 - 1  # numpy's seed range; kohya's seeds live there too
NUM_TRAIN_TIMESTEPS = 1000


def _enum(field: str, value, accepted) -> None:
    if value not in accepted:
        raise ConfigError(f"{field}: '{value}' is not one of {', '.join(map(str, accepted))}.")


def _positive(field: str, value, *, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{field}: must be {'>= 0' if allow_zero else '> 0'}, got {value}.")


def _range(field: str, value, low, high, *, high_open: bool = False) -> None:
    """low <= value <= high (or < high)."""
    if value is None or value < low or value > high or (high_open and value == high):
        raise ConfigError(f"{field}: must be in [{low}, {high}{')' if high_open else ']'}, got {value}.")


def _fail(field: str, value, accepted: str) -> None:
    raise ConfigError(f"{field}: must be {accepted}, got {value}.")


def _naming(field: str, check: Callable, *args) -> None:
    """Run a module's own check; make sure its message names the config field (they say `optimizer='x'`)."""
    try:
        check(*args)
    except UserError as exc:
        raise ConfigError(str(exc) if field in str(exc) else f"{field}: {exc}") from exc


def _existing(field: str, value, *, kind: str = "file") -> None:
    path = Path(str(value)).expanduser()
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        other = " (it is a folder)" if kind == "file" and path.is_dir() else ""
        raise ConfigError(f"{field}: '{value}' is not an existing {kind}{other}.")


def _checks(cfg) -> list[Callable[[], None]]:
    """Every value check of `cfg`, one call each, by config group in the order their problems are listed."""
    return [
        *_model_checks(cfg.model),
        *_data_checks(cfg.data),
        lambda: _dataset_checks(cfg),
        lambda: _workers_check(cfg),
        *_noise_checks(cfg.noise),
        *_loss_checks(cfg.loss),
        lambda: _v_pred_checks(cfg),
        *_optimizer_checks(cfg),
        *_precision_checks(cfg),
        *_network_checks(cfg.network),
        *_train_checks(cfg.train),
        lambda: _enum("sweep.on_busy", cfg.sweep.on_busy, ON_BUSY),
        *_stop_early_checks(cfg.sweep.stop_early),
        lambda: _stop_metric_is_logged(cfg),
        *_sampling_checks(cfg.sampling),
        *_validation_checks(cfg.validation, cfg.data),
        *_tracking_checks(cfg.tracking),
        lambda: _metric_spec("compare.select", cfg.compare.select),
    ]


def _model_checks(m) -> list[Callable[[], None]]:
    return [
        lambda: _enum("model.name", m.name, MODELS),
        lambda: _check_model_path(m),
        lambda: _positive("model.resolution", m.resolution),
        lambda: m.clip_skip is None or _positive("model.clip_skip", m.clip_skip),  # recorded only, but a layer count
    ]


def _data_checks(d) -> list[Callable[[], None]]:
    from lora_sweep.data import buckets

    return [
        lambda: _enum("data.name", d.name, DATASETS),
        lambda: _check_data_dir(d),
        lambda: d.validation_dir is None or _existing("data.validation_dir", d.validation_dir, kind="folder"),
        lambda: d.caption_extension.startswith(".") or _fail("data.caption_extension", d.caption_extension,
                                                               "a file extension starting with '.' (e.g. .txt)"),
        lambda: _enum("data.latent_sample", d.latent_sample, LATENT_SAMPLE),
        lambda: _positive("data.keep_tokens", d.keep_tokens, allow_zero=True),
        lambda: d.caption_separator != "" or _fail("data.caption_separator", "''", "a non-empty string"),
        lambda: d.enable_bucket or _check_fixed_resolution(d.resolution),
        lambda: buckets.check_bucket_options(
            resolution=d.resolution, reso_steps=d.bucket_reso_steps, min_reso=d.min_bucket_reso,
            max_reso=d.max_bucket_reso),
        lambda: _range("data.validation_split", d.validation_split, 0.0, 1.0, high_open=True),
        *(lambda key=key: _dataset_value(d, key) for key in _DATASET_VALUES),
        lambda: d.reg_data_dir is None or _existing("data.reg_data_dir", d.reg_data_dir, kind="folder"),
        lambda: d.max_token_length in MAX_TOKEN_LENGTHS or _fail(
            "data.max_token_length", d.max_token_length, "null, 75, 150 or 225 (kohya's --max_token_length: the text "
            "tokens of a caption, in chunks of 75; null and 75 are the same)"),
    ]


# the data.* keys that are kohya dataset-config keys too: range-checked as a file's values are
_DATASET_VALUES = ("caption_dropout_rate", "caption_dropout_every_n_epochs", "caption_tag_dropout_rate",
                   "token_warmup_min", "token_warmup_step")


def _dataset_value(d, key: str) -> None:
    from lora_sweep.data.subsets import value_problem

    problem = value_problem(key, d[key])
    if problem:
        raise ConfigError(f"data.{key}: {problem}.")


def _dataset_checks(cfg) -> None:
    """data.datasets / data.dataset_config read as kohya v0.8.7 reads them, and the combinations lora-sweep refuses
    (docs/datasets.md); the folders' contents are the pre-flight's."""
    from lora_sweep.data.subsets import dataset_problems
    from lora_sweep.paths import absolute

    folder = Path(absolute(cfg.data.dir)) if cfg.data.get("dir") else None  # get: data=folder's dir may be ???
    problems = dataset_problems(cfg, folder)
    if problems:
        raise ConfigErrors(problems)


def _workers_check(cfg) -> None:
    """data.max_data_loader_n_workers: the workers of the kohya run whose image order lora-sweep follows. With
    workers, v0.8.7 draws caption randomness from each worker's own stream (and reads the step as the workers race),
    which lora-sweep does not reproduce: refused with captions that change per step."""
    from lora_sweep.data.subsets import per_step_captions

    n = cfg.data.max_data_loader_n_workers
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        _fail("data.max_data_loader_n_workers", n, "an int >= 0: the data-loader workers of the kohya run whose image "
              "order lora-sweep follows (kohya's --max_data_loader_n_workers; 0, the GUI's default, loads in the "
              "training process)")
    if n > 0 and (reason := per_step_captions(cfg)):
        raise ConfigError(
            f"data.max_data_loader_n_workers: {n} workers make v0.8.7 draw caption shuffles and dropouts from each "
            f"worker's own random stream and read the step as the workers race, which lora-sweep does not "
            f"reproduce; the captions change per step under {reason}. Set data.max_data_loader_n_workers to 0, or "
            "turn that caption option off.")


def _noise_checks(n) -> list[Callable[[], None]]:
    from lora_sweep.training import noise

    return [
        lambda: noise.check_noise_options(
            offset=n.offset, offset_random_strength=n.offset_random_strength,
            adaptive_scale=_off_if_zero(n.adaptive_scale),
            multires_iterations=n.multires_iterations, multires_discount=n.multires_discount,
            ip_gamma=n.ip_gamma, ip_gamma_random_strength=n.ip_gamma_random_strength,
            min_timestep=n.min_timestep, max_timestep=n.max_timestep, num_timesteps=NUM_TRAIN_TIMESTEPS),
    ]


def _loss_checks(lo) -> list[Callable[[], None]]:
    from lora_sweep.training import loss

    return [
        lambda: loss.check_loss_options(
            loss_type=lo.type, huber_schedule=lo.huber_schedule, huber_c=lo.huber_c,
            min_snr_gamma=_off_if_zero(lo.min_snr_gamma), debiased=lo.debiased),
        lambda: math.isfinite(lo.prior_loss_weight) and lo.prior_loss_weight >= 0 or _fail(
            "loss.prior_loss_weight", lo.prior_loss_weight, "a finite number >= 0 (1.0: reg images weigh as train "
            "images)"),
    ]


def _v_pred_checks(cfg) -> None:
    from lora_sweep.training import loss

    lo = cfg.loss
    loss.check_v_pred_options(lo.scale_v_pred_loss_like_noise_pred, lo.v_pred_like_loss, cfg.model.v_prediction)


def _optimizer_checks(cfg) -> list[Callable[[], None]]:
    from lora_sweep.training import optim, schedules

    return [
        lambda: _naming("optimizer.name", optim.resolve_optimizer_name, cfg.optimizer.name),
        lambda: _positive("optimizer.lr", cfg.optimizer.lr, allow_zero=True),
        # 0 is v0.8.7's constant lr (no cycle ever ends); a negative count has no meaning
        lambda: _positive("optimizer.lr_scheduler_num_cycles", cfg.optimizer.lr_scheduler_num_cycles, allow_zero=True),
        lambda: _check_scheduler(optim, schedules, cfg),
    ]


def _precision_checks(cfg) -> list[Callable[[], None]]:
    from lora_sweep.training import precision

    t = cfg.train
    return [
        lambda: _naming("precision.name", precision.precision_policy, cfg.precision.name,
                        t.device if t.device in ("cpu", "cuda") else "cuda"),
        lambda: precision.check_full_precision(cfg.precision.name, cfg.precision.full_fp16, cfg.precision.full_bf16),
    ]


def _network_checks(net) -> list[Callable[[], None]]:
    return [
        lambda: _positive("network.rank", net.rank),
        lambda: _positive("network.alpha", net.alpha, allow_zero=True),  # 0: alpha = rank, as v0.8.7
        lambda: _dropout_rate("network.dropout", net.dropout, "0 is off", _NEURON_DROPOUT),
        lambda: _dropout_rate(_network_field(net, "rank_dropout"), _network_value(net, "rank_dropout"), "null is off",
                              _RANK_DROPOUT),
        lambda: _dropout_rate(_network_field(net, "module_dropout"), _network_value(net, "module_dropout"),
                              "null is off", _MODULE_DROPOUT),
        lambda: net.scale_weight_norms is None or net.scale_weight_norms >= 0 or _fail(
            "network.scale_weight_norms", net.scale_weight_norms, "> 0 (v0.8.7's --scale_weight_norms: the largest "
            "Frobenius norm of a module's alpha/rank * up @ down, kept after every micro-batch), or 0 or null for off"),
        lambda: _network_settings(net),
    ]


def _network_value(net, key: str):
    """network.<key> or its network_args value; None when network_args does not parse (_network_settings says so)."""
    from lora_sweep.model.network_settings import network_value

    try:
        return network_value(net, key)
    except ValueError:
        return None


def _network_field(net, key: str) -> str:
    from lora_sweep.model.network_settings import network_field

    return network_field(net, key)


# Why each kohya dropout refuses p outside [0, 1) (docs/kohya-reference.md §8), as v0.8.7's LoRAModule uses it
_NEURON_DROPOUT = ("v0.8.7 applies F.dropout(p) to each LoRA down output: F.dropout refuses p outside [0, 1], and "
                   "p = 1 zeroes every output, so the LoRA adds nothing and nothing trains.")
_RANK_DROPOUT = ("v0.8.7 zeroes each rank with probability p and multiplies the LoRA's scale by 1 / (1 - p): p = 1 "
                 "divides by zero, p > 1 zeroes every rank under a negative scale, and p < 0 shrinks the scale.")
_MODULE_DROPOUT = ("v0.8.7 skips a module's LoRA for the step when a uniform draw in [0, 1) falls below p: p >= 1 "
                   "skips every module at every step, so nothing trains, and p < 0 never skips (write null).")


def _dropout_rate(field: str, value, off: str, why: str) -> None:
    """A kohya dropout probability in [0, 1) (docs/kohya-reference.md §8), with `why` v0.8.7 fails outside it.
    None (null) is off."""
    if value is not None and not 0 <= value < 1:
        raise ConfigError(f"{field}: must be a probability in [0, 1) ({off}; 0 < p < 1 drops that share, as v0.8.7), "
                          f"got {value}. {why}")


def _network_settings(net) -> None:
    from lora_sweep.model.network_settings import network_problems

    problems = network_problems(net)
    if problems:
        raise ConfigErrors(problems)


def _train_checks(t) -> list[Callable[[], None]]:
    return [
        lambda: _positive("train.max_steps", t.max_steps),
        lambda: _positive("train.batch_size", t.batch_size),
        lambda: _positive("train.grad_accum", t.grad_accum),
        lambda: _range("train.seed", t.seed, 0, SEED_MAX),
        lambda: _positive("train.lr", t.lr, allow_zero=True),
        lambda: t.text_encoder_lr is None or _positive("train.text_encoder_lr", t.text_encoder_lr, allow_zero=True),
        lambda: _positive("train.max_grad_norm", t.max_grad_norm, allow_zero=True),
        lambda: _check_output_name(t.output_name),
        lambda: _positive("train.save_every", t.save_every, allow_zero=True),
        lambda: _positive("train.save_every_epochs", t.save_every_epochs, allow_zero=True),
        lambda: _positive("train.keep_states", t.keep_states),
        lambda: t.max_train_epochs is None or _positive("train.max_train_epochs", t.max_train_epochs),
        lambda: t.save_last_n_steps is None or _positive("train.save_last_n_steps", t.save_last_n_steps,
                                                         allow_zero=True),
        lambda: t.save_last_n_epochs is None or _positive("train.save_last_n_epochs", t.save_last_n_epochs),
        lambda: _save_precision(t.save_precision),
        lambda: t.resume in RESUME or Path(absolute(t.resume)).exists() or _fail(
            "train.resume", f"'{t.resume}' (no such file or folder; a relative path is read from the folder the "
            "command was started in)", "auto, never, a state file (state-step*.pt) or a run's state folder"),
        lambda: _enum("train.on_nan", t.on_nan, ON_NAN),
        lambda: _enum("train.device", t.device, DEVICES),
        lambda: _positive("train.max_consecutive_skips", t.max_consecutive_skips),
        lambda: _unet_switches(t),
    ]


def _save_precision(value) -> None:
    from lora_sweep.training.checkpoint import SAVE_DTYPES

    if value is not None and value not in SAVE_DTYPES:
        _fail("train.save_precision", f"'{value}'", f"null (the training dtype) or one of {', '.join(SAVE_DTYPES)}")


def _unet_switches(t) -> None:
    """train.xformers needs the xformers package; train.dynamo_backend one of v0.8.7's choices (as its argparse), and
    with train.torch_compile one this torch has."""
    from lora_sweep.model import attention

    found = Problems()
    if t.xformers and not t.mem_eff_attn and not attention.xformers_available():
        found.add("train.xformers = true needs the xformers package, which is not installed here. Install it (pip "
                  "install xformers, matching your torch), or use train.sdpa=true (PyTorch's own memory-efficient "
                  "attention, lora-sweep's default anyway).")
    problem = attention.dynamo_backend_problem(t.dynamo_backend, compiling=t.torch_compile)
    if problem:
        found.add(problem)
    found.raise_any()


def _stop_early_checks(se) -> list[Callable[[], None]]:
    return [
        lambda: _metric_spec("sweep.stop_early.metric", se.metric),
        lambda: _enum("sweep.stop_early.rule", se.rule, STOP_EARLY_RULES),
        lambda: _positive("sweep.stop_early.grace_steps", se.grace_steps, allow_zero=True),
        lambda: _positive("sweep.stop_early.min_peers", se.min_peers),
        lambda: math.isfinite(se.margin) and se.margin >= 0 or _fail(
            "sweep.stop_early.margin", se.margin, "a finite number >= 0 (diverged: how much worse than the run's "
            "step-0 value, in the metric's units)"),
        lambda: math.isfinite(se.timeout) and se.timeout > 0 or _fail(
            "sweep.stop_early.timeout", se.timeout, "a finite number of seconds > 0 (how long the store may take to "
            "answer)"),
    ]


def _stop_metric_is_logged(cfg) -> None:
    """sweep.stop_early.metric must be logged at evaluation steps before the last, or the rule would never judge."""
    from lora_sweep.tracking.metric_spec import parse_metric_spec

    text = cfg.sweep.stop_early.metric
    try:
        name = parse_metric_spec(text, "sweep.stop_early.metric").name if text is not None else None
    except ValueError:
        return  # _metric_spec says it
    missing = _why_never_judged(cfg, name) if name is not None else None
    if missing:
        raise ConfigError(f"sweep.stop_early.metric is {text}, but {missing}, so the rule would never judge a run. "
                          "Stop on a metric logged at evaluation steps: fit/loss or val/loss (validation.every > 0), "
                          "or a scorecard metric img/copying, img/diversity, img/clip_t, img/clip_i, img/dino "
                          "(sampling.every > 0); or leave sweep.stop_early.metric null.")


def _why_never_judged(cfg, name: str) -> str | None:
    """Why `name` is never logged at an evaluation step other than 0 and the last; None when it is (or may be)."""
    v, s, e, d = cfg.validation, cfg.sampling, cfg.evaluation, cfg.data
    if name == "train/loss":
        return ("train/loss is each variant's own objective (its loss weighting differs), not a common yardstick, "
                "and it is logged every step")
    if name in ("fit/loss_auc", "fit/steps_to_half"):
        return f"{name} is logged only at the end of a run"
    if name in ("fit/loss", "val/loss") and v.every == 0:
        return f"{name} is logged only at step 0 and at the end while validation.every is 0"
    if name == "fit/loss" and v.fit_images == 0:
        return "fit/loss is not logged while validation.fit_images is 0"
    if name == "val/loss" and not (d.validation_split > 0 or d.validation_dir):
        return "val/loss needs held-out images (data.validation_split or data.validation_dir), and none are set"
    if not name.startswith("img/"):
        return None
    if s.every == 0 or not (s.prompts or s.prompt_file):
        return f"{name} is logged at sampling steps (sampling.every > 0 with prompts), and " + (
            f"sampling.every is {s.every}" if s.every == 0 else "no prompts are set")
    if name in ("img/clip_t", "img/clip_i") and e.clip_model is None:
        return f"{name} needs evaluation.clip_model, which is null"
    if name == "img/dino" and e.dino_model is None:
        return "img/dino needs evaluation.dino_model, which is null"
    if name == "img/diversity" and len(set(s.seeds)) < 2:
        return "img/diversity needs two seeds per prompt or more (sampling.seeds), and there is one"
    return None


def _metric_spec(field: str, text) -> None:
    """A `METRIC[:max|min]` setting; null is off. The spec's own paragraph names the field."""
    from lora_sweep.tracking.metric_spec import parse_metric_spec

    if text is not None:
        try:
            parse_metric_spec(text, field)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc


def _sampling_checks(s) -> list[Callable[[], None]]:
    return [
        lambda: _positive("sampling.every", s.every, allow_zero=True),
        lambda: _positive("sampling.steps", s.steps),
        lambda: _positive("sampling.cfg", s.cfg, allow_zero=True),
        lambda: s.width is None or _multiple_of_8("sampling.width", s.width),
        lambda: s.height is None or _multiple_of_8("sampling.height", s.height),
        lambda: _range("sampling.seed", s.seed, 0, SEED_MAX),
        lambda: _seed_list("sampling.seeds", s.seeds),
        lambda: _sampler(s.sampler),
        lambda: s.prompt_file is None or _existing("sampling.prompt_file", s.prompt_file),
        lambda: s.every == 0 or s.prompts or s.prompt_file or _fail(
            "sampling.every", s.every, "0 when no prompts are set (set sampling.prompts or sampling.prompt_file)"),
    ]


def _seed_list(field: str, seeds) -> None:
    """Each seed an integer in [0, SEED_MAX], none twice (two equal seeds draw the same sample)."""
    bad = [seed for seed in seeds if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= SEED_MAX]
    twice = sorted({seed for seed in seeds if list(seeds).count(seed) > 1} - set(bad), key=str)
    if bad or twice:
        why = (f"{', '.join(map(repr, bad))} not in [0, {SEED_MAX}]" if bad else "") + ("; " if bad and twice else "")
        why += f"{', '.join(map(str, twice))} given more than once" if twice else ""
        _fail(field, list(seeds), f"a list of distinct integer seeds in [0, {SEED_MAX}] ({why}), e.g. [42, 43]; "
              "[] samples at sampling.seed alone")


def _sampler(name) -> None:
    from lora_sweep.sampling.schedulers import sampler_problem

    problem = sampler_problem(name, "sampling.sampler")
    if problem:
        raise ConfigError(problem)


def _validation_checks(v, d) -> list[Callable[[], None]]:
    return [
        lambda: _positive("validation.every", v.every, allow_zero=True),
        lambda: _every_timestep(v.timesteps),
        lambda: v.timesteps or _fail("validation.timesteps", "[]", "a non-empty list of timesteps in [0, 1000)"),
        lambda: _range("validation.seed", v.seed, 0, SEED_MAX),
        lambda: _positive("validation.fit_images", v.fit_images, allow_zero=True),
        lambda: v.every == 0 or v.fit_images > 0 or d.validation_split > 0 or d.validation_dir or _fail(
            "validation.every", v.every, "0 without fit/loss images or held-out images (set validation.fit_images, "
            "data.validation_split or data.validation_dir)"),
    ]


def _tracking_checks(tr) -> list[Callable[[], None]]:
    return [
        lambda: tr.experiment.strip() != "" or _fail("tracking.experiment", "''", "a non-empty name"),
        lambda: _positive("tracking.flush_every", tr.flush_every),
    ]


def _check_fixed_resolution(resolution) -> None:
    """With buckets off every image is cropped to data.resolution, which the VAE needs in multiples of 8."""
    from lora_sweep.data.buckets import parse_resolution

    try:
        size = parse_resolution(resolution)
    except ConfigError:
        return  # check_bucket_options reports it
    if size[0] % 8 or size[1] % 8:
        _fail("data.resolution", f"{size[0]}x{size[1]}", "a multiple of 8 pixels on each side when "
              "data.enable_bucket=false (the VAE downsamples by 8); with buckets on, sizes are rounded for you")


def _off_if_zero(value):
    """0 is off, like null (kohya tests `if args.x:`; GUIs write 0 for unset); the trainer computes for 0 what kohya
    does (min-SNR: no weighting; adaptive scale: offset + 0 * |mean|)."""
    return None if value == 0 else value


def _multiple_of_8(field: str, value: int) -> None:
    if value <= 0 or value % 8:
        _fail(field, value, "a positive multiple of 8 pixels (the VAE downsamples by 8)")


def _check_output_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        _fail("train.output_name", repr(name), "a plain file name without folders (e.g. my_lora)")


def _every_timestep(timesteps) -> None:
    """Name each bad timestep of validation.timesteps, not the first only."""
    found = Problems()
    for ts in timesteps:
        found.check(_range, "validation.timesteps", ts, 0, NUM_TRAIN_TIMESTEPS, high_open=True)
    found.raise_any()


def _check_scheduler(optim, schedules, cfg) -> None:
    """The schedule settings as v0.8.7's get_scheduler_fix checks them, after get_optimizer's Adafactor rewrite."""
    o, t = cfg.optimizer, cfg.train
    warmup = schedules.warmup_problem(o.warmup_steps, t.max_steps)
    try:
        name = optim.resolve_optimizer_name(o.name)
        arguments = optim.optimizer_arguments(name, dict(o.args), list(o.optimizer_args))
        relative = name == "adafactor" and bool(arguments.kwargs["relative_step"])
    except UserError:
        name, relative = o.name, False  # reported by the optimizer checks
    problems = schedules.schedule_problems(
        o.scheduler, effective=schedules.adafactor_name(t.lr) if relative else o.scheduler, optimizer_name=name,
        warmup_steps=0 if warmup else o.warmup_steps, max_steps=t.max_steps, lr=t.lr,
        num_cycles=o.lr_scheduler_num_cycles, power=o.lr_scheduler_power, scheduler_args=dict(o.lr_scheduler_args))
    problems += [warmup] if warmup else []  # a bad scheduler and a bad warmup are both named
    if problems:
        raise ConfigErrors(problems)


def _check_model_path(m) -> None:
    from lora_sweep.model.loading import check_model_path

    if m.name == "sdxl" or m.path:
        check_model_path(m.path)


def _check_data_dir(d) -> None:
    if d.datasets or d.dataset_config:
        return  # the subsets name the folders; _dataset_checks refuses data.dir beside them
    if d.name == "folder" and not d.dir:
        raise ConfigError(
            "data.dir: data=folder trains on your own dataset, and data.dir is not set. Set data.dir=PATH, a folder "
            "in kohya's layout (<dir>/<repeats>_<name>/ with images and .txt captions), on the command line, or use "
            "data=photos for the bundled photos. An experiment imported from a LoRA gets it from `python -m "
            "lora_sweep import LORA --data DIR`, DIR holding the LoRA's image folders.")
    if d.name == "folder" or d.dir:
        if not Path(d.dir).expanduser().is_dir():
            raise ConfigError(
                f"data.dir: '{d.dir}' is not a folder. Set data.dir to a dataset in kohya's layout "
                "(<dir>/<repeats>_<name>/ with images and .txt captions), or use data=photos for the bundled photos."
            )


def list_option_conflicts(cfg) -> list[str]:
    """`groups.option_conflicts` of the overrides in the composed config's `hydra` node; [] without that node."""
    from omegaconf import OmegaConf

    from lora_sweep.checks.groups import option_conflicts

    overrides = OmegaConf.select(cfg, "hydra.overrides.task", default=None) if isinstance(cfg, DictConfig) else None
    if overrides is None:
        return []
    return option_conflicts(list(overrides), OmegaConf.select(cfg, "hydra.job.config_name", default="config"))


def config_problems(cfg) -> list[str]:
    """Every problem of `cfg`, one message each naming its field (unknown `+` keys first); [] when it is valid."""
    from lora_sweep.checks.keys import unknown_key_message, unknown_keys

    keys = unknown_keys(cfg) if isinstance(cfg, DictConfig) else []
    problems = [unknown_key_message(key, added=True) for key in keys]
    for check in _checks(cfg):
        try:
            check()
        except UserError as exc:
            found = problem_messages(exc) if isinstance(exc, ConfigError) else [str(exc)]
            problems += [p for p in found if p not in problems]  # two checks may see one bad value
    return problems

