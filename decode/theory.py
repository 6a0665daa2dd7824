"""What speedup PPSD and EESD should reach, from per-stage costs (pure functions, no torch).

Terms: N decoder layers, exit layer E (the head reads the hidden state after
layers [0, E)), S pipeline stages, α the acceptance rate, γ the EESD draft length, T_AR one AR step.

PPSD: every output token costs one pipeline tick (the slowest stage) when its draft was accepted and
the full latency of one position through every stage plus the feedback to stage 0 when it was not:

    time per token = α·tick + (1 − α)·L,   tick = max_i τ_i,   L = Σ_i τ_i + feedback.

The decoder sends h_E before it runs the exit head, so L leaves out the head part of τ₀ (`head_s`), and
a finite window of positions in flight can raise both the tick and L (`ppsd_tick`, `ppsd_flush_latency`).

EESD (draft γ tokens with the shallow model, verify γ + 1 positions with the full model):

    time per token = (γ·draft + verify(γ + 1)) / E[tokens per round],   E[tokens] = (1 − α^{γ+1}) / (1 − α).

The cost model (`stage_costs`) puts the embedding, layers [0, E), the exit head, the LM head (stage 0
computes the draft token) and a send on stage 0; layers [E, N) split across stages 1..S−1, each with
a send, and the final norm + LM head on the last stage. All times are seconds (any unit works, as long
as it is the same everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from decode.stage_layers import check_stage_layers

VerifyCost = Callable[[int], float] | Mapping[int, float]


# --- PPSD ---------------------------------------------------------------------------------------

def ppsd_tick(stage_s: Sequence[float], feedback_s: float = 0.0, window: int | None = None,
              head_s: float = 0.0) -> float:
    """Time between two accepted tokens: the slowest stage, or L / window when at most `window` positions
    may be in flight (a position holds its slot for one round trip, `ppsd_round_trip`, so W in flight
    give at most W positions per round trip; with W >= S that binds only when the feedback or an
    imbalance makes the round trip longer than W·max τ)."""
    if not stage_s:
        raise ValueError("stage_s is empty: a pipeline has at least one stage")
    tick = max(stage_s)
    if window:
        tick = max(tick, ppsd_round_trip(stage_s, feedback_s, head_s) / window)
    return tick


def ppsd_round_trip(stage_s: Sequence[float], feedback_s: float = 0.0, head_s: float = 0.0) -> float:
    """From stage 0 starting a position to its verdict arriving back: Σ τ + feedback, less the part of
    stage 0's τ₀ that runs after h_E is sent (`head_s`: exit head + LM head, off the verification path)."""
    if not 0 <= head_s <= stage_s[0]:
        raise ValueError(f"head_s={head_s} must be within stage 0's cost {stage_s[0]}")
    return sum(stage_s) - head_s + feedback_s


def ppsd_flush_latency(stage_s: Sequence[float], feedback_s: float = 0.0, window: int | None = None,
                       head_s: float = 0.0, poll: bool = True) -> float:
    """Time from one restart of stage 0 to the next after a rejected draft.

    The verdict arrives one round trip R after the restart (`ppsd_round_trip`); stage 0 acts on it at the
    first point it looks. Meanwhile it keeps drafting: position j occupies [j·τ₀, (j+1)·τ₀), its layers
    first, its head (`head_s`) last. With `poll` (gloo: a reader thread) it looks after every layers part
    and every head, and waits once `window` positions are in flight; without (NCCL here) it looks only
    when `window` positions are in flight. `window` None: it is always looking (the design's L = R).
    """
    latency = ppsd_round_trip(stage_s, feedback_s, head_s)
    if not window:
        return latency
    tau0, layers = stage_s[0], stage_s[0] - head_s
    if latency >= window * tau0:  # stage 0 is already waiting when the verdict arrives
        return latency
    if not poll:
        return window * tau0
    looks = sorted(t for j in range(window) for t in (j * tau0 + layers, (j + 1) * tau0))
    return next(t for t in looks if t >= latency)


def ppsd_time_per_token(alpha: float, stage_s: Sequence[float], feedback_s: float = 0.0,
                        window: int | None = None, head_s: float = 0.0, poll: bool = True) -> float:
    """α·tick + (1 − α)·L with tick = max(stage_s) and L = sum(stage_s) + feedback_s (− head_s).

    window: the most positions in flight (None = unlimited, the design's formula); it can only raise the
    tick (`ppsd_tick`) and the flush latency (`ppsd_flush_latency`). head_s: the part of stage 0's cost
    after it sends h_E (0 = the design's L, where stage 0's whole τ₀ precedes the send).
    """
    _check_alpha(alpha)
    tick = ppsd_tick(stage_s, feedback_s, window, head_s)
    return alpha * tick + (1 - alpha) * ppsd_flush_latency(stage_s, feedback_s, window, head_s, poll)


def ppsd_speedup(alpha: float, stage_s: Sequence[float], t_ar: float, feedback_s: float = 0.0,
                 window: int | None = None, head_s: float = 0.0, poll: bool = True) -> float:
    """T_AR / PPSD time per token."""
    return t_ar / ppsd_time_per_token(alpha, stage_s, feedback_s, window, head_s, poll)


def ideal_ppsd_speedup(alpha: float, num_layers: int, exit_layer: int) -> float:
    """N / (αE + (1 − α)N): balanced stages of E layers, free head, LM head and communication.

    1 at α = 0 (every token pays the whole model), N/E at α = 1 (one stage per token): the ceiling set by
    the exit position.
    """
    _check_alpha(alpha)
    if not 0 < exit_layer <= num_layers:
        raise ValueError(f"exit_layer={exit_layer} must be in 1..{num_layers}")
    return num_layers / (alpha * exit_layer + (1 - alpha) * num_layers)


# --- EESD ---------------------------------------------------------------------------------------

def expected_tokens_per_round(alpha: float, gamma: int) -> float:
    """(1 − α^{γ+1}) / (1 − α): accepted drafts plus the model's own token, i.i.d. acceptance (γ+1 at α=1)."""
    _check_alpha(alpha)
    if gamma < 0:
        raise ValueError(f"gamma={gamma} must be >= 0")
    if alpha == 1:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def verify_cost(verify_s: VerifyCost, positions: int) -> float:
    """The cost of verifying `positions` positions: a callable, or a dict measured per position count."""
    if callable(verify_s):
        return float(verify_s(positions))
    if positions not in verify_s:
        raise ValueError(f"no verify cost for {positions} positions (have {sorted(verify_s)})")
    return float(verify_s[positions])


def eesd_time_per_token(alpha: float, gamma: int, draft_s: float, verify_s: VerifyCost) -> float:
    """(γ·draft_s + verify_s(γ + 1)) / expected tokens per round."""
    cost = gamma * draft_s + verify_cost(verify_s, gamma + 1)
    return cost / expected_tokens_per_round(alpha, gamma)


def eesd_speedup(alpha: float, gamma: int, draft_s: float, verify_s: VerifyCost, t_ar: float) -> float:
    """T_AR / EESD time per token."""
    return t_ar / eesd_time_per_token(alpha, gamma, draft_s, verify_s)


def best_eesd_gamma(alpha: float, draft_s: float, verify_s: VerifyCost, t_ar: float,
                    gammas: Sequence[int] = range(1, 9)) -> int:
    """The draft length with the highest predicted EESD speedup (the smallest one on ties)."""
    gammas = list(gammas)
    if not gammas:
        raise ValueError("gammas is empty")
    return max(gammas, key=lambda g: (eesd_speedup(alpha, g, draft_s, verify_s, t_ar), -g))


# --- the stage-cost model -----------------------------------------------------------------------

def per_layer(layer_s: Sequence[float] | float, num_layers: int) -> list[float]:
    """Per-layer costs: a single number means every layer costs the same."""
    if isinstance(layer_s, (int, float)):
        return [float(layer_s)] * num_layers
    layer_s = [float(x) for x in layer_s]
    if len(layer_s) != num_layers:
        raise ValueError(f"layer_s has {len(layer_s)} costs but the model has {num_layers} layers")
    return layer_s


def stage_costs(layer_s: Sequence[float] | float, num_layers: int, exit_layer: int, stages: int,
                head_s: float, lm_head_s: float, embed_s: float = 0.0, send_s: float = 0.0,
                stage_layers: Sequence[tuple[int, int]] | None = None) -> list[float]:
    """τ_i for each stage, one position each.

    Stage 0: embedding + layers [0, E) + exit head + LM head (it computes the draft token) + send.
    Middle stages: their layers + send. Last stage: its layers + final norm/LM head (its verified token
    goes back to stage 0; that feedback is `feedback_s` of `ppsd_time_per_token`, not counted here).
    `stage_layers` = one (start, end) per stage; default `balanced_split`.
    """
    layers = per_layer(layer_s, num_layers)
    if stage_layers is None:
        stage_layers = balanced_split(layers, num_layers, exit_layer, stages, lm_head_s=lm_head_s, send_s=send_s)
    check_stage_layers(stage_layers, num_layers, exit_layer, stages)
    costs = []
    for i, (start, end) in enumerate(stage_layers):
        cost = sum(layers[start:end])
        if i == 0:
            cost += embed_s + head_s + lm_head_s
        if i == stages - 1:
            cost += lm_head_s
        else:
            cost += send_s
        costs.append(cost)
    return costs


def balanced_split(layer_s: Sequence[float] | float, num_layers: int, exit_layer: int, stages: int,
                   lm_head_s: float = 0.0, send_s: float = 0.0) -> list[tuple[int, int]]:
    """Stage 0 = [0, E); layers [E, N) split into S − 1 contiguous ranges minimising the slowest stage.

    The slowest-stage cost counts what `stage_costs` counts on stages 1..S−1 (a send on every stage but
    the last, the LM head on the last), so with equal layers the extra layers go to the earlier stages.
    This is the split every PPSD stage layout uses (decode/ takes it from here).
    """
    layers = per_layer(layer_s, num_layers)
    if stages < 2:
        raise ValueError(f"stages={stages}: a PPSD pipeline has at least 2 stages (stage 0 drafts, the rest verify)")
    if not 1 <= exit_layer <= num_layers - (stages - 1):
        raise ValueError(f"exit_layer={exit_layer} leaves {num_layers - exit_layer} layers for {stages - 1} "
                         f"verify stages: pick exit_layer in 1..{num_layers - (stages - 1)}")
    rest = stages - 1
    prefix = [0.0]
    for x in layers:
        prefix.append(prefix[-1] + x)

    def cost(start: int, end: int, last: bool) -> float:
        return prefix[end] - prefix[start] + (lm_head_s if last else send_s)

    # best[k][j] = (slowest stage, cut points) splitting layers [j, N) into k stages.
    n = num_layers
    best: dict[tuple[int, int], tuple[float, list[int]]] = {}
    for j in range(exit_layer, n):
        best[1, j] = (cost(j, n, True), [])
    for k in range(2, rest + 1):
        for j in range(exit_layer, n - k + 1):
            options = []
            for cut in range(j + 1, n - k + 2):
                tail, cuts = best[k - 1, cut]
                # ties: prefer the later cut (earlier stages get the extra layer, the last one has the LM head)
                options.append((max(cost(j, cut, False), tail), -cut, [cut] + cuts))
            slowest, _, cuts = min(options, key=lambda o: (o[0], o[1]))
            best[k, j] = (slowest, cuts)
    bounds = [0, exit_layer] + best[rest, exit_layer][1] + [n]
    return [(bounds[i], bounds[i + 1]) for i in range(stages)]


def balanced_exit_layer(layer_s: Sequence[float] | float, num_layers: int, stages: int, head_s: float,
                        lm_head_s: float, embed_s: float = 0.0, send_s: float = 0.0) -> int:
    """The exit layer for which stage 0 balances the verify stages: the smallest tick, the deepest E on ties.

    (Deeper exits accept more drafts, so among equally fast layouts the deepest is the one to use.)
    """
    def tick(e: int) -> float:
        return max(stage_costs(layer_s, num_layers, e, stages, head_s, lm_head_s, embed_s, send_s))

    candidates = range(1, num_layers - (stages - 1) + 1)
    return min(candidates, key=lambda e: (round(tick(e), 12), -e))


def ar_time_per_token(layer_s: Sequence[float] | float, num_layers: int, lm_head_s: float, embed_s: float = 0.0) -> float:
    """One AR step on one device: embedding + every layer + final norm/LM head."""
    return embed_s + sum(per_layer(layer_s, num_layers)) + lm_head_s


def tp_layer_s(layer_s: float, devices: int, allreduce_s: float, shard_s: float | None = None) -> float:
    """One layer of AR tensor-parallel over `devices`: its S-way shard (heads and MLP split S ways) plus the two
    all-reduces of its output (attention, MLP). `shard_s`: the shard's measured cost; without it, the 1/S rule
    (the whole layer's memory-bound cost divided by S), which the host's fixed cost per call makes optimistic
    (docs/theory.md has the measured shards)."""
    if devices == 1:
        return layer_s
    return (layer_s / devices if shard_s is None else shard_s) + 2 * allreduce_s


def tp_ar_time_per_token(layer_s: Sequence[float] | float, num_layers: int, lm_head_s: float, devices: int,
                         allreduce_s: float, embed_s: float = 0.0, shard_s: float | None = None) -> float:
    """AR tensor-parallel over `devices` (the fair baseline for S GPUs): every layer at `tp_layer_s` (its
    measured shard cost `shard_s`, or the 1/S rule) and the vocab-split LM head at 1/S plus one all-reduce,
    each all-reduce a latency-bound `allreduce_s`."""
    if devices == 1:
        return ar_time_per_token(layer_s, num_layers, lm_head_s, embed_s)
    layers = sum(tp_layer_s(s, devices, allreduce_s, shard_s) for s in per_layer(layer_s, num_layers))
    return embed_s / devices + layers + lm_head_s / devices + allreduce_s


# --- the prediction table -----------------------------------------------------------------------

def predict_table(layer_s: Sequence[float] | float, num_layers: int, head_s: float, lm_head_s: float, send_s: float,
                  alphas: Sequence[float], stages_list: Sequence[int] = range(2, 9),
                  exit_layers: int | Sequence[int] | Mapping[int, int] | None = None, *,
                  embed_s: float = 0.0, feedback_s: float | None = None, verify_batch_slope: float = 0.0,
                  gammas: Sequence[int] = range(1, 9), window: int | None = None,
                  allreduce_s: float | None = None, tp_shard_s: Mapping[int, float] | None = None,
                  poll: bool = False) -> list[dict]:
    """Predicted PPSD and EESD speedups over single-device AR, one row per (stages, α).

    exit_layers: one E for all, one per entry of stages_list, {stages: E}, or None (`balanced_exit_layer`).
    feedback_s: last stage -> stage 0 (default one `send_s`). window: positions in flight (default S, what
    the decoder keeps in flight on GPUs; see `ppsd_tick`). poll: whether stage 0 looks for verdicts between
    steps (the gloo decoder does; on NCCL it waits for one only when the window is full: the default).
    EESD uses the same exit layer and head: a draft costs embedding + [0, E) + head + LM head; verifying k
    positions costs one full-model step scaled by (1 + verify_batch_slope·(k − 1)) (0 = memory-bound:
    k ≤ 9 positions cost what one does, the batch-1 GPU case). Its γ is the best of `gammas` per row.
    allreduce_s: also compare with AR tensor-parallel over the same S devices (`tp_ar_time_per_token`):
    rows get t_ar_tp_s, ppsd_speedup_vs_tp and tp_layer_source. tp_shard_s: {S: one layer's S-way shard,
    measured}; an S without one uses the 1/S rule.
    Each row: stages, exit_layer, alpha, stage_s, tick_s, latency_s, t_ar_s, ppsd_time_s, ppsd_speedup,
    ideal_speedup (N/(αE+(1−α)N)), ceiling (N/E), real_ceiling (T_AR/tick), eesd_gamma, eesd_speedup
    (decode.measure.format_table writes them as a Markdown table).
    """
    layers = per_layer(layer_s, num_layers)
    feedback_s = send_s if feedback_s is None else feedback_s
    t_ar = ar_time_per_token(layers, num_layers, lm_head_s, embed_s)
    rows = []
    for index, stages in enumerate(stages_list):
        exit_layer = (balanced_exit_layer(layers, num_layers, stages, head_s, lm_head_s, embed_s, send_s)
                      if exit_layers is None else _exit_layer_for(exit_layers, index, stages))
        stage_s = stage_costs(layers, num_layers, exit_layer, stages, head_s, lm_head_s, embed_s, send_s)
        draft_s = embed_s + sum(layers[:exit_layer]) + head_s + lm_head_s
        pipe = (stage_s, feedback_s, window or stages, head_s + lm_head_s)  # stage 0 sends h_E before its head

        def verify_s(k: int) -> float:
            return t_ar * (1 + verify_batch_slope * (k - 1))

        for alpha in alphas:
            gamma = best_eesd_gamma(alpha, draft_s, verify_s, t_ar, gammas)
            rows.append({
                "stages": stages, "exit_layer": exit_layer, "alpha": alpha, "stage_s": stage_s,
                "tick_s": ppsd_tick(*pipe),
                "latency_s": ppsd_flush_latency(*pipe, poll=poll),
                "t_ar_s": t_ar, "ppsd_time_s": ppsd_time_per_token(alpha, *pipe, poll=poll),
                "ppsd_speedup": ppsd_speedup(alpha, stage_s, t_ar, *pipe[1:], poll=poll),
                "ideal_speedup": ideal_ppsd_speedup(alpha, num_layers, exit_layer),
                "ceiling": num_layers / exit_layer,
                "real_ceiling": t_ar / ppsd_tick(*pipe),
                "eesd_gamma": gamma, "eesd_speedup": eesd_speedup(alpha, gamma, draft_s, verify_s, t_ar),
            })
            if allreduce_s is not None:
                shard_s = (tp_shard_s or {}).get(stages)
                t_tp = tp_ar_time_per_token(layers, num_layers, lm_head_s, stages, allreduce_s, embed_s, shard_s)
                rows[-1] |= {"t_ar_tp_s": t_tp, "ppsd_speedup_vs_tp": t_tp / rows[-1]["ppsd_time_s"],
                             "tp_layer_source": "1/S rule" if shard_s is None else "measured shard"}
    return rows


def _exit_layer_for(exit_layers: int | Sequence[int] | Mapping[int, int], index: int, stages: int) -> int:
    """predict_table's E for the index-th stage count: one for all, one per entry, or {stages: E}."""
    if isinstance(exit_layers, int):
        return exit_layers
    return exit_layers[stages] if isinstance(exit_layers, Mapping) else exit_layers[index]


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1 or math.isnan(alpha):
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
