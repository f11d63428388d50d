"""Sample prompts in kohya sd-scripts v0.8.7's prompt-file format, parsed into `PromptSpec`s.

One prompt per line (blank and `#` lines skipped), split at " --" into the prompt and options (case-insensitive):

    a photo of a cat --w 1024 --h 1024 --d 42 --s 30 --l 7.5 --n blurry, lowres

    --w / --h  size, rounded down to a multiple of 8, at least 64      --d  seed
    --s        steps, clamped to 1..1000                               --l  CFG scale
    --n        negative prompt (to the next " --")                     --ss sampler (sampling/schedulers.py)
    --cn, --am, --f  accepted and ignored

The arithmetic is kohya's (`line_to_prompt_dict`, `sample_image_inference`); a value it changes is warned about, as
are sides above `LARGE_SIDE`. Unlike kohya, which silently drops what its digit-only patterns miss and ignores
unknown options, negative numbers and unknown options are problems, all reported at once naming the file and line; a
one-dash option stays prompt text, with a warning. A prompt without `--d` gets `default_seed + index`, not a random
seed, so every variant and step start from the same noise.

The prompt and negative take A1111 emphasis, `(red:1.2)`, `(red)`, `[red]` (`sampling.emphasis`); a weight that is
not a number is a problem.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path

from lora_sweep.errors import Fallback, UserError
from lora_sweep.sampling.emphasis import emphasis_problem
from lora_sweep.sampling.schedulers import sampler_problem

IGNORED_KOHYA_OPTIONS = ("cn", "am", "f")
_OPTION = re.compile(r"^(?P<name>[A-Za-z]+)(?:\s+(?P<value>.*))?$", re.DOTALL)
# A kohya option written with one dash ("a dog -w 640"): not an option, so it stays in the prompt text; warned.
_SINGLE_DASH = re.compile(r"(?<!\S)-(w|h|d|s|l|n|ss|cn|am|f)(?=\s+\S)", re.IGNORECASE)
LARGE_SIDE = 4096  # a sample side above this many pixels is warned about (kohya allows it; memory grows with it)
_AT_LEAST = {"w": "a width of at least 64 (a multiple of 8)", "h": "a height of at least 64 (a multiple of 8)",
             "d": "a seed of 0 or more", "s": "1 to 1000 steps", "l": "a CFG scale of 0 or more"}


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One sample to draw: the text, the size, the seed and the sampler settings."""

    prompt: str
    negative: str = ""
    width: int = 1024
    height: int = 1024
    seed: int = 0
    steps: int = 30
    cfg: float = 7.5
    sampler: str | None = None  # a kohya sampler name (`--ss`, `sampling.sampler`); None: SDXL base's Euler
    where: str = field(default="", compare=False)  # the setting, file and line it came from (for messages)
    changed: tuple[str, ...] = field(default=(), compare=False)  # kohya's changes to its options: "--w 65 used as 64"

    def label(self, index: int) -> str:
        """A short caption for grids: prompt index, seed and the first words of the prompt."""
        words = self.prompt if len(self.prompt) <= 40 else self.prompt[:37] + "..."
        return f"p{index:02d} s{self.seed}: {words}"


def round_size(pixels: int) -> int:
    """kohya's sample-size rounding: down to a multiple of 8, at least 64."""
    return max(64, pixels - pixels % 8)


def clamp_steps(steps: int) -> int:
    """kohya's sampling-steps clamp: 1..1000."""
    return max(1, min(1000, steps))


def parse_prompt_line(
    line: str,
    *,
    index: int,
    default_width: int = 1024,
    default_height: int = 1024,
    default_steps: int = 30,
    default_cfg: float = 7.5,
    default_seed: int = 0,
    default_negative: str = "",
    default_sampler: str | None = None,
    where: str | None = None,
) -> PromptSpec:
    """One prompt line with inline options (module docstring) as a `PromptSpec`; `index` picks the default seed, `where`
    names the line in errors (default "sampling.prompts[index]"). Raises one UserError naming every bad option, one
    per line. `changed` lists kohya's changes ("--s 0 used as 1") for `check_prompts` to warn about."""
    where = where or f"sampling.prompts[{index}]"
    parts = (" " + line.strip()).split(" --")  # the leading space lets a line that starts with "--" be caught
    prompt = parts[0].strip()
    if not prompt:
        raise UserError(f"{where}: the line {line!r} has options but no prompt text before them.")
    values: dict[str, object] = {
        "width": default_width,
        "height": default_height,
        "steps": default_steps,
        "cfg": default_cfg,
        "seed": default_seed + index,
        "negative": default_negative,
        "sampler": default_sampler,
    }
    bad: list[str] = []  # every bad option of the line is named, not the first
    changed: list[str] = []  # values kohya's arithmetic changed, said as a warning by `check_prompts`
    for option in parts[1:]:
        option = option.strip()
        if option:
            problem = _read_option(option, line, values, changed)
            if problem:
                bad.append(f"{where}: {problem}")
    for name, text in (("prompt", prompt), ("negative prompt", str(values["negative"]))):
        problem = emphasis_problem(text)
        if problem:
            bad.append(f"{where}: {problem} (in the {name} {text!r}); write a number, e.g. '(red:1.2)', or '\\(' for a "
                       "literal bracket. (kohya v0.8.7 stops sampling with an error there.)")
    if bad:
        raise UserError("\n".join(bad))
    return PromptSpec(
        prompt=prompt,
        negative=str(values["negative"]),
        width=round_size(int(values["width"])),
        height=round_size(int(values["height"])),
        seed=int(values["seed"]),
        steps=int(values["steps"]),
        cfg=float(values["cfg"]),
        sampler=values["sampler"],
        where=where,
        changed=tuple(changed),
    )



def _read_option(option: str, line: str, values: dict[str, object], changed: list[str]) -> str | None:
    """Set `values` from one option of `line` ("w 1024"); the problem with it, if any."""
    match = _OPTION.match(option)
    name = match.group("name").lower() if match else ""
    value = (match.group("value") or "").strip() if match else ""
    try:
        if name in _AT_LEAST and value.startswith("-") and float(value) <= 0:  # "-0" too: a sign kohya drops
            return (f"option '--{option}' in {line!r} is negative; give {_AT_LEAST[name]}. (kohya v0.8.7 takes "
                    "digits only there: it would drop the option and use its default.)")
        if name in ("w", "h", "s"):
            given = int(value)
            used = clamp_steps(given) if name == "s" else round_size(given)
            values[{"w": "width", "h": "height", "s": "steps"}[name]] = used
            if used != given:
                changed.append(f"--{name} {given} used as {used}")
        elif name == "d":
            values["seed"] = int(value)
        elif name == "l":
            values["cfg"] = float(value)
        elif name == "n":
            values["negative"] = value
        elif name == "ss":
            problem = sampler_problem(value, f"option '--{option}' in {line!r}", per_prompt=True)
            if problem:
                return problem
            values["sampler"] = value
        elif name not in IGNORED_KOHYA_OPTIONS:
            return (f"unknown option '--{option.split()[0]}' in {line!r}. Accepted: --w WIDTH, --h HEIGHT, --d SEED, "
                    "--s STEPS, --l CFG, --n NEGATIVE PROMPT, --ss SAMPLER (kohya's --cn, --am and --f are accepted "
                    "and ignored).")
    except ValueError:
        return f"option '--{option}' in {line!r} needs a number (--w/--h/--d/--s take whole numbers, --l a decimal)."
    return None

def single_dash_options(line: str) -> list[str]:
    """The tokens of `line`'s prompt that look like one-dash kohya options ("-w"): prompt text, since kohya splits at "
    --"."""
    prompt = (" " + line.strip()).split(" --")[0]
    return ["-" + m.group(1) for m in _SINGLE_DASH.finditer(prompt)]


def read_prompt_lines(path: str | Path, *, setting: str = "sampling.prompt_file") -> list[tuple[int, str]]:
    """(line number, stripped text) of each prompt line of a .txt prompt file (blank and `#` lines left out). Raises
    UserError naming `setting` for a missing file, another extension, or bytes that are not UTF-8."""
    path = Path(path)
    if not path.is_file():  # first: a folder or a missing file is one problem, whatever its name ends with
        raise UserError(f"{setting}: the prompt file '{path}' does not exist"
                        + (" (it is a folder)." if path.is_dir() else " (a relative path is read from the directory "
                           "the sweep was started in)."))
    if path.suffix.lower() != ".txt":
        raise UserError(
            f"{setting}: '{path}' is not a .txt prompt file. Give a .txt file (one prompt per line, "
            "'#' comments, inline --w --h --d --s --l --n options) or a list of prompt strings in sampling.prompts."
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise UserError(f"{setting} '{path}', line {line}: not valid UTF-8 ({error.reason} at byte {error.start}). "
                        "Save the file as UTF-8.") from None
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]


def check_prompts(
    prompts: str | Path | Sequence[str] = (),
    *,
    prompt_file: str | Path | None = None,
    **defaults,
) -> tuple[list[PromptSpec], list[str], list[Fallback]]:
    """`sampling.prompts` / `sampling.prompt_file` -> (specs, problems, fallbacks), never stopping at the first
    problem. Specs in order: the file's lines, then the list's entries (same syntax; `#` entries skipped);
    `prompts` may itself be a path to a .txt file. A problem is one line naming the setting (with the file and line
    number); no prompt at all is one. `defaults`: `parse_prompt_line`'s default_* keywords."""
    setting = "sampling.prompt_file"
    if isinstance(prompts, (str, Path)):
        if prompt_file is not None:
            return [], ["sampling.prompts is a path and sampling.prompt_file is set too: give one prompt file, or "
                        "make sampling.prompts a list of prompt lines."], []
        prompts, prompt_file, setting = (), prompts, "sampling.prompts"
    sourced: list[tuple[str, str, str]] = []  # (where for problems, place for warnings, line)
    problems: list[str] = []
    if prompt_file is not None:
        try:
            sourced += [(f"{setting} '{prompt_file}', line {n}", f"{prompt_file}, line {n}", text)
                        for n, text in read_prompt_lines(prompt_file, setting=setting)]
        except UserError as error:
            problems.append(str(error))
    sourced += [(f"sampling.prompts[{i}]",) * 2 + (str(line).strip(),) for i, line in enumerate(prompts)
                if str(line).strip() and not str(line).strip().startswith("#")]
    if not sourced and not problems:
        where = f"{setting} ('{prompt_file}')" if prompt_file is not None else "sampling.prompts"
        off = "sampling.prompt_file=null" if prompt_file is not None else "sampling.prompts=[]"
        problems.append(f"{where}: no prompts found (only blank or # comment lines). Give at least one prompt line, "
                        f"or set {off} to sample nothing.")
    specs, dashed, placed = [], [], []
    for index, (where, place, line) in enumerate(sourced):
        try:
            specs.append(parse_prompt_line(line, index=index, where=where, **defaults))
            placed.append((place, specs[-1]))
        except UserError as error:
            problems += str(error).splitlines()  # one problem per bad option of the line
        if single_dash_options(line):
            dashed.append(f"{place} ({' '.join(single_dash_options(line))})")
    source = setting if prompt_file is not None else "sampling.prompts"
    fallbacks = [Fallback(
        source, "prompt lines with tokens that look like kohya options written with one dash: kept as prompt text",
        tuple(dashed), "kohya's options start with two dashes after a space, e.g. 'a dog --w 640 --h 1280 --s 16'.")
    ] if dashed else []
    return specs, problems, fallbacks + size_warnings(placed, source)


def size_warnings(placed: Sequence[tuple[str, PromptSpec]], setting: str) -> list[Fallback]:
    """Warnings, naming `setting`, for the (place, spec)s whose --w/--h/--s kohya's arithmetic changed and for sizes
    above `LARGE_SIDE`; a place is "file, line N" or "sampling.prompts[i]"."""
    changed = tuple(f"{place} ({', '.join(spec.changed)})" for place, spec in placed if spec.changed)
    large = tuple(f"{place} ({spec.width}x{spec.height})" for place, spec in placed
                  if max(spec.width, spec.height) > LARGE_SIDE)
    return ([Fallback(setting, "prompt lines with --w/--h/--s values changed the way kohya does (sizes down to a "
                      "multiple of 8, at least 64; steps 1 to 1000): sampled with the values used", changed,
                      "Write the values used to silence this.")] if changed else []) + (
        [Fallback(setting, f"prompt lines with a sample side above {LARGE_SIDE} px: sampled as given (kohya allows "
                  "it); sampling may run out of memory", large,
                  "Lower --w/--h there (or sampling.width/sampling.height) if that is not meant.")] if large else [])


def at_seeds(specs: Sequence[PromptSpec], moved: Sequence[PromptSpec], seeds: Sequence[int]) -> list[PromptSpec]:
    """Every prompt at each of `seeds` (`sampling.seeds`), prompt-major. `specs` parsed with default_seed=seeds[0],
    `moved` with seeds[0] + 1: a line whose seed did not move has `--d N` and is drawn at N, N+1, ...; the others,
    line i, at s + i for each s."""
    out = []
    for index, (spec, other) in enumerate(zip(specs, moved, strict=True)):
        fixed = spec.seed == other.seed
        out += [dataclasses.replace(spec, seed=spec.seed + k if fixed else seed + index)
                for k, seed in enumerate(seeds)]
    return out
