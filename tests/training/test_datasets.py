"""kohya datasets end to end (docs/datasets.md): subsets and reg folders scanned, reg images balanced as v0.8.7,
batches that never mix datasets, prior_loss_weight per sample, network_multiplier, and real tiny trainings through
data.datasets and a dataset config TOML."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import RecordingSink, compose_config, write_image

from lora_sweep.checks import preflight
from lora_sweep.data.order import kohya_epoch_batches
from lora_sweep.training import loss as loss_lib
from lora_sweep.training import session as session_lib
from lora_sweep.training import train as train_lib


def test_several_datasets_never_share_a_batch():
    buckets = [(64, 64)] * 5 + [(32, 128)] * 3
    datasets = [0] * 5 + [1] * 3
    batches = kohya_epoch_batches(buckets, datasets, [2, 3], seed=7, epoch=1, workers=0)
    assert all(len({datasets[i] for i in batch}) == 1 for batch in batches)
    assert sorted(len(b) for b in batches) == [1, 2, 2, 3] and sorted(i for b in batches for i in b) == list(range(8))
    assert session_lib.batches_per_epoch(buckets, [2, 3], datasets) == 4


def test_prior_loss_weights_only_where_a_reg_image_is():
    assert loss_lib.prior_loss_weights([False, False], 0.5) is None  # nothing multiplied: numbers unchanged
    assert loss_lib.prior_loss_weights([True, False], 0.5).tolist() == [0.5, 1.0]


def test_network_multiplier_scales_every_lora_layer():
    from peft import LoraConfig, inject_adapter_in_model

    from lora_sweep.model.network import set_lora_multiplier

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, target_modules=["0"], init_lora_weights=False),
                                    model)
    x = torch.randn(3, 4)
    with torch.no_grad():
        full = model(x)
        set_lora_multiplier([model], 0.5)
        half = model(x)
        set_lora_multiplier([model], 0.0)
        base = model(x)
    torch.testing.assert_close(half - base, (full - base) * 0.5)


def test_evaluation_runs_at_multiplier_one_whatever_dataset_trained_last():
    """A dataset's network_multiplier scales its batches; the evaluation hooks then see the LoRA at 1.0, so a loss
    measured does not depend on which dataset's batch came last."""
    from types import SimpleNamespace

    from peft import LoraConfig, inject_adapter_in_model

    from lora_sweep.data.subsets import DatasetSpec

    torch.manual_seed(0)
    model = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=1, target_modules=["0"], init_lora_weights=False),
                                    torch.nn.Sequential(torch.nn.Linear(4, 4)))
    x = torch.randn(3, 4)
    spec = DatasetSpec("data.datasets[0]", (64, 64), 1, True, 32, False, None, None, network_multiplier=0.5)
    s = SimpleNamespace(prepared=SimpleNamespace(specs=[spec]), multiplier=1.0, should_stop=lambda: False,
                        parts=SimpleNamespace(unet=model, text_encoder=torch.nn.Identity(),
                                              text_encoder_2=torch.nn.Identity()))
    s.set_multiplier = lambda dataset: session_lib.Session.set_multiplier(s, dataset)
    seen = []
    s.hooks = [lambda session, step, final: seen.append(model(x).detach())]
    with torch.no_grad():
        full = model(x)
        s.set_multiplier(0)
        half = model(x)
        assert session_lib.Session.after_step(s, 1)
    assert not torch.equal(half, full) and torch.equal(seen[0], full) and s.multiplier == 1.0

def _tiny(tmp_path: Path, *overrides: str) -> RecordingSink:
    """Four optimizer steps of batch size 1 on a train image and a reg image of one dataset (data.datasets)."""
    write_image(tmp_path / "train" / "a.png", caption="a red square", color=(200, 30, 30))
    write_image(tmp_path / "reg" / "b.png", caption="a square", color=(30, 30, 200))
    subsets = (f"{{image_dir:'{tmp_path / 'train'}',num_repeats:1}},"
               f"{{image_dir:'{tmp_path / 'reg'}',num_repeats:1,is_reg:true}}")
    cfg = compose_config("data=folder", "data.dir=null", f"data.datasets=[{{batch_size:1,subsets:[{subsets}]}}]",
                         "train.max_steps=4", "train.device=cpu", "validation.fit_images=0",
                         f"data.cache_dir={tmp_path.parent / 'cache'}", *overrides)
    sink = RecordingSink()
    train_lib.train(cfg, output_dir=tmp_path / "out", sink=sink)
    return sink


def test_reg_batch_loss_is_weighted_by_prior_loss_weight_and_every_n_drops_every_caption(tmp_path, monkeypatch):
    """The same batches (a train image, a reg image) with prior_loss_weight 1.0 and 0.5: up to and including the
    first reg batch the losses are equal or exactly halved. caption_dropout_every_n_epochs=1 drops every caption (an
    epoch's first batch sees epoch 0 or the last one, both divisible by 1)."""
    captions = []
    real = session_lib.encode_prompts
    monkeypatch.setattr(session_lib, "encode_prompts", lambda parts, texts, **kw: captions.extend(texts) or real(
        parts, texts, **kw))
    dropout = "data.caption_dropout_every_n_epochs=1"
    full = _tiny(tmp_path / "full", dropout, "loss.prior_loss_weight=1.0")
    assert captions == [""] * 4
    half = _tiny(tmp_path / "half", dropout, "loss.prior_loss_weight=0.5")
    losses = [(full.logged[f"train/loss@{k}"], half.logged[f"train/loss@{k}"]) for k in (1, 2, 3, 4)]
    assert losses[0][0] > 0
    # v0.8.7's order may serve the train image twice before the reg one (its mid-epoch reshuffle: docs/kohya-exact.md)
    first_reg = next(k for k, (f, h) in enumerate(losses) if h != f)
    assert losses[first_reg][1] == losses[first_reg][0] * 0.5
    params = full.logged_params
    assert (params["data.train_images"], params["data.reg_images"], params["data.reg_entries"]) == (1, 1, 1)
    assert ("datasets.json", "data") in [(name, where) for name, where, _ in full.artifacts]


def test_dataset_config_toml_trains_with_balanced_reg_and_its_subsets(tmp_path, monkeypatch):
    """The kohya dataset config fixture: 30 train entries; its 3 reg images (1 repeat) balanced round-robin to
    10 each; captions processed per step (shuffle_caption in [general])."""
    from kohya_dataset import write_kohya_dataset

    toml = write_kohya_dataset(tmp_path / "ds")
    monkeypatch.chdir(tmp_path / "ds")
    cfg = compose_config("data=folder", "data.dir=null", f"data.dataset_config={toml}", "train.max_steps=1",
                         "train.device=cpu", "validation.fit_images=0", f"data.cache_dir={tmp_path / 'cache'}")
    specs, scans = preflight.training_scans(cfg, None)
    assert [[i.repeats for i in s.items] for s in scans] == [[10, 10], [5, 5], [10, 10, 10]]
    # shuffle_caption is set in [general]: the reason names the subset that trains with it, at that subset's line
    assert session_lib.text_in_step_reason(cfg, specs).startswith("shuffle_caption=true for the subset at ")
    assert session_lib.text_in_step_reason(cfg, specs).endswith("kohya_dataset.toml' line 20")
    sink = RecordingSink()
    result = train_lib.train(cfg, output_dir=tmp_path / "out", sink=sink, specs=specs, scans=scans)
    assert result.steps == 1
    assert (sink.logged_params["data.train_images"], sink.logged_params["data.reg_entries"]) == (30, 30)
    # the params say what trained, not the data.* fallbacks the file overrides (data.shuffle_caption is false)
    assert cfg.data.shuffle_caption is False
    assert sink.logged_params["data.datasets.0.subsets.0.shuffle_caption"] is True
    assert [sink.logged_params[f"data.datasets.0.subsets.{j}.caption_dropout_rate"] for j in range(3)] == [
        0.1, 0.0, 0.1]


@pytest.mark.parametrize("key", ["data.shuffle_caption=true", "data.caption_dropout_rate=0.1"])
def test_the_log_names_the_setting_that_encodes_captions_per_step(key):
    cfg = compose_config(key)
    assert session_lib.text_in_step_reason(cfg) == key
    assert session_lib.text_in_step_reason(compose_config()) is None


def test_a_job_on_subsets_records_them_and_skip_finished_covers_every_subset(tmp_path, mlflow_uri):
    """run_job on data.datasets (a train subset and a reg subset): MLflow params and data/datasets.json; the same
    job again is SKIPPED; an edited reg caption changes the dataset fingerprint."""
    from mlflow.tracking import MlflowClient

    from lora_sweep.job.finished import dataset_of
    from lora_sweep.job.run import run_job

    write_image(tmp_path / "train" / "a.png", caption="a red square", color=(200, 30, 30))
    write_image(tmp_path / "reg" / "b.png", caption="a square", color=(30, 30, 200))
    write_image(tmp_path / "unused" / "c.png", caption="a square", color=(30, 200, 30))
    # a subset with 0 repeats is left out with one warning (as kohya), and the job trains on
    subsets = (f"{{image_dir:'{tmp_path / 'train'}',num_repeats:2}},"
               f"{{image_dir:'{tmp_path / 'reg'}',num_repeats:1,is_reg:true}},"
               f"{{image_dir:'{tmp_path / 'unused'}',num_repeats:0}}")
    args = ("data=folder", "data.dir=null", f"data.datasets=[{{subsets:[{subsets}]}}]", "train.max_steps=1",
            "train.device=cpu", "validation.fit_images=0", f"train.state_dir={tmp_path / 'states'}")
    first = run_job(compose_config(*args), output_dir=tmp_path / "out1")
    assert first.status == "FINISHED"
    client = MlflowClient(mlflow_uri)
    params = client.get_run(first.run_id).data.params
    assert (params["data.train_images"], params["data.reg_images"], params["data.reg_entries"]) == ("2", "1", "2")
    assert params["data.warnings"] == "1"
    assert (params["data.datasets.0.subsets.0.num_repeats"], params["data.datasets.0.subsets.1.is_reg"]) == (
        "2", "True")
    assert "data/datasets.json" in {a.path for a in client.list_artifacts(first.run_id, "data")}
    again = run_job(compose_config(*args), output_dir=tmp_path / "out2")
    assert again.status == "SKIPPED" and again.run_id == first.run_id
    cfg = compose_config(*args)
    before = dataset_of(cfg, preflight.training_scans(cfg, None)[1])
    (tmp_path / "reg" / "b.txt").write_text("a blue square", encoding="utf-8")
    assert dataset_of(cfg, preflight.training_scans(cfg, None)[1]).digest != before.digest
