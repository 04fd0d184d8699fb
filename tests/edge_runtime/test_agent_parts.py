"""The device agent's parts on real models: the probation judge's rollback decision, the A/B and shadow
router, the agent's settings (a config object or the keyword arguments), and a stop that stays bounded
whatever the sinks and the broker do."""

from __future__ import annotations

import functools
import socket
import time

import numpy as np
import pytest

import edge_runtime
from devtools.fleet_emulation import slow_down
from edge_runtime.agent import STOP_BOUND_S, STOP_CLOSE_S, AgentConfig, DeviceAgent, agent_settings
from edge_runtime.errors import InvalidInputError
from edge_runtime.mqtt import parse_broker_url
from edge_runtime.outputs import HttpSink
from edge_runtime.probation import ProbationJudge, RollbackPolicy
from edge_runtime.router import VariantRouter, Variants, agree


@pytest.fixture(scope="module")
def bc_rows(reference_data):
    return reference_data["breast_cancer"].X_test.astype(np.float32)


def windows_of(model, rows, n_windows, window_size=50, added_latency_s=0.0, bad=0, failed=0) -> list[dict]:
    """``n_windows`` real telemetry windows of ``model`` over ``rows`` (repeated as needed); each window has
    ``bad`` refused inputs and ``failed`` failed inferences among its ``window_size``."""
    good = window_size - bad - failed
    rows = np.resize(rows, (n_windows * good, rows.shape[1]))
    slow_down(model, added_latency_s)
    rec = model.start_recording(window_seconds=None, window_size=window_size)
    try:
        for i in range(n_windows):
            for _ in range(bad):
                with pytest.raises(InvalidInputError):
                    model.predict(np.zeros(3, np.float32))     # the wrong number of features: refused
            if failed:
                rec.record_error(failed)                       # what the model counts when an inference fails
            for x in rows[i * good:(i + 1) * good]:
                model.predict(x)
        return rec.poll()
    finally:
        model.stop_recording()
        slow_down(model, 0.0)


def judged(judge: ProbationJudge, windows: list[dict]):
    """Feed windows to the judge; the verdict and how many windows it took."""
    for n, w in enumerate(windows, 1):
        verdict = judge.observe(w)
        if verdict is not None:
            return verdict, n
    return None, len(windows)


def on_probation(bc_mlp_bundle, rows, policy=None) -> tuple[ProbationJudge, object]:
    """A judge (of ``policy``, the default one when None) that saw the old bundle's windows and a flash of
    the new one (loaded, returned)."""
    judge = ProbationJudge(policy or RollbackPolicy())
    old = edge_runtime.load(bc_mlp_bundle)
    assert judged(judge, windows_of(old, rows, 4)) == (None, 4)   # no probation: no verdict
    baseline = judge.baseline()
    assert baseline is not None and baseline > 0
    judge.begin("flash", "2.0", baseline)
    return judge, edge_runtime.load(bc_mlp_bundle)


def test_a_flashed_bundle_as_fast_and_clean_as_the_old_one_passes_its_probation(bc_mlp_bundle, bc_rows):
    # a lenient latency limit: a 2-core machine shared with other work may slow a few inferences
    judge, new = on_probation(bc_mlp_bundle, bc_rows, RollbackPolicy(min_increase_ms=20.0))
    verdict, n = judged(judge, windows_of(new, bc_rows, 4))
    assert n == 3 and verdict.passed and verdict.version == "2.0" and verdict.windows == 3
    assert verdict.error_rate == 0.0 and verdict.rejected_rate == 0.0 and verdict.p95_ms > 0
    doc = verdict.figures("dev-1")
    assert doc["device_id"] == "dev-1" and doc["baseline_p95_ms"] == verdict.baseline_p95_ms
    assert not judge.on_probation                                   # judged once
    assert judged(judge, windows_of(new, bc_rows, 2)) == (None, 2)


def test_a_flashed_bundle_three_times_slower_rolls_back(bc_mlp_bundle, bc_rows):
    judge, new = on_probation(bc_mlp_bundle, bc_rows)
    # 3 ms more per inference: over twice the sub-millisecond p95 before, and more than 1 ms higher
    verdict, n = judged(judge, windows_of(new, bc_rows, 3, window_size=20, added_latency_s=0.003))
    assert n == 3 and not verdict.passed
    assert verdict.reason.startswith("latency regression") and verdict.p95_ms >= 3.0 > verdict.baseline_p95_ms


def test_a_latency_rise_under_the_minimum_increase_is_no_regression(bc_mlp_bundle, bc_rows):
    policy = RollbackPolicy(latency_factor=2.0, min_increase_ms=50.0)
    judge, new = on_probation(bc_mlp_bundle, bc_rows, policy)
    verdict, _ = judged(judge, windows_of(new, bc_rows, 3, window_size=20, added_latency_s=0.003))
    assert verdict.passed and verdict.p95_ms > 2 * verdict.baseline_p95_ms


def test_a_flashed_bundle_that_refuses_its_inputs_rolls_back(bc_mlp_bundle, bc_rows):
    judge, new = on_probation(bc_mlp_bundle, bc_rows)
    verdict, _ = judged(judge, windows_of(new, bc_rows, 3, bad=20))     # 20 of every 50 inputs refused
    assert not verdict.passed and verdict.reason.startswith("rejected inputs")
    assert verdict.rejected_rate == pytest.approx(0.4) and verdict.error_rate == 0.0


def test_a_flashed_bundle_with_failing_inferences_rolls_back(bc_mlp_bundle, bc_rows):
    judge, new = on_probation(bc_mlp_bundle, bc_rows)
    verdict, _ = judged(judge, windows_of(new, bc_rows, 3, failed=5))
    assert not verdict.passed and verdict.reason.startswith("error rate")
    assert verdict.error_rate == pytest.approx(0.1) and verdict.rejected_rate == 0.0
    # under the limits: passes
    judge, new = on_probation(bc_mlp_bundle, bc_rows, RollbackPolicy(max_error_rate=0.2, min_increase_ms=20.0))
    assert judged(judge, windows_of(new, bc_rows, 3, failed=5))[0].passed


def test_only_a_flash_is_judged_and_no_policy_judges_nothing(bc_mlp_bundle, bc_rows):
    model = edge_runtime.load(bc_mlp_bundle)
    judge = ProbationJudge()
    judge.begin("rollback", "1.0", None)
    assert not judge.on_probation and judge.windows == 3
    assert judged(judge, windows_of(model, bc_rows, 3, bad=40)) == (None, 3)
    never = ProbationJudge(None)
    never.begin("flash", "2.0", 0.1)
    assert not never.on_probation and never.windows == 0


def serve_all(router: VariantRouter, primary, rows, emitted: list) -> None:
    """Route every row; ``emitted`` gets (model, emit) of each prediction."""
    def answer(model, x, emit=True):
        emitted.append((model, emit))
        return model.predict(x)

    for x in rows:
        router.serve(primary, functools.partial(answer, x=x))


def test_the_ab_split_sends_its_share_of_inputs_to_b_and_each_model_records_its_own(bc_mlp_bundle, bc_rf_bundle,
                                                                                     bc_rows):
    a, b = edge_runtime.load(bc_mlp_bundle), edge_runtime.load(bc_rf_bundle)
    router = VariantRouter(Variants(second=b, mode="ab", split=0.25, seed=7))
    rec_a = a.start_recording(window_seconds=None, window_size=100000, variant=router.primary_variant)
    rec_b = router.start_recording(None, 100000)
    emitted: list = []
    rows = np.tile(bc_rows, (20, 1))[:2000]
    serve_all(router, a, rows, emitted)
    wa, wb = rec_a.flush(), rec_b.flush()
    assert (wa["model"]["variant"], wb["model"]["variant"]) == ("A", "B")
    assert wa["count"] + wb["count"] == 2000 == len(emitted)               # one model per input
    assert 0.21 < wb["count"] / 2000 < 0.29                                # a 25% split (binomial, n=2000)
    assert sum(m is b for m, _ in emitted) == wb["count"] and all(e for _, e in emitted)
    # the draw is seeded: the same seed routes the same inputs the same way
    again = VariantRouter(Variants(second=b, mode="ab", split=0.25, seed=7))
    assert [again.pick(a) is b for _ in range(2000)] == [m is b for m, _ in emitted]
    assert router.status()["split"] == 0.25 and router.status()["name"] == "breast-cancer-rf"


@pytest.mark.parametrize("output_variants", ["primary", "all"])
def test_shadow_mode_serves_every_input_with_both_and_counts_their_agreement(bc_mlp_bundle, bc_rf_bundle, bc_rows,
                                                                            output_variants):
    a, b = edge_runtime.load(bc_mlp_bundle), edge_runtime.load(bc_rf_bundle)
    router = VariantRouter(Variants(second=b, mode="shadow", output_variants=output_variants))
    a.start_recording(window_seconds=None, window_size=100000, variant=router.primary_variant)
    rec = router.start_recording(None, 100000)
    emitted: list = []
    serve_all(router, a, bc_rows, emitted)
    n = len(bc_rows)
    assert [m for m, _ in emitted] == [a, b] * n
    assert [e for m, e in emitted if m is b] == [output_variants == "all"] * n
    w = rec.flush()
    router.annotate(w)
    same = sum(int(np.argmax(a.predict(x)) == np.argmax(b.predict(x))) for x in bc_rows)
    assert w["model"]["variant"] == "shadow" and w["agreement"]["compared"] == n == w["count"]
    assert w["agreement"]["agreed"] == same and 0.9 < same / n < 1.0   # two different models: close, not identical
    nxt = {}
    router.annotate(nxt)
    assert nxt["agreement"] == {"compared": 0, "agreed": 0, "rate": None, "max_abs_diff": 0.0}
    assert router.status()["mode"] == "shadow" and router.status()["split"] is None


def test_a_shadow_that_refuses_an_input_is_not_compared(bc_mlp_bundle, bc_rf_bundle):
    a, b = edge_runtime.load(bc_mlp_bundle), edge_runtime.load(bc_rf_bundle)
    router = VariantRouter(Variants(second=b, mode="shadow"))
    served = []

    def answer(model, emit=True):
        served.append(model)
        return model.predict(np.zeros(30 if model is a else 3, np.float32))   # the shadow gets a bad input

    router.serve(a, answer)
    assert served == [a, b] and router.agreement.compared == 0


def test_agreement_of_two_predictions():
    assert agree([0.1, 0.9], [0.4, 0.6]) == (True, pytest.approx(0.3))
    assert agree([0.9, 0.1], [0.4, 0.6])[0] is False
    assert agree([10.0], [10.05]) == (True, pytest.approx(0.05, abs=1e-5))    # within 1% of A's scale
    assert agree([10.0], [10.5])[0] is False
    assert agree([0.1, 0.9], [0.1, 0.2, 0.7]) == (False, float("inf"))


def test_a_router_refuses_an_unknown_mode_or_output_choice(bc_rf_bundle):
    b = edge_runtime.load(bc_rf_bundle)
    with pytest.raises(ValueError, match="ab or shadow"):
        VariantRouter(Variants(second=b, mode="canary"))
    with pytest.raises(ValueError, match="output_variants"):
        VariantRouter(Variants(output_variants="some"))
    assert VariantRouter(Variants(mode="canary")).status() is None     # no second model: the mode is moot


def test_the_agent_takes_a_config_or_the_keyword_settings(bc_mlp_bundle, bc_rf_bundle, tmp_path):
    broker = parse_broker_url("mqtt://127.0.0.1:1")
    second = edge_runtime.load(bc_rf_bundle)
    kw = DeviceAgent(edge_runtime.load(bc_mlp_bundle), "dev-k", "lab", broker, state_dir=tmp_path / "k",
                     window_size=20, window_seconds=None, confirm="broker", prefix="p", second=second,
                     mode="shadow", rollback_policy=None)
    cfg = DeviceAgent(edge_runtime.load(bc_mlp_bundle), "dev-c", "lab", broker,
                      AgentConfig(state_dir=tmp_path / "c", window_size=20, window_seconds=None, confirm="broker",
                                  prefix="p", rollback_policy=None), Variants(second=second, mode="shadow"))
    try:
        for agent, dev in ((kw, "dev-k"), (cfg, "dev-c")):
            assert agent.config.window_size == agent.recorder.window_size == 20
            assert agent.delivery.confirm == "broker" and agent.telemetry_topic == f"p/lab/{dev}/telemetry"
            assert agent.second is second and agent.mode == "shadow" and agent.second_recorder is not None
            assert agent.rollback_policy is None and agent.state_dir == tmp_path / dev[-1]
    finally:
        kw.spool.close()
        cfg.spool.close()
    config, variants = agent_settings(AgentConfig(window_size=5), None, {"split": 0.1, "window_seconds": None})
    assert (config.window_size, config.window_seconds, variants.split) == (5, None, 0.1)
    with pytest.raises(TypeError, match="windows_size"):
        agent_settings(None, None, {"windows_size": 5})


def test_stop_is_bounded_with_hung_outputs_and_no_broker(bc_mlp_bundle, bc_rows, tmp_path):
    """Two webhooks that never answer and a broker that is not there: the sinks are closed together (each
    gets its STOP_CLOSE_S), the drain gives up, and every window stays spooled for the next run."""
    holes = [socket.socket() for _ in range(2)]
    for s in holes:
        s.bind(("127.0.0.1", 0))
        s.listen(1)        # connections open; requests hang (nobody accepts nor answers)
    sinks = [HttpSink(f"http://127.0.0.1:{s.getsockname()[1]}/hook", lambda records: b"[]", timeout=60.0,
                      retries=0, batch_size=10) for s in holes]
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    agent = DeviceAgent(edge_runtime.load(bc_mlp_bundle), "dev-b", "lab", parse_broker_url(f"mqtt://127.0.0.1:{port}"),
                        state_dir=tmp_path / "s", window_size=50, window_seconds=None, outputs=sinks)
    try:
        agent.start()
        agent.run(bc_rows[:120])
        t0 = time.monotonic()
        left = agent.stop(drain_timeout=1.0)
        took = time.monotonic() - t0
    finally:
        for s in holes:
            s.close()
    assert left == 3                                     # two full windows and the last partial one
    assert took < 1.0 + STOP_BOUND_S
    assert took < 2 * STOP_CLOSE_S                       # the two hung sinks were waited for together
    assert all(s.counts.delivered == 0 and s.counts.dropped + s.counts.failed == 120 for s in sinks)
