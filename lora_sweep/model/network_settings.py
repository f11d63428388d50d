"""The network settings as v0.8.7's networks/lora.py and train_network.py read them, before any model exists:
kohya's `network_args` strings and the values they give, the dropouts each LoRA module receives, the checks of the
pre-flight (network_args, LoCon, the *_only switches, a starting file's header) and `ss_network_args`.
docs/network.md describes each setting.
"""

from __future__ import annotations

import re
from pathlib import Path

from lora_sweep.errors import UserError
from lora_sweep.model.lora_file import lora_file_modules

# network_args keys that map onto network.* keys, with v0.8.7's conversion of the string
NETWORK_ARGS_KEYS = {"conv_dim": int, "conv_alpha": float, "rank_dropout": float, "module_dropout": float}
# networks/lora.py's block-wise keys: v0.8.7's block index never matches SDXL's module names (docs/network.md)
BLOCKWISE_ARGS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "down_lr_weight",
                  "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")


def parse_network_args(items) -> dict[str, str]:
    """`key=value` strings split as v0.8.7 splits them (exactly one "=", values stay strings); ValueError otherwise."""
    parsed = {}
    for item in items:
        parts = str(item).split("=")
        if len(parts) != 2:
            raise ValueError(f"'{item}' is not key=value with exactly one '='")
        parsed[parts[0]] = parts[1]
    return parsed


def network_args_problems(net) -> list[str]:
    """Every problem of network.network_args, one paragraph each: not key=value, a block-wise key, `dropout`, an
    unknown key, a value that does not convert as v0.8.7 converts it, or one that disagrees with its network.* key."""
    problems, args = [], {}
    for item in net.network_args:  # each alone, so a malformed item hides no other's problem
        try:
            args.update(parse_network_args([item]))
        except ValueError as exc:
            problems.append(f"network.network_args: {exc} (v0.8.7 splits each on '=' and fails otherwise).")
    for key, value in args.items():
        if key in BLOCKWISE_ARGS:
            problems.append(
                f"network.network_args: '{key}' is refused: v0.8.7's block index recognises only diffusers block "
                "names, so on SDXL's input_blocks / middle_block / output_blocks every module gets index -1 "
                "(block_dims[24], no per-block learning rate). Leave it out; docs/network.md explains.")
        elif key == "dropout":
            problems.append("network.network_args: 'dropout' does nothing in v0.8.7's LoRA (it only reaches "
                            "ss_network_args); set network.dropout (kohya's --network_dropout) instead.")
        elif key not in NETWORK_ARGS_KEYS:
            problems.append(f"network.network_args: '{key}' is not a key networks.lora reads (v0.8.7 ignores it "
                            f"silently; lora-sweep refuses it). Accepted: {', '.join(NETWORK_ARGS_KEYS)}.")
        else:
            try:
                converted = NETWORK_ARGS_KEYS[key](value)
            except ValueError:
                problems.append(f"network.network_args: {key}='{value}' is not {NETWORK_ARGS_KEYS[key].__name__} "
                                f"(v0.8.7 converts it with {NETWORK_ARGS_KEYS[key].__name__}()).")
                continue
            own = getattr(net, key)
            if own is not None and own != converted:
                problems.append(f"network.network_args: {key}={value} disagrees with network.{key}={own}; set it "
                                "one way only.")
    return problems


def network_arg_text(value: float) -> str:
    """A network.* value as the shortest `--network_args key=<text>` that gives it: "16" for 16 or 16.0, repr else."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _readable_args(items) -> dict[str, str]:
    """The items of network_args that split as key=value (network_args_problems names the others)."""
    return {k: v for item in items if len(parts := str(item).split("=")) == 2 for k, v in [parts]}


def network_value(net, key: str):
    """network.<key>, or its network_args value converted as v0.8.7 converts it (ValueError if it does not)."""
    own = getattr(net, key)
    if own is not None:
        return own
    value = _readable_args(net.network_args).get(key)
    return None if value is None else NETWORK_ARGS_KEYS[key](value)


def network_field(net, key: str) -> str:
    """How a message names where network_value(net, key) came from: `network.<key>`, or the network_args item."""
    value = _readable_args(net.network_args).get(key)
    if getattr(net, key) is None and value is not None:
        return f"network.network_args {key}={value}"
    return f"network.{key}"


def kohya_dropouts(cfg) -> tuple[float | None, float | None, float | None]:
    """(network_dropout, rank_dropout, module_dropout) as v0.8.7's LoRAModule receives them: None is no dropout and
    no draw; a network.dropout of 0.0 is None (v0.8.7's default); network.dim_from_weights turns all three off
    (create_network_from_weights passes none of them)."""
    net = cfg.network
    if net.dim_from_weights:
        return None, None, None
    return (net.dropout or None), network_value(net, "rank_dropout"), network_value(net, "module_dropout")


def weights_file_problems(net, *, train_unet: bool, train_text_encoder: bool) -> list[str]:
    """What the pre-flight can tell of network.network_weights without the model: the file is a LoRA, and (unless
    network.dim_from_weights) each module this network builds has the file's rank: network.rank for Linear and 1x1,
    network.conv_dim for kxk convs (v0.8.7's load_state_dict refuses other shapes)."""
    try:
        modules = lora_file_modules(net.network_weights)
    except UserError as exc:
        return [str(exc)]
    foreign = [label.split(":", 1)[1] for label in modules if not _SDXL_NAME.match(label)]
    if len(foreign) == len(modules):
        return [f"network.network_weights: '{net.network_weights}' is no SDXL LoRA: none of its {len(modules)} modules "
                f"has an SDXL U-Net or text-encoder name (e.g. {foreign[0]}); kohya's SDXL files name them "
                "lora_unet_input_blocks_..., lora_te1_text_model_..."]
    if net.dim_from_weights:
        return []
    conv_dim = network_value(net, "conv_dim")
    wrong = []
    for label, module in modules.items():
        part, name = label.split(":", 1)
        if not (train_unet if part == "lora_unet" else train_text_encoder):
            continue
        conv_block = part == "lora_unet" and _in_conv_block(name)
        if conv_block and (conv_dim is None or (module.kxk and conv_dim == 0)):
            continue  # no LoRA of this network there: an unexpected key, reported when it loads
        want, setting = (conv_dim, "network.conv_dim") if module.kxk else (net.rank, "network.rank")
        if module.rank != want:
            wrong.append(f"{name} has rank {module.rank} where {setting} is {want}")
    if not wrong:
        return []
    return [f"network.network_weights: the file's ranks do not match this network ({len(wrong)} modules, e.g. "
            f"{wrong[0]}). v0.8.7 refuses the shape mismatch; set network.rank / network.conv_dim to the file's, or "
            "network.dim_from_weights=true to take ranks, alphas and modules from the file."]


# a module label of lora_file_modules on SDXL: kohya's SGM / CLIP names, or diffusers' module paths
_SDXL_NAME = re.compile(r"lora_unet:(lora_unet_(input_blocks|middle_block|output_blocks)_"
                        r"|(down|up)_blocks\.|mid_block\.)"
                        r"|lora_te[12]:(lora_te[12]_text_model_encoder_layers_|(text_model\.)?encoder\.layers\.)")


def _in_conv_block(name: str) -> bool:
    """A U-Net module of a ResNet, Downsample or Upsample block (kohya or diffusers name): only LoCon builds these."""
    return bool(re.search(r"(resnets|samplers|in_layers|out_layers|emb_layers|skip_connection|_op$|_\d+_[12]_conv$)",
                          name))


def network_problems(net) -> list[str]:
    """Every problem of the network settings v0.8.7's networks/lora.py reads, one paragraph each (the pre-flight's;
    docs/network.md): network_args, conv_dim / conv_alpha, the *_only switches, and network.network_weights."""
    problems = network_args_problems(net)
    if problems:
        return problems
    conv_dim, conv_alpha = network_value(net, "conv_dim"), network_value(net, "conv_alpha")
    if conv_dim is not None and conv_dim < 0:
        problems.append(f"{network_field(net, 'conv_dim')}: must be null (no LoCon), 0 (v0.8.7: the ResNet blocks' "
                        f"Linear and 1x1 parts only) or a rank > 0, got {conv_dim}.")
    if conv_alpha is not None and conv_alpha < 0:
        problems.append(f"{network_field(net, 'conv_alpha')}: must be >= 0 (0: the conv rank, as v0.8.7) or null "
                        f"(1.0), got {conv_alpha}.")
    te, unet_only, te_only = net.train_text_encoder, net.network_train_unet_only, net.network_train_text_encoder_only
    if unet_only and te_only:
        problems.append("network.network_train_unet_only and network.network_train_text_encoder_only are both true: "
                        "nothing would train (v0.8.7 fails at the optimizer). Set at most one.")
    elif unet_only and te:
        problems.append("network.network_train_unet_only=true contradicts network.train_text_encoder=true; set "
                        "network.train_text_encoder=false (U-Net only is lora-sweep's default).")
    elif te_only and not te:
        problems.append("network.network_train_text_encoder_only trains only the text encoders' LoRA: it needs "
                        "network.train_text_encoder=true too.")
    if net.dim_from_weights and not net.network_weights:
        problems.append("network.dim_from_weights takes ranks, alphas and modules from network.network_weights, "
                        "which is not set (v0.8.7 fails without it).")
    if net.network_weights:
        if not Path(str(net.network_weights)).expanduser().is_file():
            problems.append(f"network.network_weights: '{net.network_weights}' is not an existing file (a relative "
                            "path is read from the folder the command was started in).")
        else:
            problems += weights_file_problems(net, train_unet=not te_only, train_text_encoder=te)
    return problems


def kohya_network_kwargs(net) -> dict | None:
    """v0.8.7's net_kwargs for `ss_network_args` (json.dumps of it): network_args' strings in their order, then the
    network.* keys among conv_dim, conv_alpha, rank_dropout, module_dropout that are set (`network_arg_text`), then the
    injected "dropout" (network.dropout, None for 0.0; not under dim_from_weights). None when v0.8.7 would have had
    no --network_args, so writes no ss_network_args: none of the four set."""
    kwargs: dict = dict(parse_network_args(net.network_args))
    for key in NETWORK_ARGS_KEYS:
        if getattr(net, key) is not None and key not in kwargs:
            kwargs[key] = network_arg_text(getattr(net, key))
    if not kwargs:
        return None
    if not net.dim_from_weights:
        kwargs["dropout"] = net.dropout or None
    return kwargs


def dim_from_weights_ignores(net) -> list[str]:
    """The settings network.dim_from_weights ignores that are set (away from their defaults, or in network_args):
    v0.8.7's create_network_from_weights takes ranks and alphas from the file and passes no dropout."""
    from lora_sweep.config import NetworkConfig

    default = NetworkConfig()
    args = _readable_args(net.network_args)
    return [f"network.{key}={getattr(net, key)}" if getattr(net, key) != getattr(default, key)
            else f"network.network_args {key}={args[key]}"
            for key in ("rank", "alpha", "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout")
            if getattr(net, key) != getattr(default, key) or key in args]
