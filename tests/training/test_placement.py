"""The placement rule on the tiny SDXL saved in fp16 (as SDXL's released weights are): every component is read in its
checkpoint's dtype or in the dtype it is stored in, cast on the CPU, and only then placed; fp8/fp16 training gives
the same numbers as reading everything in fp32 did; LoRA tensors start from their fp32 values on any base dtype."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import RecordingSink, compose_config
from torch.overrides import TorchFunctionMode

from lora_sweep.model import loading
from lora_sweep.training import placement, precision
from lora_sweep.training import session as session_lib

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def fp16_model(tmp_path_factory) -> Path:
    """The tiny SDXL as an fp16 diffusers folder (the tiny recipe's own folder is fp32)."""
    from lora_sweep.model.tiny_sdxl import build_tiny_sdxl, save_tiny_sdxl

    folder = tmp_path_factory.mktemp("tiny-fp16") / "model"
    save_tiny_sdxl(build_tiny_sdxl(0).to(torch.float16), folder)
    return folder


class PlacementRecorder(TorchFunctionMode):
    """Records the dtype every parameter has when `.to(<training device>)` is called on it (module.to included),
    outside the loader (which reads onto the CPU, the training device of these tests, in its own way)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device, self.loading = device, False
        self.placed: dict[int, set[torch.dtype]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if func is torch.Tensor.to and not self.loading and isinstance(args[0], torch.nn.Parameter):
            device = torch._C._nn._parse_to(*args[1:], **kwargs)[0]
            if device is not None and device.type == self.device.type:
                self.placed.setdefault(id(args[0]), set()).add(result.dtype)
        return result


def build_recorded(fp16_model: Path, tmp_path: Path, monkeypatch, *overrides: str):
    """build_session on the fp16 tiny model, recording the dtypes each component is read in and placed in."""
    cfg = compose_config(f"model.path={fp16_model}", "train.max_steps=2", *overrides)
    recorder = PlacementRecorder(torch.device("cpu"))
    read: dict[str, set[torch.dtype]] = {}
    load_sdxl = loading.load_sdxl

    def recorded_load(*args, **kwargs):
        recorder.loading = True
        try:
            parts = load_sdxl(*args, **kwargs)
        finally:
            recorder.loading = False
        for name in COMPONENTS:
            read[name] = {p.dtype for p in getattr(parts, name).parameters()}
        return parts

    monkeypatch.setattr(loading, "load_sdxl", recorded_load)
    with recorder:
        s = session_lib.build_session(cfg, output_dir=tmp_path / "out", sink=RecordingSink())
    return s, read, recorder.placed


def _base(module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("name,train_te", [("fp32", False), ("fp16", False), ("bf16", False), ("fp8", False),
                                           ("fp8_bf16", True), ("fp16", True)])
def test_no_parameter_reaches_the_device_wider_than_it_is_stored(fp16_model, tmp_path, monkeypatch, name, train_te):
    s, read, placed = build_recorded(fp16_model, tmp_path, monkeypatch, f"precision={name}",
                                     f"network.train_text_encoder={str(train_te).lower()}")
    policy = precision.PRECISIONS[name]
    parts = s.parts
    # Read: never fp32 from this fp16 checkpoint unless fp32 is what is used (precision=fp32, the VAE's encode).
    assert read["unet"] == {policy.weight_dtype}  # fp8 too: streamed from the fp16 file straight into fp8
    assert read["vae"] == {torch.float32}
    te_in_step = torch.float16 if policy.fp8_base else policy.weight_dtype  # fp8: cast after, embeddings kept
    te_read = (te_in_step if train_te else torch.float16) if name != "fp32" else torch.float32
    assert read["text_encoder"] == read["text_encoder_2"] == {te_read}
    # Placed: every tensor of every component that was placed, in the dtype it is stored in, never wider.
    for component in COMPONENTS:
        module = getattr(parts, component)
        for param_name, param in module.named_parameters():
            assert id(param) in placed, f"{component}.{param_name} never placed on the training device"
            assert placed[id(param)] == {param.dtype}, (component, param_name, placed[id(param)], param.dtype)
    unet_base = {p.dtype for p in _base(parts.unet).values()}
    assert unet_base == {policy.weight_dtype}
    assert {p.dtype for n, p in parts.unet.named_parameters() if "lora_" in n} == {torch.float32}
    assert {p.dtype for p in parts.vae.parameters()} == {torch.float32}
    for encoder in (parts.text_encoder, parts.text_encoder_2):
        stored: dict[str, set[torch.dtype]] = {}  # base tensors' dtypes by module type
        for module_name, module in encoder.named_modules():
            if "lora_" not in module_name:
                stored.setdefault(type(module).__name__, set()).update(
                    p.dtype for p in module.parameters(recurse=False))
        stored = {kind: dtypes for kind, dtypes in stored.items() if dtypes}
        if train_te and name != "fp32":  # kohya: te_weight_dtype, embeddings in weight_dtype under fp8
            assert stored["Linear"] == {policy.weight_dtype} and stored["Embedding"] == {policy.latent_dtype}
            assert {p.dtype for n, p in encoder.named_parameters() if "lora_" in n} == {torch.float32}
        else:  # only fills the text cache: the checkpoint's dtype (embedding tables fp32), computing in fp32
            assert {d for kind, dtypes in stored.items() if kind != "Embedding" for d in dtypes} == {te_read}
            assert stored["Embedding"] == {torch.float32} and encoder.dtype == torch.float32


def _train(cfg_overrides, tmp_path: Path, fp16_model: Path):
    from lora_sweep.training.train import train

    cfg = compose_config(f"model.path={fp16_model}", "train.max_steps=2", "train.batch_size=2", *cfg_overrides)
    sink = RecordingSink()
    result = train(cfg, output_dir=tmp_path, sink=sink)
    from safetensors.torch import load_file

    samples = {k: v for k, v in sink.logged.items() if k.startswith("img/")}
    return result.final_loss, load_file(str(result.files["kohya"])), samples


@pytest.mark.parametrize("name", ["fp8", "fp16"])
def test_fp8_and_fp16_results_are_those_of_reading_everything_in_fp32(fp16_model, tmp_path, monkeypatch, name):
    """The old path read every component in fp32 and cast afterwards; fp8/fp16 storage of fp16 weights is exact, so
    reading in the storage dtype must give the very same losses and LoRA, bit for bit."""
    overrides = (f"precision={name}", "data.flip_aug=false", "sampling.prompts=[a photo]", "sampling.steps=2")
    loss, lora, samples = _train(overrides, tmp_path / "new", fp16_model)
    monkeypatch.setattr(placement, "load_dtypes",
                        lambda *args, **kwargs: dict.fromkeys(COMPONENTS, torch.float32))
    old_loss, old_lora, old_samples = _train(overrides, tmp_path / "old", fp16_model)
    assert loss == old_loss
    assert samples == old_samples and len(samples) > 0  # the sample images' statistics too (step 0 and the end)
    assert lora.keys() == old_lora.keys() and len(lora) > 0
    for key, value in lora.items():
        assert torch.equal(value, old_lora[key]), key


def test_adapters_start_from_their_fp32_values_on_any_base_dtype():
    from lora_sweep.model.network import UNET_TARGETS, add_lora
    from lora_sweep.model.tiny_sdxl import build_tiny_sdxl

    reference = build_tiny_sdxl(0).unet
    torch.manual_seed(3)
    add_lora(reference, rank=4, alpha=4.0, targets=UNET_TARGETS)
    expected = {n: p for n, p in reference.named_parameters() if "lora_" in n}
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn):
        unet = build_tiny_sdxl(0).unet.to(dtype)
        torch.manual_seed(3)
        with placement.adapters_in_fp32(unet):
            add_lora(unet, rank=4, alpha=4.0, targets=UNET_TARGETS)
        lora = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        assert lora.keys() == expected.keys()
        assert all(torch.equal(p, expected[n]) for n, p in lora.items()), dtype  # fp32, same draws
        assert {p.dtype for p in _base(unet).values()} == {dtype}  # the stored weights are back, frozen
        assert not any(p.requires_grad for p in _base(unet).values())
        assert all(p.data_ptr() != 0 and p.stride() != (0, 0) for p in _base(unet).values() if p.dim() == 2)


def test_text_encoders_filling_the_cache_compute_exactly_in_fp32():
    from lora_sweep.model.tiny_sdxl import build_tiny_sdxl

    encoder = build_tiny_sdxl(0).text_encoder_2.to(torch.float16)
    reference = copy.deepcopy(encoder).to(torch.float32)  # fp32 weights holding the same (fp16) values
    assert placement.compute_in_fp32(encoder) > 0
    ids = torch.randint(0, 300, (2, 77), generator=torch.Generator().manual_seed(0))
    ours, theirs = encoder(ids, output_hidden_states=True), reference(ids, output_hidden_states=True)
    assert ours.text_embeds.dtype == torch.float32
    assert torch.equal(ours.text_embeds, theirs.text_embeds)
    assert torch.equal(ours.hidden_states[-2], theirs.hidden_states[-2])
    stored = {n: p.dtype for n, p in encoder.named_parameters()}  # unchanged outside the forward, but embeddings
    assert {d for n, d in stored.items() if "embedding" not in n} == {torch.float16}
    assert {d for n, d in stored.items() if "embedding" in n} == {torch.float32} == {encoder.dtype}


def test_load_dtypes_table():
    fp16_disk = dict.fromkeys(COMPONENTS, torch.float16)
    plan = lambda name, in_step, disk=fp16_disk: placement.load_dtypes(  # noqa: E731
        precision.PRECISIONS[name], disk, text_encoders_in_step=in_step)
    assert plan("fp32", False) == dict.fromkeys(COMPONENTS, torch.float32)
    assert plan("bf16", False) == {"unet": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.float16,
                                   "text_encoder_2": torch.float16}
    assert plan("bf16", True)["text_encoder"] == torch.bfloat16
    assert plan("fp8", True) == {"unet": torch.float8_e4m3fn, "vae": torch.float32, "text_encoder": torch.float16,
                                 "text_encoder_2": torch.float16}  # encoders: cast to fp8 after their LoRA exists
    fp32_disk = dict.fromkeys(COMPONENTS, torch.float32)
    assert plan("fp8_bf16", True, fp32_disk)["text_encoder"] == torch.float32  # from the checkpoint's own values
    unknown = dict.fromkeys(COMPONENTS, None)
    assert plan("fp16", False, unknown)["text_encoder"] == torch.float32


def test_checkpoint_dtypes_read_headers_of_folders_and_single_files(fp16_model, tmp_path):
    from sgm_checkpoint import save_single_file

    from lora_sweep.model.tiny_sdxl import build_tiny_sdxl

    assert loading.checkpoint_dtypes(fp16_model) == dict.fromkeys(COMPONENTS, torch.float16)
    single = tmp_path / "tiny.safetensors"
    save_single_file(build_tiny_sdxl(0).to(torch.bfloat16), single)
    assert loading.checkpoint_dtypes(single) == dict.fromkeys(COMPONENTS, torch.bfloat16)
    (tmp_path / "bin" / "unet").mkdir(parents=True)
    (tmp_path / "bin" / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"")
    assert loading.checkpoint_dtypes(tmp_path / "bin")["unet"] is None  # unknown: read in fp32, as before
