"""lora-sweep's training step against the bare diffusers + peft loop on SDXL base's real architecture (1,444 LoRA
tensors), one copy of the weights: the step figure of `make bench-sdxl`.

    python benchmarks/sdxl_step.py --model DIR --record OUT.json [--root REPO] [--precision fp32] [--resolution 128]

What `make bench`'s figure 1 "loop" measure does on the tiny model, at SDXL's size: lora-sweep's real `train()` loop
(every per-step check, clipping, metrics, hooks; the sink discards everything) is timed between its progress
callbacks, and the bare loop (benchmarks/bare_loop.py: same UNet, kohya's targets, rank, alpha, AdamW, clipping,
same inputs) runs its repetitions inside those callbacks, interleaved repetition by repetition. The bare UNet is
built on the meta device and given lora-sweep's own frozen base tensors (the same storage), so the machine holds
one SDXL UNet, not two: about 10 GiB in fp32. `--root` measures another checkout's lora-sweep (before/after).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bare_loop import BareLoop, copy_lora_weights, wrapped_modules  # noqa: E402
from benchmarks.cpu_figures import _LoopTimer, _summary, index_batches, session_batch  # noqa: E402


def shared_bare_loop(s, *, rank: int, alpha: float, lr: float, max_grad_norm: float) -> BareLoop:
    """A BareLoop on a second UNet whose frozen weights are lora-sweep's own tensors (no copy), LoRA init copied."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(s.unet.config)
    base = {name.replace(".base_layer.", "."): tensor for name, tensor in
            [*s.unet.named_parameters(), *s.unet.named_buffers()] if "lora_" not in name}
    unet.load_state_dict(base, strict=True, assign=True)
    dtype = next(iter(base.values())).dtype
    bare = BareLoop(unet, rank=rank, alpha=alpha, lr=lr, max_grad_norm=max_grad_norm, weight_dtype=dtype,
                    autocast_dtype=None if dtype == torch.float32 else dtype)
    if wrapped_modules(bare.unet) != wrapped_modules(s.unet):
        raise AssertionError("the bare loop and lora-sweep put LoRA on different modules")
    copy_lora_weights(s.unet, bare.unet)
    return bare


def compose(root: Path, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lora_sweep.config import register_configs

    register_configs()
    with initialize_config_dir(str(root / "conf"), version_base=None):
        return hydra_compose("config", overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the SDXL diffusers folder")
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if root != Path(__file__).resolve().parents[1]:  # another checkout's lora_sweep, not this one's
        sys.path.insert(0, str(root))
        for name in [m for m in sys.modules if m == "lora_sweep" or m.startswith("lora_sweep.")]:
            del sys.modules[name]

    import lora_sweep
    from lora_sweep.training import train as train_module

    cfg = compose(root, ["model=sdxl", f"model.path={args.model}", f"data.resolution={args.resolution}",
                         "train.batch_size=1", f"precision={args.precision}", "noise=none", "loss=l2",
                         "optimizer=adamw", f"train.max_steps={args.warmup + args.reps * args.steps}"])
    captured: dict = {}
    build_session = train_module.build_session
    timer: _LoopTimer | None = None

    def capturing_build(*a, **kw):
        nonlocal timer
        started = time.perf_counter()
        s = build_session(*a, **kw)
        captured["setup_s"] = time.perf_counter() - started
        bare = shared_bare_loop(s, rank=cfg.network.rank, alpha=cfg.network.alpha, lr=float(cfg.train.lr),
                                max_grad_norm=cfg.train.max_grad_norm)
        batches = [session_batch(s, b) for b in index_batches(s, 1)]
        captured["lora_tensors"] = len(s.params)
        timer.bare_step = lambda k: float(bare.step(batches[k % len(batches)]))
        return s

    timer = _LoopTimer(None, args.warmup, args.steps, args.reps)
    train_module.build_session = capturing_build
    started = time.perf_counter()
    try:
        train_module.train(cfg, output_dir=args.workdir / "step-out", sink=timer)
    finally:
        train_module.build_session = build_session
    record = {"precision": args.precision, "resolution": args.resolution, "batch_size": 1, "warmup": args.warmup,
              "steps": args.steps, "reps": args.reps, "lora_sweep_file": lora_sweep.__file__,
              "loop": _summary(timer.ours, timer.theirs), "ours_s": timer.ours, "bare_s": timer.theirs,
              "wall_s": time.perf_counter() - started, "threads": __import__("torch").get_num_threads(),
              **captured}
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["loop"], indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
