"""Variants from runs, without training: replicates grouped by config less train.seed, the natural order, the
article's table and the one-knob pairs, on the twelve article configs composed by Hydra as sweep.py composes them."""

from __future__ import annotations

import pytest
from conftest import ROOT

from lora_sweep.compare.params import display, knobs, parameter_table
from lora_sweep.compare.variants import (
    VariantData,
    baseline_index,
    configured_baseline,
    group_replicates,
    natural_key,
    replicate_key,
    strip_seed,
)
from lora_sweep.errors import UserError

ARTICLE = [f"v{n}" for n in range(53, 65)]


def run(name: str, seed: int, *, job: int | None = None, start: int = 0, **params: str) -> VariantData:
    tags = {"variant": name} | ({"lora_sweep.job_num": str(job)} if job is not None else {})
    return VariantData(name=name, run_id=f"{name}-{seed}-{start:04d}".ljust(32, "0"), status="FINISHED",
                       params={"train.seed": str(seed), "tracking.variant": name, "noise.offset": "0.0", **params},
                       final_metrics={},
                       histories={}, cells={}, cell_steps={}, tags=tags, start_time=start)


@pytest.fixture(scope="module")
def article_runs() -> list[VariantData]:
    """The twelve article variants as runs: params as run.py logs them (str of each flattened value), tags as
    sweep.py sets them (job number in glob(v*) order, Hydra's group choices)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import sweep
    from lora_sweep.config import flatten, register_configs, to_container

    register_configs()
    runs = []
    with initialize_config_dir(str(ROOT / "conf"), version_base=None):
        for num, name in enumerate(ARTICLE):
            cfg = compose("config", overrides=[f"experiment={name}", f"hydra.job.num={num}"],
                          return_hydra_config=True)
            tags = sweep.job_tags(cfg.hydra, multirun=True)
            with open_dict(cfg):
                del cfg["hydra"]
            params = {k: str(v) for k, v in flatten(to_container(cfg)).items()}
            runs.append(VariantData(name, f"{num:032d}", "FINISHED", params, {}, {}, {}, {},
                                    tags={**tags, "variant": name}, start_time=1000 - num))  # started in reverse
    return runs


def test_sweep_tags_record_the_job_number_and_group_choices(article_runs):
    v57 = article_runs[ARTICLE.index("v57")]
    assert v57.job_num == 4 and v57.choices["noise"] == "offset_ip" and v57.choices["precision"] == "fp8"
    assert "loss" not in article_runs[ARTICLE.index("v55")].choices  # Hydra records no choice for a list


def test_replicates_group_by_config_less_seed_in_the_sweeps_order():
    runs = [run("b", 2, job=3, start=1), run("b", 1, job=2, start=2), run("a", 1, job=1, start=3),
            run("a", 2, job=0, start=4), run("c", 1, job=4, **{"noise.offset": "0.1"})]
    groups = group_replicates(runs)
    assert [(g.name, g.n, g.seeds) for g in groups] == [("a", 2, [1, 2]), ("b", 2, [1, 2]), ("c", 1, [1])]
    assert replicate_key(runs[0].params) == replicate_key(runs[1].params) != replicate_key(runs[4].params)
    # no job numbers (runs from separate commands): natural order of the names, not start time
    loose = group_replicates([run("v60", 1, start=1), run("v9", 1, start=2), run("v53", 1, start=3)])
    assert [g.name for g in loose] == ["v9", "v53", "v60"]


def test_names_and_baselines():
    assert sorted(["v64", "v9", "v53", "v100"], key=natural_key) == ["v9", "v53", "v64", "v100"]
    assert strip_seed("noise=multires,train.seed=2") == "noise=multires" and strip_seed("train.seed=1") == "default"
    groups = group_replicates([run("v53", 1), run("v57", 1, **{"noise.ip_gamma": "0.1"})])
    assert baseline_index(groups, None) == 0 and baseline_index(groups, "v57") == 1
    assert baseline_index(groups, groups[1].runs[0].run_id[:8]) == 1
    with pytest.raises(UserError, match=r"--baseline: 'v99'.*v53, v57"):
        baseline_index(groups, "v99")
    for r in groups[0].runs + groups[1].runs:
        r.params["compare.baseline"] = "v57"
    assert configured_baseline(groups) == ("v57", None)
    assert replicate_key(groups[0].params) == replicate_key({**groups[0].params, "compare.baseline": "x"})


def test_article_table_shows_the_articles_rows_and_values(article_runs):
    groups = group_replicates(article_runs)
    assert [g.name for g in groups] == ARTICLE  # the sweep's order, although started in reverse
    differ, shared = parameter_table(groups)
    rows = dict(differ)
    # the article's table, row for row (its "x" = off; a value only where the knob has an effect)
    assert rows["loss.huber_c"] == ["x", "x", "0.01", "0.05", "x", "x", "0.08", "x", "x", "x", "x", "x"]
    assert rows["loss.min_snr_gamma"] == ["5", "x", "x", "x", "5", "5", "5", "5", "5", "5", "5", "5"]
    assert rows["loss.debiased"] == ["x", "v", "v", "v"] + ["x"] * 8
    assert rows["noise.offset"] == ["0.0357", "x", "x", "x", "0.0357", "x", "x", "x", "0.0357", "0.0357", "x", "x"]
    assert rows["noise.multires_iterations"] == ["x", "x", "x", "x", "x", "10", "x", "6", "x", "x", "x", "6"]
    assert rows["noise.ip_gamma"] == ["x"] * 4 + ["0.1"] * 8
    assert rows["precision.name"] == ["fp8"] * 11 + ["fp16"]
    assert rows["train.batch_size"][8:10] == ["2", "2"] and rows["train.grad_accum"][8:11] == ["2", "2", "4"]
    assert list(rows)[:10] == ["precision.name", "optimizer.name", "loss.min_snr_gamma", "loss.debiased",
                               "noise.offset", "noise.multires_iterations", "noise.ip_gamma", "loss.huber_c",
                               "train.batch_size", "train.grad_accum"]  # the article's order
    # beyond the article: its per-optimizer lr, the loss type, the step budgets, the two prompt sets; no more
    assert set(rows) - set(list(rows)[:10]) == {"optimizer.lr", "loss.type", "train.max_steps",
                                               "sampling.prompt_file"}
    shared = dict(shared)
    assert shared["noise.multires_discount"] == "0.3 (where it applies)"
    assert shared["optimizer.args"].startswith("each optimizer.name's own")
    assert "train.lr" not in rows and "tracking.variant" not in rows and "train.seed" not in shared


def test_one_knob_pairs_of_the_article(article_runs):
    groups = {g.name: g for g in group_replicates(article_runs)}

    def between(a, b):
        return knobs(groups[a].params, groups[b].params, groups[a].representative.choices,
                     groups[b].representative.choices)

    found = {(a, b): k[0] for i, a in enumerate(ARTICLE) for b in ARTICLE[i + 1:] if len(k := between(a, b)) == 1}
    assert found[("v53", "v57")].as_dict() == {"knob": "noise", "from": "offset", "to": "offset_ip",
                                               "detail": "noise.ip_gamma: x -> 0.1"}  # adds IP noise 0.1
    assert (found[("v57", "v58")].a, found[("v57", "v58")].b) == ("offset_ip", "multires_ip")  # offset -> multires
    assert (found[("v60", "v64")].name, found[("v60", "v64")].a, found[("v60", "v64")].b) == ("precision", "fp8",
                                                                                             "fp16")
    assert (found[("v55", "v56")].name, found[("v55", "v56")].a, found[("v55", "v56")].b) == ("loss.huber_c", "0.01",
                                                                                             "0.05")
    assert found[("v58", "v60")].name == "noise.multires_iterations"
    assert ("v53", "v54") not in found and ("v61", "v63") not in found  # many knobs apart
    assert len(between("v53", "v54")) > 1 and between("v53", "v53") == []
    # without choice tags (older runs), a group's changed values are still one knob
    plain = knobs(groups["v57"].params, groups["v58"].params)
    assert len(plain) == 1 and plain[0].name == "noise"


def test_display_hides_inert_settings():
    l2 = {"loss.type": "l2", "loss.huber_c": "0.1", "noise.multires_iterations": "0", "noise.multires_discount": "0.3"}
    assert display("loss.huber_c", l2) == "x" and display("noise.multires_discount", l2) == "x"
    assert display("loss.huber_c", {**l2, "loss.type": "huber"}) == "0.1"
    assert display("loss.min_snr_gamma", {"loss.min_snr_gamma": "None"}) == "x"
    assert display("train.batch_size", {"train.batch_size": "4"}) == "4" and display("missing", {}) == "x"


def test_replicates_are_named_without_their_seed():
    # -m noise=none,offset train.seed=1,2,3: run.py names each job by the overrides the sweep varies
    runs = [run(f"noise={noise} train.seed={seed}", seed, job=2 * seed + i, **{"tracking.variant": "None"},
                **({"noise.offset": "0.1"} if i else {}))
            for seed in (1, 2, 3) for i, noise in enumerate(("none", "offset"))]
    groups = group_replicates(runs)
    assert [(g.name, g.n, g.seeds) for g in groups] == [("noise=none", 3, [1, 2, 3]), ("noise=offset", 3, [1, 2, 3])]
    assert groups[0].label == "noise=none (n = 3, seeds 1, 2, 3)"
    assert group_replicates([run("v57", 1)])[0].label == "v57"
    assert strip_seed("v57 +train.seed=3") == "v57" and strip_seed("train.seed=2 noise=x") == "noise=x"
    assert strip_seed("sampling.prompts=[a cat, a dog] train.seed=2") == "sampling.prompts=[a cat, a dog]"
    # a cut name ends with a hash of all the overrides, seed included: the replicates still share one name
    cut = [run(f"v57 sampling.prompt_file=/very/long/path/to/prom… #{h}", s, **{"tracking.variant": "v57"})
           for s, h in ((1, "0a1b2c3d"), (2, "9f8e7d6c"))]
    (group,) = group_replicates(cut)
    assert group.name == "v57 sampling.prompt_file=/very/long/path/to/prom…"
    assert baseline_index(groups, "noise=offset train.seed=2") == 1


def test_a_group_choice_that_changes_several_values_is_compound(article_runs):
    from lora_sweep.compare.effects import one_knob_pairs

    groups = group_replicates(article_runs)
    pairs = {(groups[p.a].name, groups[p.b].name): p.knob for p in one_knob_pairs(groups, [])}
    # v53 -> v58 / v60: one knob (noise: offset -> multires_ip), three mechanisms
    assert pairs[("v53", "v60")].compound and pairs[("v53", "v60")].values == (
        ("noise.offset", "0.0357", "0"), ("noise.multires_iterations", "0", "6"), ("noise.ip_gamma", "0", "0.1"))
    assert pairs[("v57", "v58")].entails == "noise.offset 0.0357 -> 0; noise.multires_iterations 0 -> 10"
    assert pairs[("v57", "v58")].values_dict()["compound"] is True
    # true single-value changes, a group choice among them: v53 -> v57 only adds IP noise
    for single in (("v53", "v57"), ("v55", "v56"), ("v58", "v60"), ("v60", "v64")):
        assert not pairs[single].compound, single
    assert pairs[("v53", "v57")].values == (("noise.ip_gamma", "0", "0.1"),)
    assert pairs[("v60", "v64")].entails == "precision.name fp8 -> fp16"
    # single-value pairs are listed first, then the compound ones
    order = [p.knob.compound for p in one_knob_pairs(groups, [])]
    assert order == sorted(order) and order[-1] is True


def test_the_shared_rows_hold_settings_only():
    groups = group_replicates([run("a", 1, **{"data.warnings": "2"}), run("b", 1, **{"noise.offset": "0.1",
                                                                                     "data.warnings": "0"})])
    differ, shared = parameter_table(groups)
    assert [k for k, _ in differ] == ["noise.offset"]
    assert "status" not in dict(shared) and "data.warnings" not in dict(shared)
    groups[1].runs[0].status = "FAILED"
    assert dict(parameter_table(groups)[0])["status"] == ["FINISHED", "FAILED"]  # a failed variant stands out


def test_optimizer_args_strings_are_one_knob_with_the_arguments_they_set():
    """The tester's optimizer_args: the params hold the merged optimizer.args.*, so the strings are no second knob."""
    base = {"optimizer.name": "adamw", "optimizer.args.weight_decay": "0.01", "optimizer.args.betas": "[0.9, 0.999]",
            "optimizer.optimizer_args": "[]"}
    strings = {"optimizer.name": "adamw", "optimizer.args.weight_decay": "0.1", "optimizer.args.betas": "[0.9, 0.99]",
               "optimizer.optimizer_args": "['weight_decay=0.1', 'betas=(0.9,0.99)']"}
    (knob,) = knobs(base, strings, {"optimizer": "adamw"}, {"optimizer": "adamw"})
    assert (knob.name, knob.a, knob.b) == ("optimizer.args", "betas=[0.9, 0.999], weight_decay=0.01",
                                          "betas=[0.9, 0.99], weight_decay=0.1")
