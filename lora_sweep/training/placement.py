"""Where each model component's weights live, and in which dtype, from the file on disk to the training device.

kohya v0.8.7 (docs/kohya-reference.md §4) stores the U-Net and text encoders in weight_dtype (fp8 under
--fp8_base), the VAE in fp32 (--no_half_vae) and LoRA in fp32. lora-sweep stores the same, but reads each
component in its checkpoint's dtype or its storage dtype and casts on the CPU: never a wider copy than needed.

    component                                read as (`load_dtypes`)            stored on the training device
    U-Net                                    weight_dtype                       weight_dtype, LoRA fp32
    text encoders the training step runs     weight_dtype (fp8: checkpoint's)   like the U-Net (apply_base_precision)
    text encoders that only fill the cache   the checkpoint's dtype             the same (embeddings fp32), fp32 compute
    VAE (fills the latent cache, samples)    fp32                               fp32 (kohya's --no_half_vae)

`precision=fp32` reads everything in fp32. Caches are filled in fp32 for every precision, so variants share them.
fp8 is cast from the checkpoint's dtype, bit-equal to kohya's cast from fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch

from lora_sweep.training.precision import PrecisionPolicy, _UpcastDuringForward

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", "vae", *TEXT_ENCODERS)
# Dtypes a checkpoint may be read in as they are; anything else (an fp8 checkpoint, unknown) is read in fp32.
READABLE = (torch.float32, torch.float16, torch.bfloat16)


def load_dtypes(policy: PrecisionPolicy, checkpoint: Mapping[str, torch.dtype | None], *,
                text_encoders_in_step: bool) -> dict[str, torch.dtype]:
    """The dtype to read each component in ("unet", "vae", "text_encoder", "text_encoder_2").

    checkpoint: dtypes on disk (None: unknown). text_encoders_in_step: they run in the step, not only for the cache.
    fp8 text encoders are read in the checkpoint's dtype (their embeddings stay wider); the U-Net straight into fp8.
    """
    def on_disk(component: str) -> torch.dtype:
        dtype = checkpoint.get(component)
        return dtype if dtype in READABLE else torch.float32

    if policy.weight_dtype == torch.float32:
        return dict.fromkeys(COMPONENTS, torch.float32)
    dtypes = {"unet": policy.weight_dtype, "vae": torch.float32}
    for name in TEXT_ENCODERS:
        if not text_encoders_in_step:
            dtypes[name] = on_disk(name)
        else:
            dtypes[name] = on_disk(name) if policy.fp8_base else policy.weight_dtype
    return dtypes


@contextlib.contextmanager
def adapters_in_fp32(module: torch.nn.Module) -> Iterator[None]:
    """While PEFT injects a LoRA into `module`, make it create the adapter tensors in fp32, as kohya does.

    Why: PEFT gives new adapters the base layer's dtype. Narrower weights are presented as zero-memory fp32
    stand-ins and put back on exit, so adapters get the values (and RNG stream) of an fp32 base.
    """
    swapped: list[tuple[torch.nn.Module, torch.nn.Parameter]] = []
    for sub in module.modules():
        weight = sub._parameters.get("weight")
        if weight is None or not weight.is_floating_point() or weight.dtype == torch.float32:
            continue
        stand_in = torch.zeros((), dtype=torch.float32, device=weight.device).expand(weight.shape)
        sub._parameters["weight"] = torch.nn.Parameter(stand_in, requires_grad=False)
        swapped.append((sub, weight))
    try:
        yield
    finally:
        for sub, weight in swapped:
            weight.requires_grad_(sub._parameters["weight"].requires_grad)  # add_lora froze the stand-in
            sub._parameters["weight"] = weight


def compute_in_fp32(module: torch.nn.Module) -> int:
    """Make a frozen `module` compute in fp32 from weights stored narrower; returns how many submodules it hooked.

    For the text encoders that fill the shared (fp32) text cache. Embeddings are stored in fp32 (which also keeps
    diffusers' pipeline in fp32); outputs are bit-equal to fp32 weights for an fp16 checkpoint.
    """
    hooked = 0
    for sub in module.modules():
        names = [name for name, t in [*sub._parameters.items(), *sub._buffers.items()]
                 if t is not None and t.is_floating_point() and t.dtype != torch.float32]
        if not names:
            continue
        if isinstance(sub, torch.nn.Embedding):
            sub.weight.data = sub.weight.data.float()  # frozen, outside any graph
            continue
        hooks = _UpcastDuringForward(names, torch.float32)
        sub.register_forward_pre_hook(hooks.swap_in)
        sub.register_forward_hook(hooks.swap_back, always_call=True)
        hooked += 1
    return hooked


def describe(module: torch.nn.Module) -> str:
    """"4.78 GiB bfloat16 + 0.09 GiB float32 (LoRA)": the bytes a module's tensors hold, per dtype, for the log."""
    sizes: dict[str, int] = {}
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        key = str(tensor.dtype).removeprefix("torch.") + (" (LoRA)" if "lora_" in name else "")
        sizes[key] = sizes.get(key, 0) + tensor.numel() * tensor.element_size()
    return " + ".join(f"{size / 2**30:.2f} GiB {key}" for key, size in sizes.items())
