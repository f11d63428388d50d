"""`sweep.stop_early`: stop a losing variant at an evaluation step, so its slot takes the next queued job.

The rules are pure functions of values (`median`, `diverged`); `EarlyStop` is the evaluation hook that applies one
after the metric is logged, asking the store for peers through `Peers` (tracking/siblings.py) on a thread that it
waits on for at most `sweep.stop_early.timeout` seconds. A decision makes the training stop as a stop request does
(state and LoRA of the step reached, no end-of-run evaluation); the job ends the run KILLED and tagged
`STOPPED_EARLY_TAG` with `Decision.record()`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from lora_sweep.tracking.metric_spec import MetricSpec
from lora_sweep.tracking.stopped import STOPPED_EARLY, StopRecord, json_number

if TYPE_CHECKING:
    from lora_sweep.training.session import Session

log = logging.getLogger(__name__)

STOPPED_EARLY_TAG = STOPPED_EARLY  # the readers' name (tracking/stopped.py), so writer and readers cannot differ
RULES = ("median", "diverged")


@dataclass(frozen=True)
class Decision:
    """Why a run stops at `step`: its `value` of `metric` against `compared_with` (the median, or the step-0 value
    plus the margin); `peers` the sibling values the median was taken with, best first (empty for `diverged`)."""

    step: int
    rule: str
    metric: str
    value: float
    compared_with: float
    peers: list[float] = field(default_factory=list)

    def record(self) -> str:
        """The tag's JSON: non-finite numbers as null (JSON has no NaN), "finite" false when the value was not."""
        fields = asdict(self) | {"value": json_number(self.value), "finite": math.isfinite(self.value),
                                 "compared_with": json_number(self.compared_with),
                                 "peers": [json_number(p) for p in self.peers]}
        return json.dumps(fields)

    def describe(self) -> str:
        """The reason as the report and the launcher give it: 'at step 2: fit/loss 1.1454 > median 1.1453'."""
        return StopRecord(self.step, self.rule, self.metric, self.value, self.compared_with, len(self.peers)).describe()


def ranked(spec: MetricSpec, values: list[float]) -> list[float]:
    """`values` best first in `spec`'s direction; non-finite values rank worst (in their given order)."""
    finite = sorted((v for v in values if math.isfinite(v)), reverse=spec.direction == "max")
    return finite + [v for v in values if not math.isfinite(v)]


def median_value(spec: MetricSpec, values: list[float]) -> float:
    """The median of `values` by rank: the ceil(n/2)-th best (for an even count the better of the two middle ones)."""
    return ranked(spec, values)[math.ceil(len(values) / 2) - 1]


def median_rule(spec: MetricSpec, value: float, peers: list[float], min_peers: int) -> float | None:
    """The median the run's `value` is strictly worse than (stop), or None (go on). The median is `median_value` of
    the peers' values and the run's own; fewer than `min_peers` peers never stop. So a run stops exactly when at least
    ceil(n/2) of the n runs are strictly better than it: ties never stop, and the best half never stops. The n runs
    are those in `peers` (the ones that had logged the step when the check ran), not the whole sweep."""
    if len(peers) < min_peers:
        return None
    median = median_value(spec, [*peers, value])
    return median if spec.better(median, value) else None


def diverged_limit(spec: MetricSpec, first: float, margin: float) -> float:
    """The worst value `diverged` allows: the step-0 value plus `margin` in the worse direction."""
    return first + margin if spec.direction == "min" else first - margin


def diverged_rule(spec: MetricSpec, value: float, first: float, margin: float) -> float | None:
    """The limit the run's `value` is past (stop), or None (go on): `value` not finite, or worse than `first` (its
    step-0 value) by more than `margin`."""
    limit = diverged_limit(spec, first, margin)
    return limit if not math.isfinite(value) or spec.better(limit, value) else None


class Peers(Protocol):
    """What the rules read from the store (tracking.siblings.SweepPeers)."""

    # the values of `metric` at `step` of the sweep's other runs that logged it; None outside a sweep
    def values_at(self, metric: str, step: int) -> list[float] | None: ...
    # this run's own value of `metric` at `step` (a resumed process's step-0 value), None if not logged
    def own_value(self, metric: str, step: int) -> float | None: ...


@dataclass
class StopEarlyOptions:
    """The `sweep.stop_early` group, the metric parsed."""

    spec: MetricSpec
    rule: str = "median"
    grace_steps: int = 0
    min_peers: int = 2
    margin: float = 0.0
    timeout: float = 5.0


class EarlyStop:
    """The evaluation hook: at an evaluation step > 0 and >= grace_steps (never the last), judge the value of the
    metric just logged (`watch` records it) with the rule; `decision` is set when the run should stop.

    Store reads run on a daemon thread waited on for `timeout` s: one that does not answer in time does not stop the
    run (said once), and no new read starts while it is still under way."""

    def __init__(self, options: StopEarlyOptions, peers: Peers):
        self.options, self.peers = options, peers
        self.decision: Decision | None = None
        self.logged: dict[int, float] = {}  # step -> the metric's value, as this process logged it
        self._said: set[str] = set()
        self._busy: threading.Thread | None = None

    def attach(self, s: Session) -> None:
        """Judge in session `s` after every evaluation hook, so the stop step logs all that is due at it (a resume
        does not evaluate its start step again); the decision is a stop request from then on."""
        s.sink = _Watched(s.sink, self)
        s.hooks.append(self)
        requested = s.should_stop
        s.should_stop = lambda: requested() or self.decision is not None

    def __call__(self, s, step: int, final: bool) -> bool:
        o = self.options
        if step == 0 or final or step < o.grace_steps or self.decision is not None or step not in self.logged:
            return True
        value = self.logged[step]
        if o.rule == "median":
            s.sink.flush()  # this run's value reaches the store for its peers' checks
            peers = self._ask(lambda: self.peers.values_at(o.spec.name, step), step)
            if peers is None:
                return True
            if len(peers) < o.min_peers:
                self._say_once("few", "early stop: %d sibling runs had logged %s at step %d, fewer than "
                               "sweep.stop_early.min_peers (%d): the median rule waits for more", len(peers),
                               o.spec.name, step, o.min_peers)
            limit = median_rule(o.spec, value, peers, o.min_peers)
        else:
            first = self.logged.get(0)
            if first is None:  # a resumed process: step 0 is in the store
                first = self._ask(lambda: self.peers.own_value(o.spec.name, 0), step)
                if first is None:
                    self._say_once("first", "early stop: this run's step-0 value of %s is unknown: the diverged "
                                   "rule stops it only on a non-finite value", o.spec.name)
                    first = math.inf if o.spec.direction == "min" else -math.inf
            peers, limit = [], diverged_rule(o.spec, value, first, o.margin)
        if limit is not None:
            self.decision = Decision(step, o.rule, o.spec.name, value, limit, ranked(o.spec, peers))
            log.warning("early stop: stopping (rule %s) %s; the state and the LoRA of this step are saved, the run "
                        "ends KILLED and a rerun without the rule resumes it", o.rule, self.decision.describe())
        return True

    def _ask(self, read: Callable[[], Any], step: int) -> Any:
        """`read()` on a daemon thread, waited on for the timeout; None when it fails, is late or one is under way."""
        if self._busy is not None and self._busy.is_alive():
            return None
        answer: dict[str, Any] = {}

        def run() -> None:
            try:
                answer["value"] = read()
            except Exception as exc:  # noqa: BLE001  (a store problem never fails the training)
                answer["error"] = exc

        self._busy = threading.Thread(target=run, name="stop-early-read", daemon=True)
        self._busy.start()
        self._busy.join(self.options.timeout)
        what = f"early stop ({self.options.rule} rule)"
        if self._busy.is_alive():
            self._say_once("late", "%s: the tracking store did not answer at step %d within sweep.stop_early.timeout "
                           "(%s s): the rule does not stop this run while it cannot read the store",
                           what, step, self.options.timeout)
            return None
        if "error" in answer:
            self._say_once("error", "%s: could not read the tracking store at step %d (%s): the rule does not stop "
                           "this run while it cannot read the store", what, step,
                           str(answer["error"]).splitlines()[0][:200])
            return None
        if answer.get("value") is None and self.options.rule == "median":
            self._say_once("alone", "%s: this run is not part of a sweep (no MLflow parent run): the median rule "
                           "has no peers and never stops it", what)
        return answer.get("value")

    def _say_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._said:
            self._said.add(key)
            log.warning(message, *args)


class _Watched:
    """A sink whose metrics `EarlyStop` also records (the watched metric's value per step)."""

    def __init__(self, sink: Any, stopper: EarlyStop):
        self._sink, self._stopper = sink, stopper

    def metrics(self, values: dict[str, float], step: int) -> None:
        self._sink.metrics(values, step)
        name = self._stopper.options.spec.name
        if name in values:
            self._stopper.logged[step] = float(values[name])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sink, name)
