"""Trigger synthesis (Neural Cleanse): λ scaling, the λ schedule and early stop against a transcription of
Wang et al.'s loop, batched = sequential, pass budgets that do not depend on the machine's load, verdict
status and coverage, and the cost analysis's counts against exact integer arithmetic."""

from __future__ import annotations

import math
import subprocess
import sys
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from testbed.defenses._trigger_search import NCSchedule, ScheduleConfig, mask_penalty
from testbed.defenses.trigger_synthesis import (TriggerSynthesis, candidate_counts, projected_cost,
                                                verdict_status)
from testbed.defense import DefenseContext


# -- λ scaling ---------------------------------------------------------------------------------------------
def test_mask_penalty_is_neural_cleanse_raw_l1():
    # a hand-made 4×4 mask: NC repeats the mask over the 3 colour channels, sums |m| and divides by 3
    m = torch.tensor([[0.0, 0.5, 1.0, 0.25], [0.0, 0.0, 0.75, 0.0], [1.0, 1.0, 0.0, 0.0], [0.5, 0.0, 0.0, 0.0]])
    by_hand = 0.5 + 1.0 + 0.25 + 0.75 + 1.0 + 1.0 + 0.5  # = 5.0
    nc = np.abs(np.repeat(m.numpy()[..., None], 3, axis=2)).sum() / 3
    assert nc == pytest.approx(by_hand)
    got = mask_penalty(m[None, None], 1e-3)
    assert got.shape == (1,) and got.item() == pytest.approx(1e-3 * by_hand, rel=1e-6)
    # the old per-pixel mean was H·W = 16 times weaker at this size (4096× at 64², 262144× at 512²)
    assert got.item() / (1e-3 * m.sum().item() / m.numel()) == pytest.approx(m.numel())
    # one λ per candidate, and d(λ‖m‖₁)/dm = λ on every pixel (a sigmoid mask is positive)
    two = torch.stack([m + 0.1, 2 * m + 0.1])[:, None].requires_grad_()
    pen = mask_penalty(two, torch.tensor([1e-3, 2e-3]))
    np.testing.assert_allclose(pen.detach().numpy(), [1e-3 * (by_hand + 1.6), 2e-3 * (2 * by_hand + 1.6)], rtol=1e-6)
    (g,) = torch.autograd.grad(pen.sum(), two)
    np.testing.assert_allclose(g[:, 0].numpy(), np.stack([np.full((4, 4), 1e-3), np.full((4, 4), 2e-3)]), rtol=1e-6)


# -- the λ schedule and early stop --------------------------------------------------------------------------
def _nc_reference(acc, reg, c: ScheduleConfig):
    """Wang et al.'s ``Visualizer.visualize`` loop (bolunwang/backdoor, visualizer.py), one candidate, as scalars:
    returns the λ used after every step and the number of steps run."""
    cost, reg_best = 0.0, math.inf
    set_c = up_c = down_c = 0
    up_f = down_f = False
    es_c, es_best = 0, math.inf
    costs = []
    for step in range(c.max_steps):
        a, r = acc[step], reg[step]
        if a >= c.success_threshold and r < reg_best:
            reg_best = r
        if reg_best < math.inf:
            es_c = es_c + 1 if reg_best >= c.early_stop_threshold * es_best else 0
        es_best = min(reg_best, es_best)
        if down_f and up_f and es_c >= c.early_stop_patience:
            return costs, step + 1
        if cost == 0 and a >= c.success_threshold:
            set_c += 1
            if set_c >= c.patience:
                cost, up_c, down_c, up_f, down_f = c.init_cost, 0, 0, False, False
        else:
            set_c = 0
        if a >= c.success_threshold:
            up_c, down_c = up_c + 1, 0
        else:
            up_c, down_c = 0, down_c + 1
        if up_c >= c.patience:
            up_c, cost, up_f = 0, cost * c.cost_up, True
        elif down_c >= c.patience:
            down_c, cost, down_f = 0, cost / c.cost_down, True
        costs.append(cost)
    return costs, c.max_steps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nc_schedule_matches_the_reference_loop(seed):
    cfg = ScheduleConfig(init_cost=1e-3, patience=3, cost_up=1.5, cost_down=1.5 ** 1.5, success_threshold=0.99,
                         early_stop=True, early_stop_threshold=0.99, early_stop_patience=6, max_steps=200)
    rng = np.random.default_rng(seed)
    rows = 7
    p_ok = rng.uniform(0.3, 0.95, rows)  # each candidate succeeds at its own rate
    acc = np.where(rng.random((cfg.max_steps, rows)) < p_ok, 1.0, 0.5)
    reg = 4000 * np.exp(-np.linspace(0, 3, cfg.max_steps))[:, None] * rng.uniform(0.9, 1.1, (cfg.max_steps, rows))
    sched = NCSchedule(cfg)
    sched.add(rows)
    alive = np.arange(rows)
    costs = {r: [] for r in range(rows)}
    stopped = {}
    for step in range(cfg.max_steps):
        if not len(alive):
            break
        _, converged, finished = sched.update(acc[step, alive], reg[step, alive])
        for k, r in enumerate(alive):
            if converged[k]:
                stopped[r] = step + 1
            else:
                costs[r].append(float(sched.cost[k]))
        sched.keep(~finished)
        alive = alive[~finished]
    for r in range(rows):
        ref_costs, ref_steps = _nc_reference(acc[:, r], reg[:, r], cfg)
        assert stopped.get(r, cfg.max_steps) == ref_steps, r
        np.testing.assert_allclose(costs[r][: len(ref_costs)], ref_costs, rtol=1e-12)
    assert stopped, "no candidate reached NC's early stop: the comparison did not exercise it"


def test_verdict_status_rules():
    assert verdict_status(True, 3, 11) == "backdoored"  # an outlier among the candidates searched is evidence
    assert verdict_status(False, 3, 11) == "inconclusive"  # never "clean" on a partial search
    assert verdict_status(False, 11, 11) == "clean"
    assert verdict_status(False, 2, 2) == "inconclusive"  # the MAD index has no power on two norms
    assert verdict_status(False, 0, 0) == "inconclusive"


# -- cost analysis -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 4, 11, 150])
def test_search_space_counts_against_exact_integers(k):
    getcontext().prec = 50
    c = candidate_counts(k, 64, 64)
    assert c["image"] == k and c["pairs"] == k * (k - 1)
    assert c["log10_matrices"] == pytest.approx(float(Decimal(k ** k - 1).log10()), rel=1e-12)
    assert c["log10_maps"] == pytest.approx(float(Decimal(k).log10() * 4096), rel=1e-12)


def test_ade20k_target_map_space_exponent():
    # 150^(512·512) = 10^570449.27…: a number with 570 450 digits (docs/defenses.md quotes 10^570 449)
    getcontext().prec = 50
    exact = Decimal(150).log10() * 512 * 512
    c = candidate_counts(150, 512, 512)
    assert int(exact) == 570449 and math.floor(c["log10_maps"]) == 570449
    assert c["log10_maps"] == pytest.approx(float(exact), rel=1e-13)


def test_projection_is_passes_times_candidates_times_seconds_per_pass():
    p = projected_cost(passes_per_candidate=400.0, seconds_per_pass=0.002, num_classes=8, height=10, width=10)
    assert p["image_passes"] == 8 * 400 and p["pairs_passes"] == 56 * 400
    assert p["image_seconds"] == pytest.approx(8 * 400 * 0.002)
    assert p["pairs_seconds"] == pytest.approx(56 * 400 * 0.002)
    assert p["log10_matrices_seconds"] == pytest.approx(math.log10(8 ** 8 - 1) + math.log10(400 * 0.002))
    ade = projected_cost(400.0, 0.002, 150, 512, 512, pixel_scale=512 * 512 / 100)
    assert ade["pairs_seconds"] == pytest.approx(150 * 149 * 400 * 0.002 * 2621.44)
    assert ade["pairs_passes"] == 150 * 149 * 400  # passes do not scale with pixels; seconds do


# -- on a real backdoored model ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def setup(backdoored_run, fgba_line_path):
    from testbed.data.h5data import open_dataset
    from testbed.training.runs import load_run

    with open_dataset(fgba_line_path) as f:
        ci = np.asarray(f["defense/clean_index"], np.int64)
        images, labels = f.read("train/images", ci), f.read("train/labels", ci)
        classes = tuple(f.classes)
    model = load_run(backdoored_run)[0]
    return model, images, labels, classes


@pytest.fixture()
def one_thread():
    """Equality and budget checks do not need threads; one keeps them fast on a shared, loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ctx(setup, **kw):
    _, images, labels, classes = setup
    return DefenseContext(images, labels, classes, torch.device("cpu"), seed=0, image_size=images.shape[1:3], **kw)


def test_batched_equals_sequential(setup, one_thread):
    """Same candidates, same seed: the same verdict, steps and passes; norms and score within 5e-3 (relative).

    The two modes run the same arithmetic per candidate; only the batched kernels' float rounding differs, and it
    accumulates over the steps: under 1e-3 on an Intel Xeon (AVX-512 kernels), 1.1e-3 on one of two norms on an
    AMD EPYC (AVX2 kernels).  A wrong candidate, mask or step count moves them by far more.
    """
    model = setup[0]
    kw = dict(steps=40, batch_size=6, patience=2, early_stop_patience=3, init_cost=1e-2, max_candidates=4)
    seq = TriggerSynthesis(candidate_batch=1, **kw).run(model, _ctx(setup))
    bat = TriggerSynthesis(candidate_batch=4, **kw).run(model, _ctx(setup))
    for key in ("backdoored", "status", "suspected", "coverage"):
        assert getattr(seq.verdict, key) == getattr(bat.verdict, key), key
    assert bat.verdict.score == pytest.approx(seq.verdict.score, rel=5e-3)
    assert seq.details["steps"] == bat.details["steps"] and seq.details["stop_reason"] == bat.details["stop_reason"]
    assert (seq.cost.forward_passes, seq.cost.backward_passes) == (bat.cost.forward_passes, bat.cost.backward_passes)
    assert seq.details["reached"] == bat.details["reached"] and len(seq.details["reached"]) == 4
    a, b = seq.details["norms"], bat.details["norms"]  # the converged candidates' norms (the MAD's input)
    assert list(a) == list(b) and len(a) == sum(seq.details["reached"].values())
    np.testing.assert_allclose([b[k] for k in b], [a[k] for k in a], rtol=5e-3)
    assert "converged" in seq.details["stop_reason"].values()  # NC's early stop was exercised
    curves = seq.details["mask_norm_curves"]
    assert all(len(curves[lab]) == seq.details["steps"][lab] for lab in curves)


def _busy_loop():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_pass_budget_is_independent_of_cpu_load(setup, one_thread):
    model = setup[0]
    # the cheaper per-mini-batch schedule: the hand count below is in its steps
    ts = TriggerSynthesis(schedule="fast", steps=10, batch_size=2, early_stop=False, candidate_batch=4)
    budget = 400
    quiet = ts.run(model, _ctx(setup, budget_passes=budget))
    busy = _busy_loop()
    try:
        loaded = ts.run(model, _ctx(setup, budget_passes=budget))
    finally:
        busy.kill()
        busy.wait()
    for res in (quiet, loaded):
        assert res.details["stopped_by"] == "passes" and res.details["cost"]["stopped_by"] == "passes"
        assert res.verdict.status in ("inconclusive", "backdoored") and res.verdict.coverage == pytest.approx(8 / 11)
    assert quiet.verdict == loaded.verdict
    assert (quiet.cost.forward_passes, quiet.cost.backward_passes) == (loaded.cost.forward_passes, loaded.cost.backward_passes)
    assert quiet.details["norms"] == loaded.details["norms"]
    # by hand: 12 clean predictions + a warm-up forward/backward of 2 images = 16 passes; then 4 candidates at a
    # time, each step 2 images × (forward + backward): two groups of 4 × 10 steps = 320 passes (336 in all);
    # the last 3 candidates cost 12 per step: 5 steps fit under 400 (396), the 6th would not -> abandoned
    assert quiet.details["cost"]["candidates_run"] == 8 and quiet.details["cost"]["candidates_abandoned"] == 3
    assert quiet.cost.forward_passes + quiet.cost.backward_passes == 396


def test_partial_search_is_inconclusive_with_its_coverage(setup, one_thread):
    model = setup[0]
    res = TriggerSynthesis(steps=2, batch_size=2, max_candidates=3, anomaly_threshold=1e9).run(model, _ctx(setup))
    k = len(setup[3])
    assert res.verdict.status == "inconclusive" and not res.verdict.backdoored
    assert res.verdict.coverage == pytest.approx(3 / k) and res.details["coverage"] == pytest.approx(3 / k)
    full = TriggerSynthesis(steps=2, batch_size=2, anomaly_threshold=1e9).run(model, _ctx(setup))
    # a full search is "clean" when nothing is flagged, but only with at least 3 converged candidates (the MAD's
    # input); two epochs may leave most candidates unconverged
    converged = sum(full.details["reached"].values())
    assert full.verdict.status == ("clean" if converged >= 3 else "inconclusive") and full.verdict.coverage == 1.0


@pytest.mark.parametrize("bad", [dict(targets="maps"), dict(steps=0), dict(candidate_batch=0), dict(max_candidates=0),
                                 dict(lr=0), dict(cost_up=1.0), dict(success_threshold=1.5), dict(batch_size=2.5)])
def test_bad_parameters_raise_value_error(bad):
    ts = TriggerSynthesis(**bad)  # scikit-learn's convention: the constructor only stores
    with pytest.raises(ValueError, match=rf"\b{next(iter(bad))} must be"):
        ts.check_params()
