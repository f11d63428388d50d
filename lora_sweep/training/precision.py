"""Precision policies: the dtype frozen base weights are stored in, the dtype ops run in, fp16 loss scaling.

kohya v0.8.7 (docs/kohya-reference.md §4): `fp16` / `bf16` = --mixed_precision: base weights cast, LoRA fp32,
forward under autocast; fp16 adds a GradScaler whose overflowing steps are skipped (no optimizer or LR step).
`fp8` / `fp8_bf16` = --fp8_base with fp16 / bf16: base weights stored as float8_e4m3fn (plain cast), LoRA fp32.

One recipe on every device, so the CPU tests cover the GPU's path: fp16/bf16 Linear/Conv weights are used as
stored (autocast); fp8 weights, and norm weights stored narrower (in fp32: CPU autocast does not upcast norms),
are swapped for an upcast copy during their module's forward (a new tensor, never `.data`, which breaks
backward); e4m3fn values are exact in fp16/bf16, so the numbers equal kohya's. nn.Embedding under fp8 is stored
in the latent dtype (no fp8 kernel; kohya keeps embeddings out of fp8 too).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from lora_sweep.errors import ConfigError

LORA_MARKER = "lora_"  # PEFT names every adapter tensor lora_A/lora_B/lora_magnitude_vector...


@dataclass(frozen=True)
class PrecisionPolicy:
    """One precision option.

    weight_dtype: storage dtype of the frozen base weights. compute_dtype: autocast dtype (None: fp32, no autocast).
    latent_dtype: kohya's `weight_dtype` (latents, noise, U-Net input). mixed_precision: kohya's flag, for metadata.
    """

    name: str
    weight_dtype: torch.dtype
    compute_dtype: torch.dtype | None
    fp8_base: bool
    needs_grad_scaler: bool
    latent_dtype: torch.dtype
    mixed_precision: str


PRECISIONS: dict[str, PrecisionPolicy] = {
    "fp32": PrecisionPolicy("fp32", torch.float32, None, False, False, torch.float32, "no"),
    "fp16": PrecisionPolicy("fp16", torch.float16, torch.float16, False, True, torch.float16, "fp16"),
    "bf16": PrecisionPolicy("bf16", torch.bfloat16, torch.bfloat16, False, False, torch.bfloat16, "bf16"),
    "fp8": PrecisionPolicy("fp8", torch.float8_e4m3fn, torch.float16, True, True, torch.float16, "fp16"),
    "fp8_bf16": PrecisionPolicy("fp8_bf16", torch.float8_e4m3fn, torch.bfloat16, True, False, torch.bfloat16, "bf16"),
}
# kohya's two flags for each option, and back: the one precision table the metadata, the import and the export use
PRECISION_TO_KOHYA = {name: (policy.mixed_precision, policy.fp8_base) for name, policy in PRECISIONS.items()}
KOHYA_TO_PRECISION = {flags: name for name, flags in PRECISION_TO_KOHYA.items()}


def _device_kind(device: str | torch.device) -> str:
    """"cuda:1" -> "cuda": autocast and GradScaler take the device type."""
    return torch.device(device).type


def _device_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    backend = getattr(torch, device_type, None)
    if device_type == "mps":
        return torch.backends.mps.is_available()
    return bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())


def _autocast_supports(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch enables autocast to `dtype` on the device (it disables it with a warning otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return bool(torch.autocast(device_type, dtype=dtype)._enabled)
        except RuntimeError:
            return False


def _fp8_casts_on(device_type: str, compute_dtype: torch.dtype) -> bool:
    try:
        probe = torch.ones(4, dtype=compute_dtype, device=device_type)
        return bool(torch.equal(probe.to(torch.float8_e4m3fn).to(compute_dtype), probe))
    except (RuntimeError, TypeError):
        return False


def precision_policy(name: str, device_type: str) -> PrecisionPolicy:
    """The policy for `precision=<name>` on `device_type`; raises ConfigError.

    Device checks run only where that device is present, so a config validates on a machine without its GPU.
    """
    policy = PRECISIONS.get(name)
    if policy is None:
        raise ConfigError(f"precision={name!r} is not a precision option; choose one of {sorted(PRECISIONS)}.")
    check_policy_supported(policy, device_type)
    return policy


def check_policy_supported(policy: PrecisionPolicy, device_type: str) -> None:
    """Raise ConfigError if `device_type` (when present here) cannot autocast to the compute dtype or cast fp8."""
    device_type = _device_kind(device_type)
    if policy.compute_dtype is None or not _device_available(device_type):
        return
    compute = str(policy.compute_dtype).removeprefix("torch.")
    if policy.fp8_base and not _autocast_supports(device_type, policy.compute_dtype):
        raise ConfigError(
            f"precision={policy.name!r} stores base weights in fp8, which needs a compute dtype to upcast to, but "
            f"autocast on device {device_type!r} does not support {compute}; use precision=fp8 (fp16 compute) or "
            f"fp8_bf16 (bf16 compute, GPUs with bf16 such as Ampere or newer)."
        )
    if not _autocast_supports(device_type, policy.compute_dtype):
        raise ConfigError(
            f"precision={policy.name!r} computes in {compute}, which autocast does not support on device "
            f"{device_type!r}; choose one of {sorted(set(PRECISIONS) - {policy.name})} (bf16 needs a GPU with bf16)."
        )
    if policy.fp8_base and not _fp8_casts_on(device_type, policy.compute_dtype):
        raise ConfigError(
            f"precision={policy.name!r} stores base weights as float8_e4m3fn, which device {device_type!r} with "
            f"torch {torch.__version__} cannot cast to {compute}; use precision=fp16 or bf16 there."
        )


class _UpcastDuringForward:
    """Forward hooks that swap a module's stored low-precision tensors for upcast copies, then back."""

    def __init__(self, tensor_names: list[str], dtype: torch.dtype) -> None:
        self.tensor_names = tensor_names
        self.dtype = dtype
        self._stored: list[dict[str, torch.Tensor]] = []  # a stack: survives a module re-entered during forward

    def _table(self, module: torch.nn.Module, name: str) -> dict:
        return module._parameters if name in module._parameters else module._buffers

    def swap_in(self, module: torch.nn.Module, args: tuple) -> None:
        stored = {}
        for name in self.tensor_names:
            table = self._table(module, name)
            stored[name] = table[name]
            table[name] = copy = stored[name].to(self.dtype)
            if copy is not stored[name] and copy.numel() > 0:
                _UPCAST_COPIES[copy.untyped_storage().data_ptr()] = (copy, stored[name])
        self._stored.append(stored)

    def swap_back(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        if not self._stored:
            return
        for name, tensor in self._stored.pop().items():
            table = self._table(module, name)
            if table[name] is not tensor:
                _UPCAST_COPIES.pop(table[name].untyped_storage().data_ptr(), None)
            table[name] = tensor


# Upcast copies alive during their module's forward, by storage address: -> (copy, stored tensor it came from).
_UPCAST_COPIES: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


@dataclass(frozen=True)
class _Recast:
    """What autograd keeps instead of an upcast copy (or a view of one): the stored tensor, dtype and view geometry."""

    stored: torch.Tensor
    dtype: torch.dtype
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _save_stored(tensor: torch.Tensor) -> object:
    """saved_tensors_hooks pack: keep the stored tensor, not the upcast copy (or its view) an op saves."""
    try:
        entry = _UPCAST_COPIES.get(tensor.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage
        return tensor
    if entry is None or entry[0].dtype != tensor.dtype or entry[0].untyped_storage().nbytes() != \
            tensor.untyped_storage().nbytes():
        return tensor
    return _Recast(entry[1], tensor.dtype, tuple(tensor.size()), tuple(tensor.stride()), tensor.storage_offset())


def _recast_saved(saved: object) -> torch.Tensor:
    """saved_tensors_hooks unpack: cast the stored tensor again (deterministic) and take the same view."""
    if not isinstance(saved, _Recast):
        return saved
    return saved.stored.to(saved.dtype).as_strided(saved.size, saved.stride, saved.offset)


def _is_norm(module: torch.nn.Module) -> bool:
    """GroupNorm, LayerNorm, RMSNorm and diffusers' *Norm (not BatchNorm: a swapped copy would lose running stats)."""
    torch_norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.RMSNorm)
    return isinstance(module, torch_norms) or type(module).__name__.endswith("Norm")


def _frozen_base_tensor_names(module_name: str, module: torch.nn.Module) -> list[str]:
    """Direct floating params/buffers of `module` that are neither LoRA nor trainable."""
    names = []
    for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
        full_name = f"{module_name}.{name}" if module_name else name
        if tensor is None or not tensor.is_floating_point() or LORA_MARKER in full_name:
            continue
        if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
            continue
        names.append(name)
    return names


def apply_base_precision(module: torch.nn.Module, policy: PrecisionPolicy) -> None:
    """Store `module`'s frozen base weights in `policy.weight_dtype`; LoRA and trainable params stay as they are.

    Call it once, after the LoRA exists and the base is frozen; a later `module.to(dtype)` would undo it.
    """
    if getattr(module, "_lora_sweep_precision", None) is not None:
        raise RuntimeError(f"apply_base_precision already ran on this module ({module._lora_sweep_precision}).")
    module._lora_sweep_precision = policy.name
    if policy.weight_dtype == torch.float32:
        return
    for module_name, submodule in module.named_modules():
        names = _frozen_base_tensor_names(module_name, submodule)
        if not names:
            continue
        storage_dtype, upcast_dtype = policy.weight_dtype, None
        if isinstance(submodule, torch.nn.Embedding):
            storage_dtype = policy.latent_dtype
        elif _is_norm(submodule):
            upcast_dtype = torch.float32
        elif policy.fp8_base:
            upcast_dtype = policy.compute_dtype
        for name in names:
            table = submodule._parameters if name in submodule._parameters else submodule._buffers
            if isinstance(table[name], torch.nn.Parameter):
                table[name].data = table[name].data.to(storage_dtype)  # at rest, outside any graph: safe
            else:
                table[name] = table[name].to(storage_dtype)
        if upcast_dtype is not None:
            hooks = _UpcastDuringForward(names, upcast_dtype)
            submodule.register_forward_pre_hook(hooks.swap_in)
            submodule.register_forward_hook(hooks.swap_back, always_call=True)


@contextlib.contextmanager
def autocast(policy: PrecisionPolicy, device_type: str) -> Iterator[None]:
    """torch.autocast in the policy's compute dtype (no-op for fp32); under fp8, backward keeps the stored weights.

    Why: an op saving its fp16 upcast copy would keep the whole U-Net's copies alive until backward (4.8 GiB for
    SDXL); instead the fp8 tensor is saved and cast again (bit-identical gradients, one more cast per op).
    """
    if policy.compute_dtype is None:
        yield
        return
    with torch.autocast(_device_kind(device_type), dtype=policy.compute_dtype), (
            torch.autograd.graph.saved_tensors_hooks(_save_stored, _recast_saved) if policy.fp8_base
            else contextlib.nullcontext()):
        yield


class _Fp16GradScaler(torch.amp.GradScaler):
    """A GradScaler that unscales fp16 gradients too (torch refuses them), as v0.8.7 patches accelerate's scaler for
    --full_fp16 (`patch_accelerator_for_fp16_training`)."""

    def _unscale_grads_(self, optimizer, inv_scale, found_inf, allow_fp16):
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def make_grad_scaler(policy: PrecisionPolicy, device_type: str, full_fp16: bool = False) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaler (accelerate's defaults); disabled (no-op) for every other policy. `full_fp16`:
    the LoRA itself is fp16, so its fp16 gradients are unscaled too."""
    scaler = _Fp16GradScaler if full_fp16 else torch.amp.GradScaler
    return scaler(_device_kind(device_type), enabled=policy.needs_grad_scaler)


FULL_PRECISION = {"full_fp16": "fp16", "full_bf16": "bf16"}  # the mixed precision (kohya's flag) each one needs


def check_full_precision(name: str, full_fp16: bool, full_bf16: bool) -> None:
    """Raise ConfigError unless precision.full_fp16 / full_bf16 match precision `name`'s mixed precision (v0.8.7
    asserts it); both at once are refused (v0.8.7 would ignore full_bf16)."""
    if full_fp16 and full_bf16:
        raise ConfigError("precision.full_fp16 and precision.full_bf16 are both true: set one (kohya v0.8.7 would "
                          "silently ignore full_bf16).")
    policy = PRECISIONS.get(name)
    for field, wanted in FULL_PRECISION.items():
        on = full_fp16 if field == "full_fp16" else full_bf16
        if on and policy is not None and policy.mixed_precision != wanted:
            accepted = sorted(n for n, p in PRECISIONS.items() if p.mixed_precision == wanted)
            raise ConfigError(f"precision.{field} = true needs precision {' or '.join(accepted)} (kohya v0.8.7's "
                              f"--{field} requires --mixed_precision {wanted}), but precision is {name}.")


def grad_total_norm(params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The 2-norm of all gradients of `params` (0-dim fp32 tensor; None if none has one).

    The norm `clip_grad_norm_` clips with, computed once per step for the non-finite check and `clip_grads`.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def unscaled_grad_norm(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer,
                       params: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """`grad_total_norm` of the true gradients: fp16's scaler unscales first (once per update).

    Call it only when there are gradients.
    """
    scaler.unscale_(optimizer)
    return grad_total_norm(params)


def clip_grads(params: Iterable[torch.nn.Parameter], max_grad_norm: float, total_norm: torch.Tensor | None) -> None:
    """kohya's --max_grad_norm (0 = off): `clip_grad_norm_` bit for bit, reusing `total_norm`."""
    if max_grad_norm > 0 and total_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, total_norm)


def base_weight_bytes(module: torch.nn.Module) -> int:
    """Bytes held by non-LoRA params and floating buffers (`mem/base_weights_bytes`): what fp8 vs fp16 changes."""
    tensors = [t for n, t in module.named_parameters() if LORA_MARKER not in n]
    tensors += [t for n, t in module.named_buffers() if LORA_MARKER not in n and t.is_floating_point()]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_gpu_memory_bytes() -> int | None:
    """Peak bytes allocated by tensors on the current CUDA device since the last reset; None without CUDA."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return int(torch.cuda.max_memory_allocated())


def enable_gradient_checkpointing(unet: torch.nn.Module) -> None:
    """diffusers' non-reentrant checkpointing (frozen-base LoRA still gets grads); train mode, as kohya."""
    unet.enable_gradient_checkpointing()
    unet.train()
