"""Each variant's best checkpoint (compare.select / --select), from runs logged by hand through tracking's logger into
a real sqlite store: the best replicate mean and its interval, the earliest step on a tie, the last- and first-step
flags, :max, a variant that logged no value (and why), the LoRA file of each replicate at that step, and the one-knob
effects at the best steps. tests/compare/test_replicates.py checks a real run's link names the file its training
logged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import new_store

from lora_sweep.compare.best import BEST_AT_FIRST, STILL_IMPROVING
from lora_sweep.compare.report import build_report, main

STEPS = (0, 2, 4, 6)
FIT = {  # variant: (noise.offset, train.save_every, {seed: fit/loss at STEPS}); None: no fit/loss logged
    "xa": ("0", 2, {1: (1.0, 0.8, 0.6, 0.7), 2: (1.0, 0.82, 0.62, 0.66)}),  # best in the middle, step 4
    "xb": ("0.1", 4, {1: (1.0, 0.9, 0.8, 0.7), 2: (1.0, 0.92, 0.82, 0.72)}),  # still improving at step 6
    "xc": ("0.2", 2, {1: (1.0, 1.1, 1.2, 1.3), 2: (1.0, 1.2, 1.3, 1.4)}),  # best before training: step 0
    "xd": ("0.3", 3, {1: (1.0, 0.5, 0.5, 0.9), 2: (1.0, 0.5, 0.5, 0.9)}),  # a tie of steps 2 and 4: 2 wins
    "xe": ("0.4", 2, {1: None, 2: None}),  # validation.fit_images=0: no fit/loss (and no one-knob pair)
}


SAMPLED_UNTIL = 2  # img/diversity is logged at steps 0 and 2 only: read there at a later best step


def log_job(client, exp: str, parent: str, variant: str, seed: int, folder: Path) -> str:
    from lora_sweep.tracking.logger import RunLogger

    offset, every, fits = FIT[variant]
    logger = RunLogger.start(client, exp, name=variant, tags={
        "lora_sweep.role": "job", "variant": f"{variant} train.seed={seed}", "mlflow.parentRunId": parent})
    logger.log_params({"train.seed": seed, "noise.offset": offset, "train.save_every": every, "train.max_steps": 6,
                       "train.output_name": "lora", "validation.fit_images": 0 if fits[seed] is None else 2,
                       "compare.select": "fit/loss"})
    for index, step in enumerate(STEPS):
        sampled = {"img/diversity": 0.3 + 0.01 * seed} if step <= SAMPLED_UNTIL else {}
        logger.log_metrics({"train/loss": 0.5} | ({} if fits[seed] is None else {"fit/loss": fits[seed][index]})
                           | sampled, step)
        if step and step % every == 0:  # as training/checkpoint.py saves and logs them
            logger.log_artifact(lora_file(folder / f"{seed}", f"lora-step{step:08d}.safetensors"),
                                "lora/checkpoints")
    logger.log_artifact(lora_file(folder / f"{seed}", "lora.safetensors"), "lora")
    logger.end("FINISHED")
    return logger.run_id


def lora_file(folder: Path, name: str) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(folder / name))
    return folder / name


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from lora_sweep.tracking import store

    root = tmp_path_factory.mktemp("best")
    uri = new_store(root / "mlflow.db")
    client = store.client(uri)
    exp = client.create_experiment("best", artifact_location=(root / "mlruns").as_uri())
    parent = client.create_run(exp, run_name="sweep", tags={"lora_sweep.role": "sweep"}).info.run_id
    ids = {(v, s): log_job(client, exp, parent, v, s, root / "files" / v) for v in FIT for s in (1, 2)}
    summary_path = root / "summary.json"
    build_report(sweep_run_id=parent, out_dir=root / "report", tracking_uri=uri, json_path=summary_path)
    summary = json.loads(summary_path.read_text())
    return {"uri": uri, "parent": parent, "ids": ids, "root": root, "summary": summary,
            "best": {v["name"]: v["best"] for v in summary["variants"]}}


def test_the_recorded_select_picks_the_step_of_the_best_replicate_mean_with_its_interval(sweep):
    assert sweep["summary"]["select"] == {"metric": "fit/loss", "direction": "min"}
    xa = sweep["best"]["xa"]
    assert (xa["step"], xa["steps"], xa["flag"], xa["at_first"], xa["at_last"]) == (4, [0, 2, 4, 6], "", False, False)
    # mean of 0.6 and 0.62, t(0.975, 1) = 12.706 x the standard error 0.01
    assert xa["value"]["mean"] == pytest.approx(0.61)
    assert (xa["value"]["low"], xa["value"]["high"]) == pytest.approx((0.61 - 0.127062, 0.61 + 0.127062), abs=1e-6)
    assert xa["value"]["n"] == 2


def test_each_replicates_lora_file_of_the_best_step_is_linked(sweep):
    files = sweep["best"]["xa"]["files"]
    assert [(f["seed"], f["path"], f["missing"]) for f in files] == [
        (seed, "lora/checkpoints/lora-step00000004.safetensors", "") for seed in (1, 2)]
    for found in files:
        assert found["run_id"] == sweep["ids"][("xa", found["seed"])]
        assert Path(found["uri"].removeprefix("file://")).is_file()


def test_a_best_last_step_says_train_longer_and_links_the_final_file(sweep):
    xb = sweep["best"]["xb"]
    assert (xb["step"], xb["at_last"], xb["flag"]) == (6, True, STILL_IMPROVING)
    assert xb["value"]["mean"] == pytest.approx(0.71)
    # save_every = 4 does not divide 6: the final LoRA is the one of the last step
    assert [f["path"] for f in xb["files"]] == ["lora/lora.safetensors"] * 2


def test_a_best_first_step_is_flagged_and_has_no_lora(sweep):
    xc = sweep["best"]["xc"]
    assert (xc["step"], xc["at_first"], xc["flag"]) == (0, True, BEST_AT_FIRST)
    assert [(f["path"], f["missing"]) for f in xc["files"]] == [
        (None, "step 0 is the base model: no LoRA was trained yet")] * 2


def test_a_tie_goes_to_the_earliest_step_and_a_step_without_a_file_says_why(sweep):
    xd = sweep["best"]["xd"]
    assert (xd["step"], xd["flag"]) == (2, "")
    assert xd["value"] == {"mean": 0.5, "low": 0.5, "high": 0.5, "n": 2, "note": "", "clipped": False, "missing": ""}
    assert [f["missing"] for f in xd["files"]] == [
        "no LoRA file at step 2: train.save_every = 3 does not divide it"] * 2


def test_a_variant_that_logged_no_value_says_why(sweep):
    xe = sweep["best"]["xe"]
    assert (xe["step"], xe["value"], xe["files"]) == (None, None, [])
    assert xe["missing"] == "fit/loss not logged (validation.fit_images is 0)"


def test_the_one_knob_effects_are_read_at_each_variants_best_step_too(sweep):
    pair = next(p for p in sweep["summary"]["one_knob_pairs"] if (p["a"], p["b"]) == ("xa", "xb"))
    final, best = pair["effects"]["fit/loss"], pair["effects_at_best"]["fit/loss"]
    assert final["effect"] == pytest.approx(0.71 - 0.68)  # xb at 6 against xa at 6
    assert best["effect"] == pytest.approx(0.71 - 0.61)  # xb at its best (6) against xa at its best (4)
    assert best["basis"] == "paired over 2 seeds"
    assert pair["best_steps"] == {"a": 4, "b": 6} and best["read_at"] == {"a": [4], "b": [6]}
    assert pair["effects_at_best"]["img/diversity"]["read_at"] == {"a": [2], "b": [2]}  # its last step <= best
    page = (sweep["root"] / "report" / "report.html").read_text(encoding="utf-8")
    at_best = page[page.index("<details class='at-best'>"):]
    assert at_best.index("xb vs xa (noise.offset; best at 6 and 4)") < at_best.index("</details>")
    assert "data-metric='img/diversity' data-verdict='within noise'" in at_best and "read at 2 vs 2" in at_best


def test_select_max_from_the_command_line_overrides_the_runs(sweep, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert main(["--sweep", sweep["parent"], "--select", "fit/loss:max", "--tracking-uri", sweep["uri"],
                 "--out", str(tmp_path / "r"), "--json", str(out)]) == 0
    summary = json.loads(out.read_text())
    best = {v["name"]: v["best"] for v in summary["variants"]}
    assert summary["select"] == {"metric": "fit/loss", "direction": "max"}
    assert (best["xa"]["step"], best["xa"]["flag"]) == (0, BEST_AT_FIRST)  # 1.0 at step 0 on both seeds
    assert (best["xc"]["step"], best["xc"]["flag"]) == (6, STILL_IMPROVING)


def test_a_bad_select_is_refused_before_any_run_is_read(sweep, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--sweep", sweep["parent"], "--select", "img/drift:up", "--tracking-uri", sweep["uri"],
              "--out", str(tmp_path / "r")])
    assert stop.value.code == 2
    assert ("argument --select: --select = 'img/drift:up': the direction after ':' must be max or min, not 'up'."
            in capsys.readouterr().err)
    assert not (tmp_path / "r").exists()
