"""Path helpers: the per-user cache and state roots, the launch folder, absolute path settings, the project's files,
a run's own folder, which files of a subset folder are its images. Shared so the model loader, the cache, the
states and compare find one rule without importing each other.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
from pathlib import Path
from typing import Any

# The image files a subset folder trains on (kohya's suffixes, and .avif); data/dataset.py names the others it meets.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif")


def is_image_entry(path: Path) -> bool:
    """True for a subset folder's entry the training reads as an image: not hidden, not a folder, an
    IMAGE_EXTENSIONS suffix (a link whose target is gone too: the scan names it)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and not path.is_dir()


def subset_images(folder: Path) -> list[Path]:
    """The image entries directly in `folder` (kohya does not look into subfolders), sorted: the data scan's
    listing, which then skips the files PIL cannot read."""
    return sorted(p for p in folder.iterdir() if is_image_entry(p))


def default_cache_dir() -> Path:
    """$LORA_SWEEP_CACHE_DIR, else $XDG_CACHE_HOME/lora-sweep, else ~/.cache/lora-sweep."""
    if os.environ.get("LORA_SWEEP_CACHE_DIR"):
        return Path(os.environ["LORA_SWEEP_CACHE_DIR"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "lora-sweep"
    return Path.home() / ".cache" / "lora-sweep"


def cache_root(cfg) -> Path:
    """`data.cache_dir`, else the per-user default (`default_cache_dir`)."""
    return Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else default_cache_dir()


def state_root(cfg) -> Path:
    """`train.state_dir`, else `<cache root>/states`: stable across sweeps and working folders (see checkpoint.py)."""
    return Path(cfg.train.state_dir).expanduser().resolve() if cfg.train.state_dir else cache_root(cfg) / "states"


PROJECT_RESOLVER = "lora_sweep_project"
NEW_DIR_RESOLVER = "lora_sweep_new_dir"
# folder `new_dir` made in this process -> the parents it made for it: removed again if the pre-flight refuses
MADE_DIRS: dict[str, list[str]] = {}


def project_path(relative: str) -> str:
    """`${lora_sweep_project:experiments/prompts/x.txt}` in conf/: a file shipped with lora-sweep, whatever the
    launch folder (a user's relative paths mean the launch folder: `absolute`)."""
    return str(Path(__file__).resolve().parents[1] / relative)


def new_dir(path: Any) -> str:
    """`${lora_sweep_new_dir:outputs/<date>/<time>}` in conf/: `path`, made here, or `path_2`, `path_3`, ... when
    another process made it first. `mkdir` is atomic, so two runs started in the same second get a folder each. The
    resolver is cached, and Hydra copies a config's cache into each job's config (launchers pickle it with the
    config): a sweep's jobs share the folder their parent made. A folder that cannot be made is returned as it is,
    for the pre-flight to name; one still empty when the process ends is removed."""
    path = str(path)
    parents = [p for p in Path(path).parents if not p.exists()]  # deepest first
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        for n in itertools.count(1):
            candidate = path if n == 1 else f"{path}_{n}"
            try:
                os.mkdir(candidate)
            except FileExistsError:
                continue
            MADE_DIRS[candidate] = [str(p) for p in parents]
            atexit.register(remove_if_unused, candidate)  # e.g. `--cfg hydra --resolve`, which only prints it
            return candidate
    except OSError:
        pass
    return path


def remove_if_unused(path: Any) -> None:
    """Remove a folder `new_dir` made in this process, and the parents it made, while empty (a refused run leaves
    nothing)."""
    if str(path) in MADE_DIRS:
        with contextlib.suppress(OSError):  # stops at the first folder that holds something
            for folder in [str(path), *MADE_DIRS.pop(str(path))]:
                os.rmdir(folder)


def register_resolver() -> None:
    """Register `project_path` as the `lora_sweep_project` resolver and `new_dir` as `lora_sweep_new_dir` (cached:
    one folder per config), by `lora_sweep.setup()`."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(PROJECT_RESOLVER):
        OmegaConf.register_new_resolver(PROJECT_RESOLVER, project_path)
    if not OmegaConf.has_resolver(NEW_DIR_RESOLVER):
        OmegaConf.register_new_resolver(NEW_DIR_RESOLVER, new_dir, use_cache=True)


# settings that name a file or folder: relative to the launch folder, whatever hydra.job.chdir says
PATH_SETTINGS = ("model.path", "data.dir", "data.validation_dir", "data.cache_dir", "data.reg_data_dir",
                 "data.dataset_config", "sampling.prompt_file", "train.output_dir", "train.state_dir", "train.resume",
                 "network.network_weights", "evaluation.clip_model", "evaluation.dino_model")
_NOT_PATHS = {"train.resume": ("auto", "never")}
# kept as typed when nothing is there, so a misspelt `train.resume=sometimes` is shown as typed
_KEPT_IF_MISSING = ("train.resume",)


def launch_dir() -> Path:
    """The folder the command was started in: Hydra's original working directory in a job, else the current one."""
    from hydra.utils import to_absolute_path

    return Path(to_absolute_path("."))


def absolute(value: str | os.PathLike) -> str:
    """`value` with `~` expanded, made absolute against `launch_dir()` and normalised (symlinks kept as typed)."""
    from hydra.utils import to_absolute_path

    return os.path.normpath(to_absolute_path(os.path.expanduser(str(value))))


def absolute_tracking_uri(uri: str | None) -> str | None:
    """A local MLflow store given by a relative path (`sqlite:///mlflow.db`, `file:mlruns`, `mlruns`) made absolute;
    servers and absolute paths unchanged."""
    if not uri:
        return uri
    for prefix in ("sqlite:///", "file://", "file:"):
        if uri.startswith(prefix):
            rest = uri[len(prefix):]
            return uri if not rest or rest.startswith("/") else prefix + absolute(rest)
    return uri if "://" in uri else absolute(uri)


def make_paths_absolute(cfg) -> dict[str, str]:
    """Make every relative path setting of `cfg` absolute, in place; returns {setting: new value} of those changed.
    Call it before the config hash, so the hash and every job agree on what the user meant."""
    from omegaconf import OmegaConf, open_dict

    changed: dict[str, str] = {}
    for key in PATH_SETTINGS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None or str(value).strip() == "" or str(value) in _NOT_PATHS.get(key, ()):
            continue
        resolved = absolute(value)
        if key in _KEPT_IF_MISSING and not os.path.exists(resolved):
            continue
        if resolved != str(value):
            changed[key] = resolved
    uri = OmegaConf.select(cfg, "tracking.uri", default=None)
    if uri and absolute_tracking_uri(uri) != uri:
        changed["tracking.uri"] = absolute_tracking_uri(uri)
    with open_dict(cfg):
        for key, value in changed.items():
            OmegaConf.update(cfg, key, value, merge=False)
    return changed
