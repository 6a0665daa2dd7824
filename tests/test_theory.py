"""decode/theory.py against hand-computed values and its limits (pure arithmetic, milliseconds)."""

import pytest

from decode.measure import format_table
from decode.theory import (
    balanced_exit_layer,
    balanced_split,
    best_eesd_gamma,
    eesd_speedup,
    eesd_time_per_token,
    expected_tokens_per_round,
    ideal_ppsd_speedup,
    ppsd_speedup,
    ppsd_flush_latency,
    ppsd_round_trip,
    ppsd_tick,
    ppsd_time_per_token,
    predict_table,
    stage_costs,
    tp_ar_time_per_token,
    tp_layer_s,
)


def test_ppsd_time_per_token_by_hand():
    # stages 3, 5, 4 ms, feedback 1 ms: tick = 5, L = 3 + 5 + 4 + 1 = 13
    # α = 0.75: 0.75·5 + 0.25·13 = 3.75 + 3.25 = 7.0
    assert ppsd_time_per_token(0.75, [3.0, 5.0, 4.0], feedback_s=1.0) == pytest.approx(7.0)
    # no feedback, α = 0.5: 0.5·5 + 0.5·12 = 8.5
    assert ppsd_time_per_token(0.5, [3.0, 5.0, 4.0]) == pytest.approx(8.5)
    # speedup against T_AR = 14: 14 / 7 = 2.0
    assert ppsd_speedup(0.75, [3.0, 5.0, 4.0], 14.0, feedback_s=1.0) == pytest.approx(2.0)
    assert ppsd_flush_latency([3.0, 5.0, 4.0], 1.0) == pytest.approx(13.0)


def test_window_limits_the_tick():
    # L = 13; 3 in flight: 13/3 = 4.33 < 5, no effect; 2 in flight: 13/2 = 6.5 > 5 becomes the tick
    assert ppsd_time_per_token(0.75, [3.0, 5.0, 4.0], 1.0, window=3) == pytest.approx(7.0)
    # α = 0.75: 0.75·6.5 + 0.25·13 = 4.875 + 3.25 = 8.125
    assert ppsd_time_per_token(0.75, [3.0, 5.0, 4.0], 1.0, window=2) == pytest.approx(8.125)
    # α = 0 pays L while window·τ₀ <= L: 3·3 = 9 < 13
    assert ppsd_time_per_token(0.0, [3.0, 5.0, 4.0], 1.0, window=3) == pytest.approx(13.0)


def test_window_delays_the_restart_when_stage0_is_slow():
    # stages [6, 3], feedback 1: L = 10, but with 2 in flight stage 0 finishes its speculative position
    # before reading the verdict: restart every max(10, 2·6) = 12; tick = max(6, 10/2) = 6
    # α = 0.5: 0.5·6 + 0.5·12 = 9 (without the window: 0.5·6 + 0.5·10 = 8)
    assert ppsd_time_per_token(0.5, [6.0, 3.0], 1.0, window=2) == pytest.approx(9.0)
    assert ppsd_time_per_token(0.5, [6.0, 3.0], 1.0) == pytest.approx(8.0)


def test_head_after_the_send_leaves_the_flush_path():
    # stages [6, 5], stage 0's head 2 of its 6, feedback 1: round trip = 6 - 2 + 5 + 1 = 10 (not 12)
    assert ppsd_round_trip([6.0, 5.0], 1.0, head_s=2.0) == pytest.approx(10.0)
    assert ppsd_flush_latency([6.0, 5.0], 1.0, head_s=2.0) == pytest.approx(10.0)
    # the tick is still the slowest stage's whole cost
    assert ppsd_tick([6.0, 5.0], 1.0, head_s=2.0) == pytest.approx(6.0)
    with pytest.raises(ValueError):
        ppsd_round_trip([6.0, 5.0], 1.0, head_s=7.0)


def test_polling_stage0_acts_at_its_next_look():
    # stages [6, 5], head 2, feedback 1: the verdict arrives at 10. Stage 0 works on position 0 in [0, 6)
    # (layers to 4, head to 6) and position 1 in [6, 12) (layers to 10, head to 12).
    # Polling, window 3: it looks at 4, 6, 10, 12, ... -> acts at 10
    assert ppsd_flush_latency([6.0, 5.0], 1.0, window=3, head_s=2.0, poll=True) == pytest.approx(10.0)
    # feedback 1.5: the verdict arrives at 10.5 -> the next look is the end of position 1's head: 12
    assert ppsd_flush_latency([6.0, 5.0], 1.5, window=3, head_s=2.0, poll=True) == pytest.approx(12.0)
    # no polling: it reads a verdict only with 3 in flight, at 18
    assert ppsd_flush_latency([6.0, 5.0], 1.0, window=3, head_s=2.0, poll=False) == pytest.approx(18.0)
    # window 1: idle from 6 on, so it acts the moment the verdict arrives
    assert ppsd_flush_latency([6.0, 5.0], 1.0, window=1, head_s=2.0, poll=True) == pytest.approx(10.0)
    # α = 0.5 with window 3 + polling: tick = max(6, 10/3) = 6 -> 0.5·6 + 0.5·12 = 9 at feedback 1.5
    assert ppsd_time_per_token(0.5, [6.0, 5.0], 1.5, window=3, head_s=2.0, poll=True) == pytest.approx(9.0)


def test_ppsd_limits():
    stages, t_ar, fb = [3.0, 5.0, 4.0], 12.0, 0.5
    # α = 0: every token pays L = 12.5 -> 12 / 12.5
    assert ppsd_speedup(0.0, stages, t_ar, fb) == pytest.approx(12 / 12.5)
    # α = 1: every token pays one tick = 5 -> 12 / 5
    assert ppsd_speedup(1.0, stages, t_ar, fb) == pytest.approx(12 / 5)
    # monotone in α
    speedups = [ppsd_speedup(a / 10, stages, t_ar, fb) for a in range(11)]
    assert speedups == sorted(speedups)


def test_ideal_speedup_by_hand_and_limits():
    # N = 32, E = 8, α = 0.5: 32 / (4 + 16) = 1.6
    assert ideal_ppsd_speedup(0.5, 32, 8) == pytest.approx(1.6)
    # α = 0.9: 32 / (7.2 + 3.2) = 32 / 10.4 = 3.0769...
    assert ideal_ppsd_speedup(0.9, 32, 8) == pytest.approx(32 / 10.4)
    assert ideal_ppsd_speedup(0.0, 32, 8) == pytest.approx(1.0)
    assert ideal_ppsd_speedup(1.0, 32, 8) == pytest.approx(4.0)  # N / E
    for e in (1, 5, 16, 31):
        for a in (0.0, 0.1, 0.5, 0.99, 1.0):
            assert ideal_ppsd_speedup(a, 32, e) >= 1.0 - 1e-12


def test_ideal_speedup_is_balanced_stage_costs():
    # S = N/E stages of E unit layers, no head/LM head/communication: the general formula gives the ideal one
    stages = stage_costs(1.0, 32, 8, 4, head_s=0.0, lm_head_s=0.0)
    assert stages == [8.0, 8.0, 8.0, 8.0]
    for a in (0.0, 0.3, 0.8, 1.0):
        assert ppsd_speedup(a, stages, 32.0) == pytest.approx(ideal_ppsd_speedup(a, 32, 8))


def test_expected_tokens_by_hand():
    # α = 0.5, γ = 2: (1 − 0.125) / 0.5 = 1.75  (= 1 + 0.5 + 0.25)
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens_per_round(0.0, 4) == pytest.approx(1.0)
    assert expected_tokens_per_round(1.0, 4) == pytest.approx(5.0)
    assert expected_tokens_per_round(0.999999, 4) == pytest.approx(5.0, rel=1e-5)  # continuous at α -> 1


def test_eesd_by_hand():
    # draft 1 ms, verify(3) = 10 ms, γ = 2, α = 0.5: cost = 2 + 10 = 12; tokens 1.75; 12 / 1.75 = 6.857...
    assert eesd_time_per_token(0.5, 2, 1.0, {3: 10.0}) == pytest.approx(12 / 1.75)
    # T_AR = 10: speedup = 10 / (12/1.75) = 1.4583...
    assert eesd_speedup(0.5, 2, 1.0, {3: 10.0}, 10.0) == pytest.approx(17.5 / 12)
    # a callable verify cost: verify(k) = 9 + k -> verify(3) = 12; cost = 2·1 + 12 = 14; α = 1: 3 tokens
    assert eesd_time_per_token(1.0, 2, 1.0, lambda k: 9.0 + k) == pytest.approx(14 / 3)
    with pytest.raises(ValueError, match="no verify cost for 4"):
        eesd_time_per_token(0.5, 3, 1.0, {3: 10.0})


def test_eesd_loses_at_low_alpha_and_wins_at_high_alpha():
    t_ar, draft = 10.0, 2.0  # a draft costs 1/5 of the full model; verifying is one full step (memory-bound)
    verify = lambda k: t_ar  # noqa: E731
    for g in range(1, 9):
        # α = 0.1, γ = 1: tokens 1.1, cost 12 -> 0.92×; more drafts only waste more
        assert eesd_speedup(0.1, g, draft, verify, t_ar) < 1.0
    # α = 0.95, γ = 4: tokens (1 − 0.95^5)/0.05 = 4.524; cost 8 + 10 = 18 -> 2.51×
    assert eesd_speedup(0.95, 4, draft, verify, t_ar) == pytest.approx(10 * (1 - 0.95**5) / 0.05 / 18)
    assert eesd_speedup(0.95, 4, draft, verify, t_ar) > 2.0


def test_best_gamma_grows_with_alpha():
    t_ar, draft = 10.0, 1.0
    verify = lambda k: t_ar  # noqa: E731
    gammas = [best_eesd_gamma(a, draft, verify, t_ar) for a in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)]
    assert gammas == sorted(gammas)
    assert gammas[0] < gammas[-1]
    assert best_eesd_gamma(1.0, draft, verify, t_ar) == 8  # every draft accepted: the longest round
    # α = 0.5: γ=1 -> 1.5/11 = 0.136, γ=2 -> 1.75/12 = 0.146, γ=3 -> 1.875/13 = 0.144 -> γ = 2
    assert best_eesd_gamma(0.5, draft, verify, t_ar) == 2


def test_stage_costs_by_hand():
    # N = 6 layers of 1 ms, E = 2, S = 3, head 0.5, LM head 0.25, embedding 0.1, send 0.05
    # split: [0,2) | [2,4) | [4,6)
    # stage 0: 0.1 + 2 + 0.5 + 0.25 + 0.05 = 2.9; stage 1: 2 + 0.05 = 2.05; stage 2: 2 + 0.25 = 2.25
    costs = stage_costs(1.0, 6, 2, 3, head_s=0.5, lm_head_s=0.25, embed_s=0.1, send_s=0.05)
    assert costs == pytest.approx([2.9, 2.05, 2.25])
    # explicit split [0,2) | [2,5) | [5,6): stage 1 = 3.05, stage 2 = 1.25
    costs = stage_costs(1.0, 6, 2, 3, 0.5, 0.25, 0.1, 0.05, stage_layers=[(0, 2), (2, 5), (5, 6)])
    assert costs == pytest.approx([2.9, 3.05, 1.25])
    # per-layer costs: layers 1..6 ms, E = 3, S = 2 -> stage 0 = 1+2+3 + 0.5 + 0.25 = 6.75, stage 1 = 4+5+6 + 0.25
    assert stage_costs([1, 2, 3, 4, 5, 6], 6, 3, 2, 0.5, 0.25) == pytest.approx([6.75, 15.25])
    with pytest.raises(ValueError, match="stage 0 must hold"):
        stage_costs(1.0, 6, 2, 3, 0.5, 0.25, stage_layers=[(0, 3), (3, 5), (5, 6)])


def test_balanced_split():
    assert balanced_split(1.0, 30, 10, 3) == [(0, 10), (10, 20), (20, 30)]
    # 7 layers over 2 verify stages: the LM-head stage gets the smaller share
    assert balanced_split(1.0, 9, 2, 3, lm_head_s=0.5) == [(0, 2), (2, 6), (6, 9)]
    # uneven layers [E=1): costs 1..8 after stage 0: [2..8] = 2+3+4+5+6+7+8 = 35 over 2 stages ->
    # best cut: [1,6) = 2+3+4+5+6 = 20 vs [6,8) = 7+8 = 15 -> max 20; [1,5) = 14 vs [5,8) = 21 -> 21: cut at 6
    assert balanced_split([1, 2, 3, 4, 5, 6, 7, 8], 8, 1, 3) == [(0, 1), (1, 6), (6, 8)]
    # the slowest verify stage is never worse than any other contiguous split (brute force)
    layers = [1.0, 3.0, 1.0, 2.0, 5.0, 1.0, 1.0, 4.0, 2.0, 1.0]
    split = balanced_split(layers, 10, 2, 4, lm_head_s=0.7, send_s=0.1)
    got = max(stage_costs(layers, 10, 2, 4, 0.0, 0.7, send_s=0.1, stage_layers=split)[1:])
    brute = min(
        max(stage_costs(layers, 10, 2, 4, 0.0, 0.7, send_s=0.1, stage_layers=[(0, 2), (2, a), (a, b), (b, 10)])[1:])
        for a in range(3, 9) for b in range(a + 1, 10)
    )
    assert got == pytest.approx(brute)
    with pytest.raises(ValueError, match="at least 2 stages"):
        balanced_split(1.0, 8, 2, 1)
    with pytest.raises(ValueError, match="exit_layer"):
        balanced_split(1.0, 8, 7, 3)


def test_balanced_exit_layer():
    # N = 12 unit layers, free head/LM head, S = 3: E = 4 gives 4/4/4
    assert balanced_exit_layer(1.0, 12, 3, head_s=0.0, lm_head_s=0.0) == 4
    # head + LM head cost 2 layers on stage 0 (and the LM head 1 on the last): S = 2, N = 12:
    # E = 5 -> stage 0 = 5 + 1 + 1 = 7, stage 1 = 7 + 1 = 8 -> tick 8; E = 6 -> 8 vs 7 -> 8 (tie: deeper wins)
    assert balanced_exit_layer(1.0, 12, 2, head_s=1.0, lm_head_s=1.0) == 6


def test_predict_table():
    rows = predict_table(1.0, 32, head_s=1.0, lm_head_s=0.5, send_s=0.1, alphas=[0.0, 0.8, 1.0], stages_list=[2, 4])
    assert [(r["stages"], r["alpha"]) for r in rows] == [(2, 0.0), (2, 0.8), (2, 1.0), (4, 0.0), (4, 0.8), (4, 1.0)]
    for r in rows:
        assert r["t_ar_s"] == pytest.approx(32.5)
        assert r["tick_s"] == pytest.approx(max(r["stage_s"]))
        assert r["ceiling"] == pytest.approx(32 / r["exit_layer"])
        assert r["ppsd_speedup"] <= r["ideal_speedup"] + 1e-9  # overheads only cost
        if r["alpha"] == 0.0:  # every draft rejected: the pipeline's latency (slightly over T_AR)
            assert r["ppsd_speedup"] == pytest.approx(32.5 / r["latency_s"])
            assert r["eesd_speedup"] < 1.0
        if r["alpha"] == 1.0:
            assert r["ppsd_speedup"] == pytest.approx(r["real_ceiling"])
    two = rows[0]
    # S = 2, N = 32, head 1, LM head 0.5, send 0.1: E = 15 -> stage 0 = 15 + 1 + 0.5 + 0.1 = 16.6,
    # stage 1 = 17 + 0.5 = 17.5 (E = 16 -> 17.6 / 16.5: worse). Round trip = 16.6 - 1.5 (head + LM head, after
    # the send) + 17.5 + 0.1 (feedback) = 32.7, but without polling stage 0 looks only with 2 in flight: 2·16.6
    assert two["exit_layer"] == 15
    assert two["stage_s"] == pytest.approx([16.6, 17.5])
    assert two["latency_s"] == pytest.approx(33.2)
    # exit layers given per stage count
    rows = predict_table(1.0, 32, 1.0, 0.5, 0.1, [0.9], [2, 4], exit_layers={2: 12, 4: 6})
    assert [r["exit_layer"] for r in rows] == [12, 6]
    table = format_table(rows)
    assert table.count("\n") == 3 and "| 4 | 6 |" in table


def test_predict_table_window():
    # stages [4, 4], feedback 4: L = 12; the default window = S = 2 positions -> tick = 12/2 = 6 -> 8/6 at α = 1
    row, = predict_table(1.0, 8, 0.0, 0.0, 0.0, [1.0], [2], exit_layers=4, feedback_s=4.0)
    assert row["tick_s"] == pytest.approx(6.0)
    assert row["ppsd_speedup"] == pytest.approx(8 / 6)
    # 3 in flight: 12/3 = 4 = the slowest stage -> 8/4 = 2
    row, = predict_table(1.0, 8, 0.0, 0.0, 0.0, [1.0], [2], exit_layers=4, feedback_s=4.0, window=3)
    assert row["ppsd_speedup"] == pytest.approx(2.0)


def test_tensor_parallel_baseline():
    # 32 unit layers + LM head 0.5 on 4 devices: 32.5 / 4 = 8.125 compute + (2·32 + 1)·0.01 = 0.65 -> 8.775
    assert tp_ar_time_per_token(1.0, 32, 0.5, 4, 0.01) == pytest.approx(8.775)
    assert tp_ar_time_per_token(1.0, 32, 0.5, 1, 0.01) == pytest.approx(32.5)  # one device: no all-reduce
    row, = predict_table(1.0, 32, 0.0, 0.5, 0.0, [0.5], [4], exit_layers=8, allreduce_s=0.01)
    assert row["t_ar_tp_s"] == pytest.approx(8.775)
    assert row["ppsd_speedup_vs_tp"] == pytest.approx(8.775 / row["ppsd_time_s"])


def test_tensor_parallel_with_measured_shards():
    # a measured 4-way shard of 0.6 (not 1/4 of the unit layer) + two all-reduces of 0.01 per layer:
    # 32 · 0.62 = 19.84, LM head 0.5 / 4 = 0.125, one more all-reduce 0.01 -> 19.975
    assert tp_layer_s(1.0, 4, 0.01, shard_s=0.6) == pytest.approx(0.62)
    assert tp_layer_s(1.0, 4, 0.01) == pytest.approx(0.27)  # the 1/S rule
    assert tp_ar_time_per_token(1.0, 32, 0.5, 4, 0.01, shard_s=0.6) == pytest.approx(19.975)
    rows = predict_table(1.0, 32, 0.0, 0.5, 0.0, [0.5], [2, 4], exit_layers=8, allreduce_s=0.01,
                         tp_shard_s={4: 0.6})
    assert [r["tp_layer_source"] for r in rows] == ["1/S rule", "measured shard"]
    assert rows[1]["t_ar_tp_s"] == pytest.approx(19.975)
    assert rows[0]["t_ar_tp_s"] == pytest.approx(tp_ar_time_per_token(1.0, 32, 0.5, 2, 0.01))
