"""How the U-Net computes: its attention backend (kohya's --sdpa / --xformers / --mem_eff_attn) and torch.compile
(--torch_compile, --dynamo_backend), as diffusers provides them; docs/kohya-reference.md "Attention and
torch.compile".

    setting (precedence as v0.8.7)   diffusers processor            v0.8.7's SDXL U-Net
    mem_eff_attn                     SlicedAttnProcessor ("auto")   its own chunked attention in plain PyTorch
    xformers                         XFormersAttnProcessor          xformers.ops.memory_efficient_attention
    sdpa                             AttnProcessor2_0               F.scaled_dot_product_attention
    none set                         AttnProcessor                  baddbmm + softmax + bmm (the same product)

None set gives diffusers' classic processor, v0.8.7's product, not diffusers' default SDPA: the outputs would differ
by rounding (8e-7 on the tiny U-Net), which Adam carries into the LoRA (docs/kohya-exact.md).
"""

from __future__ import annotations

import importlib.util

import torch

ATTENTION_SWITCHES = ("mem_eff_attn", "xformers", "sdpa")  # v0.8.7's precedence, first wins
# v0.8.7's --dynamo_backend choices; torch.compile takes those of them this torch has
DYNAMO_BACKENDS = ("eager", "aot_eager", "inductor", "aot_ts_nvfuser", "nvprims_nvfuser", "cudagraphs", "ofi",
                   "fx2trt", "onnxrt")


def attention_backend(*, sdpa: bool, xformers: bool, mem_eff_attn: bool) -> str | None:
    """The switch that wins by v0.8.7's precedence (`replace_unet_modules`), or None when none is set."""
    chosen = {"mem_eff_attn": mem_eff_attn, "xformers": xformers, "sdpa": sdpa}
    return next((name for name in ATTENTION_SWITCHES if chosen[name]), None)


def xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def set_attention_backend(unet: torch.nn.Module, backend: str | None) -> None:
    """Give every attention layer of `unet` the processor of `backend` (the module docstring's table; None: the
    classic product). LoRA on to_q/k/v/out is untouched: the processors call those Linear layers."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend is None:
        unet.set_attn_processor(AttnProcessor())
    elif backend == "sdpa":
        unet.set_attn_processor(AttnProcessor2_0())
    elif backend == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    elif backend == "mem_eff_attn":
        unet.set_attention_slice("auto")  # half the heads at a time: the classic product in slices
    else:
        raise ValueError(f"set_attention_backend: unknown backend {backend!r}; one of {ATTENTION_SWITCHES} or None")


def dynamo_backend_problem(backend: str, *, compiling: bool = True) -> str | None:
    """Why `backend` is refused (not one of v0.8.7's choices; when `compiling`, also not in this torch), or None."""
    if backend not in DYNAMO_BACKENDS:
        return (f"train.dynamo_backend = {backend!r} is not one of kohya v0.8.7's --dynamo_backend choices: "
                f"{', '.join(DYNAMO_BACKENDS)} (default inductor).")
    if not compiling:
        return None
    import torch._dynamo

    present = set(torch._dynamo.list_backends(exclude_tags=()))
    if backend not in present:
        usable = ", ".join(b for b in DYNAMO_BACKENDS if b in present)
        return (f"train.dynamo_backend = {backend!r} is not a torch.compile backend of torch {torch.__version__} "
                f"on this machine; of kohya's choices it has: {usable}.")
    return None


def compile_unet(unet: torch.nn.Module, backend: str) -> None:
    """Compile `unet`'s forward in place (`nn.Module.compile`), after LoRA is attached: the PEFT layers are traced
    into the graph and the module keeps its names, so saving and states see the same tensors."""
    unet.compile(backend=backend)
