"""The article's table over any set of variants, and the knobs two variants differ in.

Pure functions on MLflow params. A value is shown only where it has an effect: "x" where off or inert, "v" for
an on switch; long values are `cut`. A *knob* is what a user turns in one override: a config-group choice
(`lora_sweep.choice.<group>` tags), with every value it brings, or one value. Without a choice tag (older runs,
or a list choice Hydra does not record) a group's changed values count as one knob. Keys that do not change a
training are never knobs. A knob changing more than one value (`Knob.values`) is `compound`, and marked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from lora_sweep.compare.variants import SEED_KEY, VariantGroup, is_config_key

GROUP_KNOBS = ("noise", "loss", "optimizer", "precision")  # one knob each when runs carry no choice tags
NOT_KNOBS = ("sampling.", "validation.", "tracking.", SEED_KEY)
# Facts the job logs about the data it found, and train.total_batch_size: params, but not settings.
DERIVED = {"data.images", "data.skipped_images", "data.entries_with_repeats", "data.validation_images",
           "train.total_batch_size", "data.warnings", "data.train_images", "data.reg_images", "data.reg_entries"}
CUT_CHARS = 60  # longer values are cut in the table (the resolved configs hold them whole)
ARTICLE_ROWS = {  # param -> the article's row label, in the article's order
    "precision.name": "precision", "optimizer.name": "optimizer", "loss.min_snr_gamma": "min-SNR gamma",
    "loss.debiased": "debiased estimation loss", "noise.offset": "noise offset",
    "noise.multires_iterations": "multires noise iterations", "noise.ip_gamma": "IP noise gamma",
    "loss.huber_c": "huber_c", "train.batch_size": "BS", "train.grad_accum": "gradient accumulation",
}
PARAM_ORDER = ("precision.", "optimizer.", "loss.", "noise.", "train.", "network.", "sampling.", "data.", "model.")
OFF_WHEN_ZERO = ("noise.", "loss.min_snr_gamma", "loss.debiased", "network.dropout")
OPTIMIZER_ARGS = "optimizer.args"
# its values are in the optimizer.args.* params, logged as the optimizer ran with them (job.run.run_params)
SHOWN_IN_ARGS = "optimizer.optimizer_args"
DETERMINED_BY = {OPTIMIZER_ARGS: "optimizer.name"}  # a row folded away when the other row's value fixes it


def parse(value: str | None):
    """An MLflow param string back to None / bool / float / str."""
    if value is None or value in ("None", "null", ""):
        return None
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    try:
        return float(value)
    except ValueError:
        return value


def has_effect(key: str, params: dict[str, str]) -> bool:
    """False where a setting is inert, as kohya ignores it: Huber settings under l2, the multires discount
    without multires noise, offset or IP-noise options without their strength.
    """
    get = lambda k: parse(params.get(k))  # noqa: E731
    if key in ("loss.huber_c", "loss.huber_schedule"):
        return get("loss.type") not in (None, "l2")
    if key == "noise.multires_discount":
        return bool(get("noise.multires_iterations"))
    if key in ("noise.offset_random_strength", "noise.adaptive_scale"):
        return bool(get("noise.offset"))
    if key == "noise.ip_gamma_random_strength":
        return bool(get("noise.ip_gamma"))
    return True


def format_value(value) -> str:
    if value is None or value is False:
        return "x"
    if value is True:
        return "v"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def display(key: str, params: dict[str, str]) -> str:
    """What the table shows for `key`: "x" if unset, inert or off, "v" for an on switch, else the value."""
    if key == OPTIMIZER_ARGS:
        args = sorted((k[len(OPTIMIZER_ARGS) + 1:], v) for k, v in params.items() if k.startswith(OPTIMIZER_ARGS + "."))
        return ", ".join(f"{k}={format_value(parse(v))}" for k, v in args) or "x"
    if key not in params or not has_effect(key, params):
        return "x"
    value = parse(params[key])
    if key.startswith(OFF_WHEN_ZERO) and value == 0:
        return "x"
    return format_value(value)


def cut(text: str, limit: int = CUT_CHARS) -> str:
    """`text` cut to `limit` characters with "…" and the full length, e.g. 'a photo of … (500 chars)'."""
    return text if len(text) <= limit else f"{text[:limit - 1]}… ({len(text)} chars)"


def raw_text(key: str, params: dict[str, str]) -> str:
    """A value as set, for what a knob changes: 'off' where the table writes x, 'unset' when the run lacks it."""
    if key == OPTIMIZER_ARGS:
        shown = display(key, params)
        return "none" if shown == "x" else shown
    if key not in params:
        return "unset"
    value = parse(params[key])
    if value is None or value is False:
        return "off"
    return "on" if value is True else format_value(value)


def table_key(key: str) -> str:
    """optimizer.args.d_coef -> optimizer.args (one row for an optimizer's arguments)."""
    return OPTIMIZER_ARGS if key.startswith(OPTIMIZER_ARGS + ".") else key


def _sort_key(key: str) -> tuple:
    if key in ARTICLE_ROWS:
        return 0, list(ARTICLE_ROWS).index(key), key
    rank = next((i for i, prefix in enumerate(PARAM_ORDER) if key.startswith(prefix)), len(PARAM_ORDER))
    return 1, rank, key


def row_label(key: str) -> str:
    """The article's name with the param key, e.g. 'IP noise gamma (noise.ip_gamma)'; else the key."""
    return f"{ARTICLE_ROWS[key]} ({key})" if key in ARTICLE_ROWS else key


def table_keys(groups: Sequence[VariantGroup]) -> list[str]:
    """Every row the table may show: config keys (optimizer args as one row), no labels, seeds or derived counts;
    train.lr only where it is not simply the optimizer's lr.
    """
    keys = {table_key(k) for g in groups for k in g.params
            if is_config_key(k) and k not in DERIVED and k not in (SEED_KEY, "tracking.variant", SHOWN_IN_ARGS)}
    if all(g.params.get("train.lr") == g.params.get("optimizer.lr") for g in groups):
        keys.discard("train.lr")
    return sorted(keys, key=_sort_key)


def _determined(key: str, parent: str, groups: Sequence[VariantGroup]) -> bool:
    """True when variants with the same `parent` value always show the same `key` value."""
    seen: dict[str, str] = {}
    return all(seen.setdefault(display(parent, g.params), display(key, g.params)) == display(key, g.params)
               for g in groups)


def parameter_table(groups: Sequence[VariantGroup]) -> tuple[list[tuple[str, list[str]]], list[tuple[str, str]]]:
    """(rows that differ: [(key, [value per variant])], rows shared by all: [(key, value)]).

    A dependent setting equal wherever it applies is shared ("(where it applies)"); per-optimizer defaults are shared
    as "each optimizer.name's own". Status is a row only where it differs; shared rows hold settings only.
    """
    differ, shared = [], []
    for key in [*table_keys(groups), "status"]:
        values = [g.status if key == "status" else display(key, g.params) for g in groups]
        if len(set(values)) == 1:
            if key != "status":
                shared.append((key, values[0]))
            continue
        parent = DETERMINED_BY.get(key)
        if parent and _determined(key, parent, groups):
            shared.append((key, f"each {parent}'s own (see the full configs)"))
            continue
        effective = {v for g, v in zip(groups, values, strict=True) if key == "status" or has_effect(key, g.params)}
        if key not in ("status",) and len(effective) == 1 and any(not has_effect(key, g.params) for g in groups):
            shared.append((key, f"{effective.pop()} (where it applies)"))
            continue
        differ.append((key, values))
    return differ, shared


@dataclasses.dataclass(frozen=True)
class Knob:
    """One thing two variants differ in: a group (`name` "noise", `a`/`b` the options) or a value (`name` the key).

    `detail`: the values a group change brings, as shown; `values`: the (key, from, to) it changes, as set.
    """

    name: str
    a: str
    b: str
    detail: str = ""
    values: tuple[tuple[str, str, str], ...] = ()

    @property
    def compound(self) -> bool:
        """True when the knob changes more than one value (several mechanisms at once)."""
        return len(self.values) > 1

    @property
    def entails(self) -> str:
        """'noise.offset 0.0357 -> 0; noise.multires_iterations 0 -> 6': what the knob changes, in values."""
        return "; ".join(f"{k} {va} -> {vb}" for k, va, vb in self.values)

    def as_dict(self) -> dict:
        return {"knob": self.name, "from": self.a, "to": self.b, "detail": self.detail}

    def values_dict(self) -> dict:
        """The summary's account of what the knob changes (beside `as_dict`)."""
        return {"values": [{"key": k, "from": va, "to": vb} for k, va, vb in self.values],
                "compound": self.compound, "entails": self.entails}


def knobs(a_params: dict[str, str], b_params: dict[str, str], a_choices: dict[str, str] | None = None,
          b_choices: dict[str, str] | None = None) -> list[Knob]:
    """The knobs variant b differs from variant a in (empty: the same training)."""
    a_choices, b_choices = a_choices or {}, b_choices or {}
    keys = {table_key(k) for k in (*a_params, *b_params)
            if is_config_key(k) and k not in DERIVED and k != SHOWN_IN_ARGS and not k.startswith(NOT_KNOBS)}
    follows = [p.get("train.lr") == p.get("optimizer.lr") for p in (a_params, b_params)]
    if all(follows):
        keys.discard("train.lr")  # follows optimizer.lr (${optimizer.lr}): part of the optimizer knob
    changed = {k: (display(k, a_params), display(k, b_params)) for k in sorted(keys, key=_sort_key)}
    changed = {k: ab for k, ab in changed.items() if ab[0] != ab[1]}
    def values(keys) -> tuple[tuple[str, str, str], ...]:
        """The keys whose value as set changes (a setting that only becomes active is not one), else all."""
        moved = [(k, raw_text(k, a_params), raw_text(k, b_params)) for k in keys]
        return tuple(v for v in moved if v[1] != v[2]) or tuple(moved)

    found: list[Knob] = []
    for group in sorted(set(GROUP_KNOBS) | set(a_choices) | set(b_choices), key=lambda g: _sort_key(g + ".")):
        inside = {k: ab for k, ab in changed.items() if k.startswith(group + ".")}
        ca, cb = a_choices.get(group), b_choices.get(group)
        detail = "; ".join(f"{k}: {va} -> {vb}" for k, (va, vb) in inside.items() if (va, vb) != (ca, cb))
        if ca is not None and cb is not None:
            if ca == cb:
                continue  # the same option: each value changed on top of it is a knob of its own
            found.append(Knob(group, ca, cb, detail, values(inside)))
        elif not inside or group not in GROUP_KNOBS:
            continue
        elif len(inside) == 1 and ca is None and cb is None:
            (key, (va, vb)), = inside.items()
            found.append(Knob(key, va, vb, values=values(inside)))
        else:  # a list choice (loss=[huber_snr,debiased]) is not recorded by Hydra: the group's values decide
            label = lambda choice, side: choice or "; ".join(f"{k}={ab[side]}" for k, ab in inside.items())  # noqa
            found.append(Knob(group, label(ca, 0), label(cb, 1), detail, values(inside)))
        changed = {k: ab for k, ab in changed.items() if k not in inside}
    found += [Knob(k, va, vb, values=values([k])) for k, (va, vb) in changed.items()]
    return found
