"""sweep.stop_early's rules on constructed histories, and the hook reading its peers from a real store (sqlite, and a
server that never answers)."""

from __future__ import annotations

import json
import logging
import math
import random
import socket
import time
from types import SimpleNamespace

from conftest import new_store
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from lora_sweep.tracking.metric_spec import MetricSpec
from lora_sweep.tracking.siblings import SweepPeers
from lora_sweep.tracking.stopped import STOPPED_EARLY as STOPPED_EARLY_TAG
from lora_sweep.tracking.stopped import stop_record
from lora_sweep.training.stop_early import (
    Decision,
    EarlyStop,
    StopEarlyOptions,
    diverged_rule,
    median_rule,
    median_value,
)

LOSS, SCORE = MetricSpec("fit/loss", "min"), MetricSpec("img/diversity", "max")
NAN = float("nan")


def test_median_stops_a_run_strictly_worse_than_the_median_of_it_and_its_peers():
    assert median_rule(LOSS, 0.5, [0.1, 0.2], min_peers=2) == 0.2  # median of [0.1, 0.2, 0.5]
    assert median_rule(LOSS, 0.15, [0.1, 0.2], min_peers=2) is None  # it is the median
    assert median_rule(LOSS, 0.2, [0.1, 0.2], min_peers=2) is None  # a tie never stops
    assert median_rule(LOSS, 0.4, [0.1, 0.2, 0.3], min_peers=2) == 0.2  # even count: the better middle value
    assert median_rule(LOSS, 0.3, [0.1, 0.2, 0.4], min_peers=2) == 0.2
    assert median_rule(SCORE, 0.1, [0.9, 0.5], min_peers=2) == 0.5  # max: lower is worse
    assert median_rule(SCORE, 0.7, [0.9, 0.5], min_peers=2) is None


def test_median_waits_for_min_peers_and_ranks_non_finite_values_worst():
    assert median_rule(LOSS, 9.0, [0.1], min_peers=2) is None
    assert median_rule(LOSS, 9.0, [], min_peers=0) is None  # alone, it is its own median
    assert median_rule(LOSS, NAN, [0.1, 0.2], min_peers=2) == 0.2
    assert median_rule(LOSS, 0.3, [0.1, NAN], min_peers=2) is None  # the NaN peer is the worst of three
    assert median_rule(LOSS, NAN, [NAN, NAN], min_peers=2) is None  # all NaN: the median is NaN, nothing is better
    assert median_value(SCORE, [NAN, 1.0, math.inf, 3.0]) == 1.0  # +inf is not finite: worst


def test_the_median_rule_never_stops_the_best_half_over_random_histories():
    rng, checked, stopped = random.Random(31), 0, 0
    for _ in range(400):
        spec = rng.choice([LOSS, SCORE])
        runs, steps = rng.randint(1, 9), rng.randint(1, 6)
        # integer values (ties are common) and some NaN; a run may not have reached a step yet
        history = [[rng.choice([NAN, *range(6)]) if rng.random() < 0.9 else None for _ in range(steps)]
                   for _ in range(runs)]
        for step in range(steps):
            at = [h[step] for h in history if h[step] is not None]
            for i, value in enumerate(at):
                peers = at[:i] + at[i + 1:]
                min_peers = rng.randint(0, 3)
                limit = median_rule(spec, value, peers, min_peers)
                strictly_better = sum(spec.better(v, value) for v in at)
                checked += 1
                if strictly_better < math.ceil(len(at) / 2):  # in the best half (ties included)
                    assert limit is None, (spec, value, peers)
                elif len(peers) >= min_peers and limit is None:
                    raise AssertionError(f"a run in the worse half with peers was not stopped: {value} {peers}")
                stopped += limit is not None
    assert checked > 3000 and stopped > 300


def test_the_best_half_is_of_the_runs_that_had_logged_the_step_when_the_check_ran():
    # 2 slots, 6 jobs: jobs 1 and 2 logged 1.0 and 2.0 when job 3 logs 3.0; jobs 4-6 log 4, 5, 6 later
    assert median_rule(LOSS, 3.0, [1.0, 2.0], min_peers=2) == 2.0  # stopped: the worse half of the three
    assert sum(LOSS.better(v, 3.0) for v in [1.0, 2.0, 4.0, 5.0, 6.0]) < math.ceil(6 / 2)  # best half of all six


def test_diverged_stops_past_the_step0_value_plus_the_margin_or_on_a_non_finite_value():
    assert diverged_rule(LOSS, 0.31, 0.2, margin=0.1) == 0.30000000000000004
    assert diverged_rule(LOSS, 0.3, 0.2, margin=0.1) is None  # exactly at the limit: not past it
    assert diverged_rule(LOSS, 0.25, 0.2, margin=0.1) is None
    assert diverged_rule(LOSS, 0.21, 0.2, margin=0.0) == 0.2
    assert diverged_rule(LOSS, NAN, 0.2, margin=0.1) == 0.30000000000000004
    assert diverged_rule(LOSS, math.inf, 0.2, margin=0.1) is not None
    assert diverged_rule(SCORE, 0.4, 0.5, margin=0.05) == 0.45  # max: lower is worse
    assert diverged_rule(SCORE, 0.46, 0.5, margin=0.05) is None


def test_the_tag_records_the_decision_as_json():
    text = Decision(3, "diverged", "fit/loss", NAN, 0.3, []).record()
    assert json.loads(text) == {"step": 3, "rule": "diverged", "metric": "fit/loss", "value": None,
                                "finite": False, "compared_with": 0.3, "peers": []}  # JSON has no NaN
    assert stop_record({STOPPED_EARLY_TAG: text}).describe() == "at step 3: fit/loss is not finite (limit 0.3)"
    assert stop_record({STOPPED_EARLY_TAG: text}).as_dict()["finite"] is False


def test_the_reason_shows_the_digits_that_tell_the_two_numbers_apart():
    """The fresh-user test's s8 stop read 'fit/loss 1.145 > median 1.145'."""
    close = Decision(2, "median", "fit/loss", 1.1454301, 1.1453001, [1.1453001])
    assert close.describe() == "at step 2: fit/loss 1.1454 > median 1.1453"
    assert Decision(2, "median", "fit/loss", 1.25, 1.0, [1.0]).describe() == "at step 2: fit/loss 1.25 > median 1"
    assert Decision(2, "median", "img/diversity", 0.5, 0.6, [0.6]).describe() == \
        "at step 2: img/diversity 0.5 < median 0.6"
    assert json.loads(close.record())["value"] == 1.1454301


def session(sink=None):
    return SimpleNamespace(sink=sink or SimpleNamespace(flush=lambda: None))


def stopper(rule: str, peers, **options) -> EarlyStop:
    return EarlyStop(StopEarlyOptions(LOSS, rule, **options), peers)


def judged(hook: EarlyStop, values: dict[int, float], final_step: int = 100) -> Decision | None:
    for step, value in values.items():
        hook.logged[step] = value
        hook(session(), step, final=step >= final_step)
    return hook.decision


def add_run(client: MlflowClient, exp: str, parent: str | None, values: dict[int, float]) -> str:
    tags = {"mlflow.parentRunId": parent} if parent else {}
    run = client.create_run(exp, tags=tags).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run, metrics=[Metric("fit/loss", v, now, s) for s, v in values.items()])
    return run


def test_median_reads_the_sweeps_other_runs_and_their_value_at_the_step(tmp_path, caplog):
    client = MlflowClient(new_store(tmp_path / "mlflow.db"))
    exp = client.create_experiment("e")
    parent = client.create_run(exp).info.run_id
    add_run(client, exp, parent, {0: 1.0, 2: 0.5})
    add_run(client, exp, parent, {0: 1.0, 2: 0.6, 4: 0.4})
    add_run(client, exp, None, {2: 0.1})  # another sweep's run: not a peer
    me = add_run(client, exp, parent, {})
    peers = SweepPeers(client, me, parent)
    assert sorted(peers.values_at("fit/loss", 2)) == [0.5, 0.6]
    assert judged(stopper("median", peers, min_peers=2), {2: 0.55}) is None  # the median of 0.5, 0.55, 0.6
    with caplog.at_level(logging.WARNING):
        assert judged(stopper("median", peers, min_peers=2), {4: 0.9}) is None  # one peer at step 4
    assert "1 sibling runs had logged fit/loss at step 4, fewer than sweep.stop_early.min_peers (2)" in caplog.text
    decision = judged(stopper("median", peers, min_peers=2), {2: 0.7})
    assert decision == Decision(2, "median", "fit/loss", 0.7, 0.6, [0.5, 0.6])
    assert judged(stopper("median", peers, min_peers=2, grace_steps=3), {2: 0.7}) is None  # in the grace period
    assert judged(stopper("median", peers, min_peers=2), {2: 0.7}, final_step=2) is None  # the last step: never
    # a skipped job's run (its status file names it) counts as a peer
    other = add_run(client, exp, None, {2: 0.2})
    (tmp_path / ".job_status").mkdir()
    (tmp_path / ".job_status" / "3.json").write_text(json.dumps({"state": "skipped", "run_id": other}))
    assert sorted(SweepPeers(client, me, parent, tmp_path).values_at("fit/loss", 2)) == [0.2, 0.5, 0.6]


def test_outside_a_sweep_median_has_no_peers_and_diverged_still_works(tmp_path, caplog):
    client = MlflowClient(new_store(tmp_path / "mlflow.db"))
    me = add_run(client, client.create_experiment("e"), None, {0: 0.2})
    with caplog.at_level(logging.WARNING):
        hook = stopper("median", SweepPeers(client, me, None), min_peers=0)
        assert judged(hook, {1: 5.0, 2: 9.0}) is None
    assert caplog.text.count("not part of a sweep") == 1  # said once
    assert judged(stopper("diverged", SweepPeers(client, me, None)), {0: 0.2, 1: 0.2, 2: NAN}).step == 2
    # a resumed process reads its step-0 value from the store
    decision = judged(stopper("diverged", SweepPeers(client, me, None), margin=0.1), {5: 0.35})
    assert decision.compared_with == 0.2 + 0.1 and decision.step == 5


def test_a_store_that_does_not_answer_never_stops_the_run_nor_blocks_past_the_timeout(caplog):
    # a real server socket that accepts connections and never answers
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        client = MlflowClient(f"http://127.0.0.1:{server.getsockname()[1]}")
        hook = stopper("median", SweepPeers(client, "me", "parent"), min_peers=0, timeout=0.3)
        began = time.monotonic()
        with caplog.at_level(logging.WARNING):
            assert judged(hook, {1: NAN, 2: NAN, 3: NAN}) is None
        assert time.monotonic() - began < 1.5  # one wait of 0.3 s; the next checks skip while it is under way
        assert caplog.text.count("did not answer at step 1 within sweep.stop_early.timeout (0.3 s)") == 1
