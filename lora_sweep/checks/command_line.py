"""Checks of `python sweep.py` overrides before Hydra composes, so every problem of the command line is reported at
once (Hydra stops at the first, and for an unknown key advises '+', which would train without it).

Each override is checked on its own: keys against the schema, `group=option` against the group's options (each of a
sweep or list too), values against the schema's types. Ranges, combinations and files are the pre-flight's.
`hydra_error_text` turns what still reaches Hydra into one paragraph.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lora_sweep.checks.groups import group_options, missing_option_message
from lora_sweep.checks.keys import config_groups, is_free_form, schema_keys, unknown_key_message
from lora_sweep.config import Config, flatten
from lora_sweep.errors import ConfigError

_LEFT_TO_HYDRA = ("-h", "--help", "--hydra-help", "--version")


def _values(override) -> list[Any]:
    """The values one override stands for: each of a sweep (`a,b`, `range(1,3)`), else the one; [] for a glob."""
    from hydra.core.override_parser.types import QuotedString

    if override.is_sweep_override():  # a sweep's quoted element comes as a QuotedString: its text is the value
        return [] if override.value_type.name == "GLOB_CHOICE_SWEEP" else [
            v.text if isinstance(v, QuotedString) else v for v in override.sweep_iterator()]
    return [override.value()]


def _option_names(value: Any) -> Iterable[str]:
    """The option names a group value holds: one, or each of a list (`loss=[huber_snr,min_snr]`)."""
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, str):
            yield item


def _type_problem(template, key: str, value: Any, text: str) -> str | None:
    if isinstance(value, str) and "${" in value:
        return None  # an interpolation: resolved (and typed) after composition
    if isinstance(value, str) and OmegaConf.is_list(OmegaConf.select(template, key)):
        return list_as_string_message(key, value)
    try:
        OmegaConf.update(template.copy(), key, value, merge=True)
    except OmegaConfBaseException as exc:
        return f"Error merging override {key}={text}. {str(exc).splitlines()[0].rstrip('.')}."
    return None


def list_as_string_message(key: str, value: str) -> str:
    """For a list setting given one string, as kohya's command line and GUI write `--network_args a=1 b=2`: the
    setting and its accepted form, each item quoted in brackets."""
    items = ",".join(f'"{item}"' for item in value.split())
    return (f"{key} takes a list, got the string '{value}' (kohya's command line and GUI write its items separated "
            f"by spaces). Write each item quoted, in brackets, and quote the whole override for the shell: "
            f"'{key}=[{items}]'.")


def command_line_problems(argv: list[str]) -> list[str]:
    """One message per problem of the overrides in `argv`: an unknown key, a missing group option, a wrong type.
    Left to Hydra and the pre-flight: `+`/`++`/`~` overrides, `hydra.*`, free-form maps; everything when another
    config is chosen (--config-path/-name/-dir); group options when `hydra.searchpath` adds folders."""
    if any(a in _LEFT_TO_HYDRA for a in argv):  # Hydra answers these and exits
        return []
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, _ = parser.parse_known_args(argv)
    except (Exception, SystemExit):  # Hydra reports a malformed command line itself
        return []
    try:
        overrides = OverridesParser.create().parse_overrides(args.overrides)
    except OverrideParseException:
        return _syntax_problems(args.overrides)
    if args.config_path or args.config_dir or args.config_name not in (None, "config"):
        return []
    keys = set(schema_keys())
    nodes = {k.split(".")[0] for k in keys}
    groups = set(config_groups())
    check_options = not any(o.key_or_group.startswith("hydra.searchpath") for o in overrides)
    template = OmegaConf.structured(Config)
    problems = []
    for override in overrides:
        key = override.key_or_group
        if override.is_add() or override.is_force_add() or override.is_delete() or override.package is not None:
            continue
        if key.startswith("hydra") or is_free_form(key):
            continue
        if "/" in key or key in groups:
            if check_options:
                problems += _group_problems(key, _values(override))
            continue
        if key not in keys:
            top = key.split(".")[0]
            if top in nodes or top not in groups:  # `experiment.x` and the like: Hydra says what it means
                problems.append(unknown_key_message(key))
            continue
        for value in _values(override):
            text = override.get_value_element_as_str() if not override.is_sweep_override() else str(value)
            problem = _type_problem(template, key, value, text)
            if problem:
                problems.append(problem)
    return list(dict.fromkeys(problems))


def config_problems_beside(argv: list[str]) -> list[str]:
    """The config's own problems (checks/validate.py) when the command line has some too: composed from the
    overrides that have none, so one run reports both kinds at once. [] when that cannot be told here: a sweep (-m),
    another config, Hydra's own flags, or a rest that does not compose."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser

    from lora_sweep.checks.validate import config_problems
    from lora_sweep.config import CONF_DIR, register_configs

    parser = get_args_parser()
    parser.exit_on_error = False
    try:
        args, unknown = parser.parse_known_args(argv)
    except (Exception, SystemExit):
        return []
    if unknown or args.multirun or args.config_path or args.config_dir or args.config_name not in (None, "config") \
            or any(a in _LEFT_TO_HYDRA for a in argv) or any(o.startswith("hydra") for o in args.overrides):
        return []
    clean = [o for o in args.overrides if not command_line_problems([o])]  # each override is checked alone
    register_configs()  # the schema, as sweep.py composes with it
    try:
        with initialize_config_dir(str(CONF_DIR), version_base=None):
            cfg = compose("config", overrides=clean)
        return config_problems(cfg)
    except Exception:  # noqa: BLE001 (the rest does not compose alone: its problems show once the first are fixed)
        return []


def _syntax_problems(texts: list[str]) -> list[str]:
    """One `override_syntax_message` per override Hydra's grammar cannot read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, problems = OverridesParser.create(), []
    for text in texts:
        try:
            parser.parse_overrides([text])
        except OverrideParseException as exc:
            problems.append(override_syntax_message(text, exc))
    return problems


def override_syntax_message(override: str, error: BaseException) -> str:
    """One paragraph for an override Hydra's grammar cannot read: for its lexer's error (a character such as
    non-ASCII text), the character and the override with its value quoted; for its parser's error, Hydra's detail."""
    lines = str(error).splitlines()
    lexer = "LexerNoViableAltException: "
    grammar = "Hydra's override grammar: https://hydra.cc/docs/advanced/override_grammar/basic/"
    at = lines[1].index("^") - len(lexer) if lines[0].startswith(lexer) and "^" in "".join(lines[1:2]) else -1
    key, equals, value = override.partition("=")
    if equals and 0 <= at < len(override):  # the caret sits under the first character the lexer cannot read
        value = _quoted(value)
        return (f"Cannot read the override {override!r}: {override[at]!r} (character {at + 1}) cannot appear in "
                "an unquoted value, which holds only ASCII letters, digits, spaces and / \\ - + . _ : $ % * @ ? |. "
                f"Quote the value, and the whole override for the shell: '{key}={value}'. {grammar}")
    detail = next((line for line in lines if line and not line.startswith(("Error parsing", "See "))), "")
    return (f"Cannot read the override {override!r}: {detail.rstrip('.')}. Write key=value, a list as [a,b], a "
            f"sweep as a,b, and quote a value with other characters: 'key=\"value\"'. {grammar}")


_SWEEP_FUNCTIONS = ("glob", "shuffle", "sort")


def _quoted(value: str) -> str:
    """`value` with each element the grammar cannot read quoted: of a list (`[a,b]`), a sweep (`a,b`, also
    `choice(a,b)`) or a sweep function (`sort(a,b)`), so a sweep of two values stays two; else the whole value."""
    fn, paren, rest = value.partition("(")
    if len(_split_top_level(value)) > 1:
        return _quoted_items(value)
    if paren and fn == "choice" and rest.endswith(")"):  # Hydra's sweeper hands each job choice()'s text unquoted
        return _quoted_items(rest[:-1])
    if paren and fn in _SWEEP_FUNCTIONS and rest.endswith(")"):
        return f"{fn}({_quoted_items(rest[:-1])})"
    if value.startswith("[") and value.endswith("]"):
        return f"[{_quoted_items(value[1:-1])}]"
    return f'"{value}"'


def _quoted_items(text: str) -> str:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser, out = OverridesParser.create(), []
    for item in (i.strip() for i in _split_top_level(text)):
        try:
            parser.parse_overrides([f"k={item}"])
            out.append(item)  # readable as it is
        except OverrideParseException:
            out.append(_quoted(item))
    return ",".join(out)


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets, parentheses and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def _group_problems(group: str, values: list[Any]) -> list[str]:
    options = group_options(group)
    if not options:
        return []  # not a group Hydra knows (`hydra/...` plugins load later): Hydra's own error says so
    missing = [name for value in values for name in _option_names(value)
               if name not in options and not _in_subfolder(group, name)]
    if group == "optimizer":
        return [_optimizer_option_message(name, options) for name in missing]
    return [missing_option_message(group, name, options) for name in missing]


def _in_subfolder(group: str, name: str) -> bool:
    """`experiment=user/mine`: an option in a folder of the group (`python -m lora_sweep import` writes there)."""
    folder, _, leaf = name.rpartition("/")
    return bool(folder) and leaf in group_options(f"{group}/{folder}")


def _optimizer_option_message(name: str, options: list[str]) -> str:
    """A kohya --optimizer_type name given as the group option: the option it is, or why v0.8.7's class is not
    shipped (optim.resolve_optimizer_name's words); other names get Hydra's message."""
    from lora_sweep.training import optim

    try:
        option = optim.resolve_optimizer_name(name)
    except ConfigError as error:
        return str(error) if optim.not_shipped_class(name) else missing_option_message("optimizer", name, options)
    return f"optimizer={name}: the option is optimizer={option} (kohya's --optimizer_type {name})."


def hydra_error_text(error: BaseException) -> str:
    """A Hydra composition error as one paragraph: Hydra's message and its OmegaConf cause without the search path
    and OmegaConf's `full_key:`-style lines; a group's options on one line with the closest one ("Did you mean
    noise=offset?"); for an unknown key, the closest real keys instead of Hydra's advice to add it with '+'."""
    import difflib
    import re

    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    cause = error.__cause__
    missing = re.match(r"Could not override '([^']+)'", str(error))
    if missing and isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        if missing[1].startswith("hydra.") and getattr(cause, "parent_node", None) is not None:
            return unknown_key_message(missing[1], known=_node_keys(cause))  # the active launcher's, and so on
        if not is_free_form(missing[1]):
            return unknown_key_message(missing[1])
        if getattr(cause, "parent_node", None) is not None:
            return _free_form_message(missing[1], cause)
    text = str(error) + ("\n" + str(cause) if isinstance(cause, OmegaConfBaseException) else "")
    override = getattr(error, "override", None)  # OverrideParseException: a syntax error in one override
    if isinstance(override, str):
        return override_syntax_message(override, error)
    lines, options, available = [], None, {}
    for line in text.splitlines():
        if line.startswith("Config search path"):
            break
        if re.match(r"\s+(full_key|reference_type|object_type|key|value_type|parent_node)\b", line) or not line.strip():
            continue
        heading = re.match(r"Available options in '([^']+)':$", line)
        if heading:
            options = (heading[1], available.setdefault(heading[1], []))
            lines.append(line)
        elif options is not None and line.startswith(("\t", " ")):
            options[1].append(line.strip())
            lines[-1] = f"Available options in '{options[0]}': {', '.join(options[1])}"
        else:
            options = None
            lines.append(line.strip())
    paragraph = " ".join(line if line.endswith((".", ":", "?")) else line + "." for line in lines)
    unknown = re.search(r"Key '[^']+' not in '\w+'\s+full_key: (\S+)", text)  # a config file's misspelt key
    if unknown:
        paragraph += "" if is_free_form(unknown[1]) else " " + unknown_key_message(unknown[1])
    wanted = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
    if wanted and available.get(wanted[1]):
        near = difflib.get_close_matches(wanted[2], available[wanted[1]], n=2, cutoff=0.5)
        paragraph += f" Did you mean {' or '.join(f'{wanted[1]}={o}' for o in near)}?" if near else ""
    return paragraph


def _free_form_message(key: str, cause) -> str:
    """For `optimizer.args.weight_decai=0.1` (a key the chosen option's free-form map lacks, set without '+'): the
    closest key it sets, its keys, and '+' for an argument it does not set, instead of Hydra's advice to add it."""
    import difflib

    parent, _, leaf = key.rpartition(".")
    owner_node, group = cause.parent_node._get_parent(), key.split(".")[0]
    name = owner_node.get("name") if owner_node is not None and group in config_groups() else None
    owner = f"the {group}={name} config" if isinstance(name, str) else parent
    keys = [k.rpartition(".")[2] for k in _node_keys(cause)]
    near = difflib.get_close_matches(leaf, keys, n=2, cutoff=0.6)
    against = "the class" if parent == "optimizer.args" else "the schedule"
    return (f"{key} is not set by {owner}." + (f" Did you mean {' or '.join(f'{parent}.{k}' for k in near)}?"
                                               if near else "")
            + f" It sets {parent}: {', '.join(keys) or 'nothing'}; another argument is passed with "
              f"'+{parent}.<name>=<value>' (the pre-flight checks it against {against}).")


def _node_keys(cause) -> list[str]:
    """Dotted keys of the node an OmegaConf key error searched (e.g. the active launcher's), without `_`-keys."""
    from omegaconf import OmegaConf

    parent = str(getattr(cause, "full_key", "") or "").rpartition(".")[0]
    tree = OmegaConf.to_container(cause.parent_node, resolve=False)
    keys = flatten(tree) if isinstance(tree, dict) else {}
    return [f"{parent}.{k}" if parent else k for k in keys if not k.startswith("_")]
