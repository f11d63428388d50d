"""The config schema (one dataclass per config group, registered with Hydra's ConfigStore) and `config_hash`.

Hydra merges `conf/<group>/<option>.yaml` onto these dataclasses, so a misspelt key in a file or a wrong type fails
at compose time; values are checked in `lora_sweep.checks`. No torch import: config checks answer in a second.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = "tiny"  # tiny (trained, shipped) | tiny_random | sdxl
    path: str | None = None  # diffusers folder or single .safetensors; tiny_random: built into the cache if null
    resolution: int = 64  # the model's native base resolution (tiny 64, SDXL 1024)
    v_prediction: bool = False  # kohya --v_parameterization (warns for SDXL, as kohya does)
    clip_skip: int | None = None  # --clip_skip: recorded only; v0.8.7's SDXL text encoding ignores it


@dataclass
class DataConfig:
    name: str = "photos"  # photos | folder
    dir: str | None = None  # kohya layout: <dir>/<repeats>_<name>/<image> + <image><caption_extension>
    caption_extension: str = ".txt"
    resolution: Any = "${model.resolution}"  # int or "W,H"
    enable_bucket: bool = True
    bucket_reso_steps: int = 32
    bucket_no_upscale: bool = False
    min_bucket_reso: int | None = None  # null: a quarter of the shorter side, down to a multiple of the steps
    max_bucket_reso: int | None = None  # null: twice the longer side, as kohya_ss's GUI uses 2048 for 1024
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    flip_aug: bool = False
    # kohya's dataset config (docs/datasets.md): the same keys as a subset, per dataset and per subset
    datasets: list[dict[str, Any]] = field(default_factory=list)  # [[datasets]] tables: resolution, subsets, ...
    dataset_config: str | None = None  # --dataset_config: a .toml or .json read as v0.8.7 reads it
    reg_data_dir: str | None = None  # --reg_data_dir: regularization images in <repeats>_<class> folders
    caption_prefix: str | None = None
    caption_suffix: str | None = None
    caption_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_tag_dropout_rate: float = 0.0
    keep_tokens_separator: str = ""  # e.g. "|||": the tags before it are kept in place (empty: keep_tokens counts)
    secondary_separator: str | None = None  # e.g. ";;;": joins tags that shuffle and drop out as one
    enable_wildcard: bool = False  # {red|blue} picks one per step; a multi-line caption file, one line per step
    token_warmup_min: int = 1
    token_warmup_step: float = 0.0  # < 1: a fraction of train.max_steps
    random_crop: bool = False  # refused: needs pixels encoded at every step
    color_aug: bool = False  # refused: needs pixels encoded at every step
    max_data_loader_n_workers: int = 0  # kohya's workers: v0.8.7's image order depends on them (docs/data.md)
    max_token_length: int | None = None  # --max_token_length: 150 or 225 encode 2 or 3 chunks of 75; null = 75
    cache_dir: str | None = None  # null: $LORA_SWEEP_CACHE_DIR, $XDG_CACHE_HOME/lora-sweep or ~/.cache/lora-sweep
    latent_sample: str = "sample"  # sample (kohya: one posterior sample) | mean
    validation_split: float = 0.0
    validation_dir: str | None = None


@dataclass
class NoiseConfig:
    offset: float = 0.0  # kohya --noise_offset
    offset_random_strength: bool = False  # --noise_offset_random_strength
    adaptive_scale: float | None = None  # --adaptive_noise_scale (needs offset)
    multires_iterations: int = 0  # --multires_noise_iterations
    multires_discount: float = 0.3  # --multires_noise_discount
    ip_gamma: float = 0.0  # --ip_noise_gamma
    ip_gamma_random_strength: bool = False  # --ip_noise_gamma_random_strength
    min_timestep: int | None = None  # --min_timestep: t ~ randint(min, max), max excluded; null = 0
    max_timestep: int | None = None  # --max_timestep; null = 1000 (the schedule's length)


@dataclass
class LossConfig:
    type: str = "l2"  # l2 | huber | smooth_l1 (kohya --loss_type)
    huber_schedule: str = "snr"  # constant | exponential | snr
    huber_c: float = 0.1
    min_snr_gamma: float | None = None
    debiased: bool = False  # --debiased_estimation_loss
    per_sample_timesteps: bool = False  # false: v0.8.7 (one t per batch for huber/smooth_l1)
    prior_loss_weight: float = 1.0  # --prior_loss_weight: the loss weight of regularization images
    zero_terminal_snr: bool = False  # --zero_terminal_snr: rescale the betas so that SNR(T) = 0
    scale_v_pred_loss_like_noise_pred: bool = False  # --scale_v_pred_loss_like_noise_pred (needs v-prediction)
    v_pred_like_loss: float | None = None  # --v_pred_like_loss; 0 or null is off


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 1e-4
    args: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the optimizer class
    optimizer_args: list[str] = field(default_factory=list)  # --optimizer_args "key=value" strings, over args
    scheduler: str = "constant"  # kohya --lr_scheduler
    warmup_steps: Any = 0  # --lr_warmup_steps: an int of optimizer steps; Any so a fraction gets v0.8.7's refusal
    lr_scheduler_num_cycles: int = 1  # cosine_with_restarts only
    lr_scheduler_power: float = 1.0  # polynomial only
    lr_scheduler_args: dict[str, Any] = field(default_factory=dict)  # --lr_scheduler_args, e.g. lr_end for polynomial


@dataclass
class PrecisionConfig:
    name: str = "fp32"  # fp32 | fp16 | bf16 | fp8 | fp8_bf16
    full_fp16: bool = False  # --full_fp16: LoRA weights, grads and optimizer state in fp16 (needs fp16)
    full_bf16: bool = False  # --full_bf16: the same in bf16 (needs bf16)


@dataclass
class NetworkConfig:
    rank: int = 4  # kohya --network_dim
    alpha: float = 1.0  # kohya --network_alpha
    train_text_encoder: bool = False
    dropout: float = 0.0  # --network_dropout: drops neurons after lora_down (v0.8.7)
    conv_dim: int | None = None  # LoCon: the 3x3 convs of ResNet, Downsample and Upsample blocks at this rank
    conv_alpha: float | None = None  # null with conv_dim: 1.0, as v0.8.7
    rank_dropout: float | None = None  # null: no draw at all (0 still draws, as v0.8.7)
    module_dropout: float | None = None  # null: no draw at all (0 still draws, as v0.8.7)
    network_weights: str | None = None  # start from this LoRA file (kohya or diffusers keys)
    dim_from_weights: bool = False  # ranks, alphas and targets from network.network_weights
    scale_weight_norms: float | None = None  # max-norm of each module's delta W
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    network_args: list[str] = field(default_factory=list)  # --network_args "conv_dim=32" ..., as kohya parses them


@dataclass
class TrainConfig:
    max_steps: int = 20  # optimizer updates, as kohya's max_train_steps
    batch_size: int = 1
    grad_accum: int = 1
    seed: int = 42
    lr: float = "${optimizer.lr}"  # type: ignore[assignment]
    text_encoder_lr: float | None = None  # null: same as train.lr
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    output_dir: str | None = None  # null: the Hydra job directory
    output_name: str = "lora"
    save_every: int = 0  # optimizer steps between training states + step LoRA checkpoints; 0 = only at the end/stop
    save_every_epochs: int = 0  # kohya --save_every_n_epochs: `<output_name>-000005.safetensors`; 0 = off
    max_train_epochs: int | None = None  # replaces max_steps by epochs x updates per epoch (v0.8.7)
    save_last_n_epochs: int | None = None  # keep the epoch LoRAs of the last N epochs
    save_last_n_steps: int | None = None  # keep the step LoRAs of the last N steps (a window, not N files)
    save_precision: str | None = None  # null (the training dtype) | float | fp16 | bf16
    torch_compile: bool = False  # compile the U-Net with torch.compile
    dynamo_backend: str = "inductor"  # --dynamo_backend, with train.torch_compile
    sdpa: bool = False  # --sdpa
    xformers: bool = False  # --xformers (needs the xformers package)
    mem_eff_attn: bool = False  # --mem_eff_attn
    keep_states: int = 2  # training states kept per run (the newest ones)
    resume: str = "auto"  # auto | never | <state-step*.pt file, or a run's state folder>
    state_dir: str | None = None  # null: <cache root>/states; states go to <state_dir>/<config_hash>/<run_id>/
    on_nan: str = "stop"  # stop | skip_step
    max_consecutive_skips: int = 10  # on_nan=skip_step: fail after this many skipped steps in a row
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class SamplingConfig:
    prompts: list[str] = field(default_factory=list)
    prompt_file: str | None = None
    every: int = 0  # optimizer steps; 0 = off (start and end still sampled when prompts are set)
    steps: int = 10
    cfg: float = 7.0
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int = 1234
    seeds: list[int] = field(default_factory=list)  # several seeds per prompt (img/diversity); empty: [seed]
    sampler: str | None = None  # kohya's --sample_sampler name (ddim, euler_a, ...); null: SDXL base's Euler


@dataclass
class ValidationConfig:
    every: int = 0  # optimizer steps between val/loss and fit/loss; 0 = only at step 0 and at the end
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    seed: int = 0  # the fixed noise (and the fit/loss images) come from this seed, never from train.seed
    fit_images: int = 4  # training images for fit/loss (the common yardstick); 0 = no fit/loss


@dataclass
class EvaluationConfig:
    clip_model: str | None = None  # a local transformers CLIPModel folder: img/clip_t, img/clip_i; null: skipped
    dino_model: str | None = None  # a local transformers Dinov2Model/ViTModel folder: img/dino; null: skipped


@dataclass
class CompareConfig:
    baseline: str | None = None  # the variant the report compares the others with; null: the first one
    select: str | None = None  # METRIC[:max|min] picking each variant's best checkpoint; null: none picked


@dataclass
class TrackingConfig:
    experiment: str = "lora-sweep"
    uri: str | None = None  # null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db
    variant: str | None = None  # tag; experiment files set it (v53 ... v64)
    flush_every: int = 25  # metrics are sent in batches


@dataclass
class StopEarlyConfig:
    metric: str | None = None  # METRIC[:max|min], compare.select's spec; null: off
    rule: str = "median"  # median | diverged
    grace_steps: int = 0  # never stopped before this optimizer step
    min_peers: int = 2  # median: sibling runs that logged the step before a run is judged
    margin: float = 0.0  # diverged: how much worse than the run's own step-0 value, in the metric's units
    timeout: float = 5.0  # seconds the MLflow store may take to answer; on timeout the run goes on


@dataclass
class SweepConfig:
    skip_finished: bool = True  # skip a job whose config and dataset already FINISHED in this experiment
    on_busy: str = "wait"  # another process trains this config: wait (then skip or resume) | skip
    stop_early: StopEarlyConfig = field(default_factory=StopEarlyConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # the config groups: conf/<group>/<option>.yaml


def register_configs() -> None:
    """Register the schema as `config_schema`, the head of conf/config.yaml's defaults list. Silences Hydra 1.3's
    deprecation warning for conf/hydra/launcher/*.yaml extending the plugins' schemas of the same name."""
    import warnings

    from hydra.core.config_store import ConfigStore

    launchers = r"\s*'hydra/launcher/(gpu_queue|ray|submitit_slurm)' is validated against"
    warnings.filterwarnings("ignore", message=launchers, category=UserWarning)

    ConfigStore.instance().store(name="config_schema", node=Config)


# keys that never change what a training computes; tracking.variant stays in: two variants are two jobs
_HASH_EXCLUDED = (
    "tracking.experiment",
    "tracking.uri",
    "tracking.flush_every",
    "sweep",
    "compare",
    "evaluation",
    "train.output_dir",
    "train.resume",
    "train.keep_states",
    "train.save_every",
    "train.save_every_epochs",
    "train.save_last_n_epochs",
    "train.save_last_n_steps",
    "train.state_dir",
    "train.max_consecutive_skips",  # a run either ends as it would without the bound, or fails
    "train.device",
    "data.cache_dir",
)


def hashed_settings(cfg: DictConfig | Config) -> dict[str, Any]:
    """The flat config keys that change what a training computes (those `config_hash` hashes), with their values.
    train.max_steps is left out when train.max_train_epochs is set: the epochs give the steps then."""
    flat = flatten(to_container(cfg))
    epochs_given = flat.get("train.max_train_epochs") is not None
    return {k: v for k, v in flat.items() if not is_hash_excluded(k) and not (epochs_given and k == "train.max_steps")}


def is_hash_excluded(key: str) -> bool:
    """True for a flattened key that never changes what a training computes (left out of `config_hash`)."""
    return any(key == x or key.startswith(x + ".") for x in _HASH_EXCLUDED)


def to_container(cfg: DictConfig | Config) -> dict[str, Any]:
    """Resolve interpolations and return plain Python containers."""
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"noise": {"offset": 0.1}} -> {"noise.offset": 0.1}; lists and empty dicts stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


# keys added later: left out of the hash at the values that reproduce older runs, so those keep their hash
_HASH_NEUTRAL = {
    "sampling.seeds": ([],),  # issue 30: several sample seeds per prompt
    "noise.min_timestep": (None, 0),
    "noise.max_timestep": (None, 1000),
    # issue 25: kohya's datasets, regularization images and caption options
    "data.datasets": ([],),
    "data.dataset_config": (None,),
    "data.reg_data_dir": (None,),
    "data.caption_prefix": (None, ""),
    "data.caption_suffix": (None, ""),
    "data.caption_dropout_rate": (0.0,),
    "data.caption_dropout_every_n_epochs": (0,),
    "data.caption_tag_dropout_rate": (0.0,),
    "data.keep_tokens_separator": ("",),
    "data.secondary_separator": (None, ""),
    "data.enable_wildcard": (False,),
    "data.token_warmup_min": (1,),
    "data.token_warmup_step": (0.0,),
    "data.random_crop": (False,),
    "data.color_aug": (False,),
    # issue 26: long captions
    "data.max_token_length": (None, 75),
    # issue 33: the image order of v0.8.7's DataLoader workers
    "data.max_data_loader_n_workers": (0,),
    "loss.prior_loss_weight": (1.0,),
    # issue 26: kohya's samplers
    "sampling.sampler": (None,),
    # issue 27: the network as v0.8.7's networks/lora.py builds it
    "network.conv_dim": (None,),
    "network.conv_alpha": (None,),
    "network.rank_dropout": (None,),
    "network.module_dropout": (None,),
    "network.network_weights": (None,),
    "network.dim_from_weights": (False,),
    "network.scale_weight_norms": (None, 0, 0.0),
    "network.network_train_unet_only": (False,),
    "network.network_train_text_encoder_only": (False,),
    "network.network_args": ([],),
    # issue 28: schedules, optimizers, epochs, saving and switches
    "optimizer.lr_scheduler_num_cycles": (1,),
    "optimizer.lr_scheduler_power": (1.0,),
    "optimizer.lr_scheduler_args": ({},),
    "optimizer.optimizer_args": ([],),
    "train.max_train_epochs": (None,),
    "train.save_precision": (None,),
    "train.torch_compile": (False,),
    "train.dynamo_backend": ("inductor",),
    "train.sdpa": (False,),
    "train.xformers": (False,),
    "train.mem_eff_attn": (False,),
    "loss.zero_terminal_snr": (False,),
    "loss.scale_v_pred_loss_like_noise_pred": (False,),
    "loss.v_pred_like_loss": (None, 0, 0.0),
    "precision.full_fp16": (False,),
    "precision.full_bf16": (False,),
    "model.clip_skip": (None,),
}

# keys whose meaning changed: a value away from these gets a new hash, so runs made under the old meaning are not
# taken for runs made under the new one
_MEANING_CHANGED = {
    "network.dropout": ((0.0,), "v0.8.7 network_dropout after lora_down (issue 27); was PEFT lora_dropout"),
}


# what every config trains differently since: runs made before are not resumed into the new draws and order
_RESULTS_CHANGED = "v0.8.7's network init, latent draws, resize and data order (issue 33)"


def config_hash(cfg: DictConfig | Config) -> str:
    """A short hash of everything that changes the trained result (not paths, tracking or sweep settings)."""
    settings = _folded_kohya_strings(hashed_settings(cfg))
    kept = {k: v for k, v in settings.items() if not (k in _HASH_NEUTRAL and v in _HASH_NEUTRAL[k])}
    kept["@results"] = _RESULTS_CHANGED
    kept |= {f"{k}@meaning": why for k, (old, why) in _MEANING_CHANGED.items() if k in kept and kept[k] not in old}
    blob = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]



# network_args keys with their network.* key, converted as v0.8.7 converts the string (model/network.py's)
_NETWORK_ARGS_KEYS = {"conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float}


_UNFOLDED = object()


def _folded_kohya_strings(settings: dict[str, Any]) -> dict[str, Any]:
    """`settings` with each kohya string that says the same as a setting folded into it, so both spellings share a
    hash: a network.network_args item of the four keys networks.lora reads into network.<key> (when that is null or
    equal), an optimizer.optimizer_args item into optimizer.args.<key> (its value read by ast.literal_eval, as
    v0.8.7). Only an item that splits on one '=', converts, and is its key's only item is folded."""
    import ast

    out = dict(settings)

    def fold(list_key: str, convert, target) -> None:
        items = [str(i) for i in out.get(list_key) or []]
        keys = [item.split("=")[0] for item in items]
        kept = []
        for item, key in zip(items, keys, strict=True):
            parts = item.split("=")
            try:
                value = convert(key, parts[1]) if len(parts) == 2 and keys.count(key) == 1 else _UNFOLDED
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                value = _UNFOLDED
            name = None if value is _UNFOLDED else target(key, value)
            if name is None:
                kept.append(item)
            else:
                out[name] = list(value) if isinstance(value, tuple) else value
        if list_key in out:
            out[list_key] = kept

    fold("network.network_args",
         lambda key, text: _NETWORK_ARGS_KEYS[key](text) if key in _NETWORK_ARGS_KEYS else _UNFOLDED,
         lambda key, value: f"network.{key}" if out.get(f"network.{key}") in (None, value) else None)
    fold("optimizer.optimizer_args", lambda key, text: ast.literal_eval(text),
         lambda key, value: f"optimizer.args.{key}" if key.isidentifier() else None)
    return out
