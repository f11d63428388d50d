"""A CUDA-graphed lora-sweep step for the fixed-shape (single bucket) case: the GPU-time option the benchmark tries.

What is captured: kohya's noise draw, the UNet forward under autocast, kohya's loss, backward, gradient clipping
and AdamW's update, i.e. the same math as `micro_batch_loss` + `core_step`, on static device tensors. Per step the
host only copies the next batch into those tensors, replays the graph and reads the loss. This removes the CPU's
kernel-launch time, which dominates when the GPU is fast and the batch small.

Conditions (checked, else ValueError): CUDA; a policy without a loss scaler (bf16, fp8_bf16: fp16's GradScaler
decides on the host whether to step); no gradient checkpointing; a constant learning rate (the LR is baked into the
graph); the l2 loss without per-step options that draw on the host. The optimizer must be built with
`capturable=True` (its step counters live on the GPU). Autocast runs with `cache_enabled=False`, as PyTorch asks for
capture.
"""

from __future__ import annotations

from typing import Any

import torch


class GraphedStep:
    def __init__(self, s: Any, *, warmup: int = 3) -> None:
        if s.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if s.scaler.is_enabled() or s.cfg.train.gradient_checkpointing:
            raise ValueError("CUDA graphs here need a policy without loss scaling and no gradient checkpointing")
        if not s.optimizer.defaults.get("capturable"):
            raise ValueError("build the optimizer with capturable=True (optimizer.args.capturable=true)")
        self.s = s
        self.static = static_inputs(s)
        side = torch.cuda.Stream(s.device)
        side.wait_stream(torch.cuda.current_stream(s.device))
        with torch.cuda.stream(side):  # warm-up outside the graph: cuBLAS workspaces, optimizer state
            for _ in range(warmup):
                s.optimizer.zero_grad(set_to_none=True)
                graph_body(self.s, self.static)
        torch.cuda.current_stream(s.device).wait_stream(side)
        s.optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = graph_body(self.s, self.static)

    def reset(self, lora: dict[str, torch.Tensor]) -> None:
        """Undo the capture's warm-up steps in place (the graph holds these tensors' addresses)."""
        reset_training_state(self.s, lora)

    def __call__(self, batch: dict[str, torch.Tensor] | None = None) -> float:
        """One training step: new inputs (optional, same shapes) copied in, the graph replayed, the loss read."""
        if batch is not None:
            for key, value in batch.items():
                self.static[key].copy_(value, non_blocking=True)
        self.graph.replay()
        return float(self.static_loss)


def static_inputs(s: Any) -> dict[str, torch.Tensor]:
    """The session's examples stacked on its device: the tensors a graph reads."""
    examples = s.prepared.examples
    return {key: torch.stack([getattr(e, key) for e in examples]).to(s.device)
            for key in ("latents", "context", "pooled", "time_ids")}


def graph_body(s: Any, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """micro_batch_loss + backward + clip + step on static inputs `x`, written for capture: no host reads, no
    host-side branches on tensor values, autocast without its cast cache. Returns the loss (detached)."""
    from lora_sweep.training import loss as loss_lib
    from lora_sweep.training import noise as noise_lib

    cfg = s.cfg
    latents = (x["latents"] * s.vae_scale).to(s.policy.latent_dtype)
    with torch.autocast(s.device.type, dtype=s.policy.compute_dtype or torch.float32,
                        enabled=s.policy.compute_dtype is not None, cache_enabled=False):
        n = noise_lib.kohya_noisy_latents(latents, s.alphas_cumprod, one_timestep_per_batch=s.one_timestep_per_batch)
        pred = s.unet(n.noisy_latents, n.timesteps, x["context"],
                      added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"].to(x["pooled"].dtype)}
                      ).sample
    terms = loss_lib.kohya_loss(pred.float(), n.noise.float(), n.timesteps, s.alphas_cumprod, loss_type=cfg.loss.type,
                                min_snr_gamma=cfg.loss.min_snr_gamma, debiased=cfg.loss.debiased)
    terms.loss.backward()
    if cfg.train.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(s.params, cfg.train.max_grad_norm)
    s.optimizer.step()
    return terms.loss.detach()


def reset_training_state(s: Any, lora: dict[str, torch.Tensor]) -> None:
    """LoRA values from `lora` and every optimizer state tensor zeroed, in place: what a fresh AdamW starts from
    (its step counter included), without replacing any tensor a captured graph points to."""
    from benchmarks.gpu_steps import load_lora_state

    load_lora_state(s.unet, lora)
    with torch.no_grad():
        for state in s.optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    value.zero_()
