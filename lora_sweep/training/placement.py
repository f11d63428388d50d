"""Where each model component's weights live, and in which dtype, from the file on disk to the training device.

kohya v0.8.7 (train_network.py, docs/kohya-reference.md §4) casts the U-Net and the text encoders to weight_dtype
(float8_e4m3fn under --fp8_base), keeps the VAE in fp32 under --no_half_vae and creates its LoRA modules in fp32.
lora-sweep stores the same dtypes, but never holds a wider copy than needed on the way: every component is read in
its checkpoint's own dtype, or directly in the dtype it will be stored in, and is cast on the CPU before it is
placed on the training device. SDXL's released weights are fp16, so reading them in fp32 (as diffusers does by
default) would add memory and no precision.

    component                                read as (`load_dtypes`)            stored on the training device
    U-Net                                    weight_dtype                       weight_dtype, LoRA fp32
    text encoders the training step runs     weight_dtype (fp8: checkpoint's)   like the U-Net (apply_base_precision)
      (network.train_text_encoder, or data.shuffle_caption: captions encoded at every step)
    text encoders that only fill the cache   the checkpoint's dtype             the same (embeddings fp32), fp32 compute
    VAE (fills the latent cache, samples)    fp32                               fp32 (kohya's --no_half_vae)

`precision=fp32` reads everything in fp32. The caches are filled in fp32 whatever the precision (the VAE is fp32;
`compute_in_fp32` upcasts the text encoders' stored weights module by module), so every precision variant shares
their entries, and for an fp16 checkpoint the cached values are exactly those of fp32 weights. fp8 storage is cast
from the checkpoint's dtype (never through a narrower one), so it equals kohya's cast from fp32 bit for bit. The
U-Net is read straight into fp8 (SDXL's U-Net has no nn.Embedding, the one layer fp8 storage keeps wider); the text
encoders' embeddings stay in weight_dtype under fp8, so they are read in the checkpoint's dtype and cast after.
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

    checkpoint: each component's dtype on disk (`lora_sweep.model.loading.checkpoint_dtypes`; None if unknown).
    text_encoders_in_step: the text encoders run in the training step (trained, or encoding captions per step)
    rather than only filling the text cache. Text encoders stored in fp8 are read in the checkpoint's dtype and cast
    after their LoRA exists (apply_base_precision keeps their embeddings in weight_dtype, from the checkpoint's
    values); the U-Net, which has no embedding layer, is read straight into fp8.
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
    """While PEFT injects a LoRA into `module`, make it create (and initialise) the adapter tensors in fp32.

    PEFT moves each new adapter to its base layer's device *and dtype* (peft's tuners_utils
    `_move_adapter_to_device_of_base_layer`), so a LoRA added to fp16/bf16/fp8 base weights would start from
    rounded values (or live in fp8). kohya creates its LoRA modules in fp32 whatever the base dtype. Inside this
    context every floating `weight` narrower than fp32 is presented as an fp32 stand-in of the same shape and device
    (one element expanded: no memory), and the stored weight is put back on exit with the stand-in's requires_grad
    (add_lora freezes the base), so the adapters get the fp32 values they would get on an fp32 base, drawn from the
    same random stream.
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

    Each submodule holding fp16/bf16 tensors gets the forward hooks of `apply_base_precision`'s fp8 path (an fp32
    copy in place of the stored tensor during its forward, the stored one back afterwards). nn.Embedding tables are
    stored in fp32 instead (an exact upcast, 0.2 GB for SDXL's two encoders, so no table is copied per forward);
    being the encoders' first parameters, they also make `module.dtype` fp32, so diffusers' pipeline keeps
    sampling with fp32 prompt embeddings and latents, as with fp32 encoders. The outputs equal those of fp32
    weights holding the same values: bit for bit when the checkpoint is fp16. For the text encoders that fill the
    shared text cache (its entries are fp32 computations for every precision).
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
