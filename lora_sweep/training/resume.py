"""What a training state carries into a changed config: each setting follows the new config or is refused.

A state restores the LoRA tensors, the optimizer (moments and param-group hyperparameters), the LR schedule's step,
the grad scaler, every RNG and the loop's position. Resuming it under a config that differs from the one it was
saved with (`train.resume=PATH`) is allowed only where every changed setting is in `RULES` as "follow": the new
value then applies from the state's step on (the run's params say what trained since, its
`lora_sweep.resume_changed` tag what the state was trained with). A "refuse" setting changes what the state's
tensors or position mean; resuming is refused before training, in one paragraph naming the settings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_sweep.config import hashed_settings
from lora_sweep.errors import UserError
from lora_sweep.training.checkpoint import list_states, read_meta

log = logging.getLogger(__name__)
FOLLOW, REFUSE = "follow", "refuse"
_ABSENT = "(absent)"


@dataclass(frozen=True)
class Rule:
    """`key` (a flat config key, or a prefix ending in '.'); `why`: what the state holds of it."""

    key: str
    decision: str  # FOLLOW | REFUSE
    why: str


_DATA_ORDER = "the state's position (epoch, batch) indexes the batch order of the old images, buckets and batch size"
DATASET = "dataset"  # not a config key: the content digest of the files trained on (data.dir's images and captions)
_EVALUATION = "evaluation only; the state holds none of it"
# One row per setting (or group of settings); the longest matching key wins. tests/training/test_resume_rules.py
# checks that every hashed key of every optimizer option has a row.
RULES: tuple[Rule, ...] = (
    Rule(DATASET, REFUSE, "images or captions changed: " + _DATA_ORDER),
    Rule("model.name", REFUSE, "the state's LoRA was trained on another base model"),
    Rule("model.path", REFUSE, "the state's LoRA was trained on another base model"),
    Rule("model.resolution", REFUSE, _DATA_ORDER),
    Rule("model.v_prediction", FOLLOW, "the prediction target of the steps after the state"),
    Rule("model.clip_skip", FOLLOW, "recorded only (SDXL's text encoding ignores it)"),
    Rule("data.", FOLLOW, "captions and augmentation of the steps after the state"),
    Rule("data.name", REFUSE, _DATA_ORDER),
    Rule("data.dir", REFUSE, _DATA_ORDER),
    Rule("data.resolution", REFUSE, _DATA_ORDER),
    Rule("data.enable_bucket", REFUSE, _DATA_ORDER),
    Rule("data.bucket_reso_steps", REFUSE, _DATA_ORDER),
    Rule("data.bucket_no_upscale", REFUSE, _DATA_ORDER),
    Rule("data.min_bucket_reso", REFUSE, _DATA_ORDER),
    Rule("data.max_bucket_reso", REFUSE, _DATA_ORDER),
    Rule("data.validation_split", REFUSE, _DATA_ORDER),
    Rule("data.validation_dir", FOLLOW, _EVALUATION),
    Rule("noise.", FOLLOW, "the noise of the steps after the state"),
    Rule("loss.", FOLLOW, "the loss of the steps after the state"),
    Rule("optimizer.name", REFUSE, "the state's optimizer moments belong to another optimizer"),
    Rule("optimizer.lr", FOLLOW, "the param groups' learning rates are set from this config"),
    Rule("optimizer.args.", FOLLOW, "the param groups' hyperparameters are set from this config; moments stay"),
    Rule("optimizer.args.d0", REFUSE, "only the first step uses d0: the state's adapted d goes on"),
    Rule("optimizer.args.min_8bit_size", REFUSE, "it decides which tensors keep 8-bit optimizer state"),
    Rule("optimizer.args.amsgrad", REFUSE, "the state lacks (or holds) the max of the second moments"),
    Rule("optimizer.args.beta1", REFUSE, "Adafactor's state lacks (or holds) the first moment that beta1 keeps"),
    Rule("optimizer.optimizer_args", FOLLOW, "the param groups' hyperparameters are set from this config; moments "
                                             "stay"),
    Rule("optimizer.scheduler", FOLLOW, "the LR schedule is rebuilt from this config at the state's step"),
    Rule("optimizer.warmup_steps", FOLLOW, "the LR schedule is rebuilt from this config at the state's step"),
    Rule("optimizer.lr_scheduler_num_cycles", FOLLOW, "the LR schedule is rebuilt from this config at the state's "
                                                      "step"),
    Rule("optimizer.lr_scheduler_power", FOLLOW, "the LR schedule is rebuilt from this config at the state's step"),
    Rule("optimizer.lr_scheduler_args", FOLLOW, "the LR schedule is rebuilt from this config at the state's step"),
    Rule("optimizer.lr_scheduler_args.", FOLLOW, "the LR schedule is rebuilt from this config at the state's step"),
    Rule("precision.name", FOLLOW, "the precision of the steps after the state; fp16's grad scaler starts afresh "
                                   "when the state has none"),
    Rule("precision.full_fp16", REFUSE, "the state's LoRA tensors and optimizer moments are in the old dtype"),
    Rule("precision.full_bf16", REFUSE, "the state's LoRA tensors and optimizer moments are in the old dtype"),
    Rule("network.rank", REFUSE, "the state's LoRA tensors have the old rank's shapes"),
    Rule("network.alpha", REFUSE, "alpha / rank scales what the state's LoRA tensors add: a new alpha would rescale "
                                  "what was trained"),
    Rule("network.train_text_encoder", REFUSE, "it decides which LoRA tensors and optimizer groups exist"),
    Rule("network.dropout", FOLLOW, "the dropout of the steps after the state"),
    Rule("network.rank_dropout", FOLLOW, "the dropout of the steps after the state"),
    Rule("network.module_dropout", FOLLOW, "the dropout of the steps after the state"),
    Rule("network.scale_weight_norms", FOLLOW, "the max-norm of the steps after the state"),
    Rule("network.conv_dim", REFUSE, "it decides which LoRA tensors exist and the conv ranks' shapes"),
    Rule("network.conv_alpha", REFUSE, "conv_alpha / conv_dim scales what the state's conv tensors add"),
    Rule("network.network_args", REFUSE, "it may set conv_dim and conv_alpha, which decide the state's tensors"),
    Rule("network.network_weights", REFUSE, "the state's LoRA started from the old file"),
    Rule("network.dim_from_weights", REFUSE, "it decides which LoRA tensors exist and their ranks"),
    Rule("network.network_train_unet_only", REFUSE, "it decides which LoRA tensors and optimizer groups exist"),
    Rule("network.network_train_text_encoder_only", REFUSE, "it decides which LoRA tensors and optimizer groups "
                                                            "exist"),
    Rule("train.max_steps", FOLLOW, "the LR schedule is rebuilt from this config at the state's step"),
    Rule("train.max_train_epochs", FOLLOW, "it sets train.max_steps: the LR schedule is rebuilt at the state's step"),
    Rule("train.save_precision", FOLLOW, "the dtype of the LoRA files written after the state"),
    Rule("train.lr", FOLLOW, "the param groups' learning rates are set from this config"),
    Rule("train.text_encoder_lr", FOLLOW, "the param groups' learning rates are set from this config"),
    Rule("train.batch_size", REFUSE, _DATA_ORDER),
    Rule("train.grad_accum", FOLLOW, "the micro-batches per update after the state"),
    Rule("train.seed", REFUSE, "the state restores the old seed's random streams and batch order"),
    Rule("train.max_grad_norm", FOLLOW, "the clipping of the steps after the state"),
    Rule("train.gradient_checkpointing", FOLLOW, "memory only"),
    Rule("train.sdpa", FOLLOW, "the attention kernel of the steps after the state (rounding only)"),
    Rule("train.xformers", FOLLOW, "the attention kernel of the steps after the state (rounding only)"),
    Rule("train.mem_eff_attn", FOLLOW, "the attention kernel of the steps after the state (rounding only)"),
    Rule("train.torch_compile", FOLLOW, "how the steps after the state run (rounding only)"),
    Rule("train.dynamo_backend", FOLLOW, "how the steps after the state run (rounding only)"),
    Rule("train.output_name", FOLLOW, "file names only"),
    Rule("train.on_nan", FOLLOW, "the handling of later NaN/Inf"),
    Rule("sampling.", FOLLOW, _EVALUATION),
    Rule("validation.", FOLLOW, _EVALUATION),
    Rule("validation.seed", REFUSE, "with data.validation_split > 0 it picks the held-out images, so the batch order"),
    Rule("tracking.variant", FOLLOW, "a name"),
)


def rule_for(key: str) -> Rule | None:
    """The row of `RULES` for a flat config key: its own, else its longest matching group; None if none."""
    matching = [r for r in RULES if r.key == key or (r.key.endswith(".") and key.startswith(r.key))]
    return max(matching, key=lambda r: len(r.key), default=None)


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (the state's value, this config's value)} for every key that differs."""
    pairs = {k: (saved.get(k, _ABSENT), now.get(k, _ABSENT)) for k in sorted(set(saved) | set(now))}
    return {k: pair for k, pair in pairs.items() if pair[0] != pair[1]}


def refused(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """The changes a state cannot follow (a key without a rule counts as refused: nothing follows unchecked); with
    another optimizer, its arguments are that optimizer's and go unlisted."""
    other_optimizer = "optimizer.name" in changes
    return {k: v for k, v in changes.items() if (rule_for(k) or Rule(k, REFUSE, "")).decision == REFUSE
            and not (other_optimizer and k.startswith("optimizer.args."))}


def describe(changes: dict[str, tuple[Any, Any]]) -> str:
    """'optimizer.lr 0.0001 -> 5e-05; train.lr 0.0001 -> 5e-05'."""
    return "; ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items())


def dataset_change(meta: dict[str, Any], dataset: str | None) -> dict[str, tuple[Any, Any]]:
    """{DATASET: (the state's digest, this one)} when both are known and differ, else {}."""
    saved = meta.get(DATASET)
    return {DATASET: (saved, dataset)} if saved and dataset and saved != dataset else {}


def check_state_config(cfg, meta: dict[str, Any], state: Path, chash: str,
                       dataset: str | None = None) -> dict[str, tuple[Any, Any]]:
    """The settings `cfg` changes from those `state` was saved with (meta of `checkpoint.read_meta`), all of them
    followable; else UserError, one paragraph naming each refused setting (or the files, by `dataset` digest) and
    what to do.
    """
    if meta.get("config_hash") == chash:
        _refuse(state, dataset_change(meta, dataset))
        return {}
    if "params" not in meta:
        raise UserError(
            f"train.resume: the state '{state}' was saved by config {meta.get('config_hash')} (this is {chash}) and "
            "does not record that config (an older lora-sweep wrote it), so what would change cannot be checked. "
            "Resume it with the config it was saved with, or set train.resume=never to start over.")
    changes = changed_settings(meta["params"], hashed_settings(cfg))
    _refuse(state, refused(changes) | dataset_change(meta, dataset))
    return changes


def check_steps_left(state: Path, step: int, max_steps: int, epochs: int | None = None) -> None:
    """UserError unless a state at `step` leaves steps to train under `max_steps` (a resume would train none).
    `epochs`: train.max_train_epochs, when it gave `max_steps`."""
    knob = "train.max_steps" if epochs is None else "train.max_train_epochs"
    length = "train.max_steps" if epochs is None else f"the {max_steps} steps of train.max_train_epochs={epochs}"
    if step == max_steps:
        raise UserError(f"train.resume: '{state}' is at step {step}, which is {length}: nothing is left to "
                        f"train; raise {knob} to continue it, or set train.resume=never to start over.")
    if step > max_steps:
        beyond = f"train.max_steps={max_steps}" if epochs is None else length
        raise UserError(f"train.resume: '{state}' is at step {step}, beyond {beyond}: nothing "
                        f"is left to train; raise {knob} to continue it, or set train.resume=never to start "
                        "over.")


def _refuse(state: Path, bad: dict[str, tuple[Any, Any]]) -> None:
    if bad:
        listing = "; ".join(f"{k} {old} -> {new} ({_why(k)})" for k, (old, new) in bad.items())
        raise UserError(
            f"train.resume: the state '{state}' cannot continue under this config: it changes settings a state "
            f"cannot follow: {listing}. Resume it with what the state was trained with, or set "
            "train.resume=never to start over with this config. Learning rates, optimizer.args (but d0), the LR "
            "schedule, train.max_steps, loss, noise, precision and evaluation settings may change on resume "
            "(docs/sweeps.md#changing-settings-on-resume).")


def _why(key: str) -> str:
    rule = rule_for(key)
    return rule.why if rule is not None else "no rule says a state can follow it"


def nearest_state(cfg, root: Path, chash: str,
                  dataset: str | None = None) -> tuple[Path, dict[str, tuple[Any, Any]]] | None:
    """The newest state under `root` of another config that `cfg` could continue (every difference followable,
    the same files, its step below train.max_steps), with the fewest changed settings; None if there is none.
    """
    now, found = hashed_settings(cfg), []
    for run_dir in sorted(Path(root).glob("*/*")) if Path(root).is_dir() else []:
        states = list_states(run_dir)
        if not states or run_dir.parent.name == chash:
            continue
        try:
            meta = read_meta(states[-1])
        except UserError:
            continue  # an unreadable state is no hint
        if "params" not in meta or int(meta.get("step", 0)) >= cfg.train.max_steps:
            continue
        changes = changed_settings(meta["params"], now)
        if changes and not refused(changes) and not dataset_change(meta, dataset):
            found.append((len(changes), -states[-1].stat().st_mtime_ns, states[-1], changes))
    if not found:
        return None
    _, _, state, changes = min(found, key=lambda f: f[:2])
    return state, changes
