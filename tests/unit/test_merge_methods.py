"""Merge methods against hand-computed numbers on small tensors."""

from __future__ import annotations

import math

import pytest
import torch

from codiemb.errors import UserError
from codiemb.merge.methods import (
    MERGE_METHODS,
    check_compatible,
    greedy_soup,
    merge_state_dicts,
    slerp_tensors,
    task_vectors,
)

T = torch.tensor


def sd(w, **extra):
    return {"w": T(w, dtype=torch.float32), **extra}


# base θ0 = 1 everywhere; Δ1, Δ2, Δ3 chosen so magnitudes never tie.
BASE = sd([1.0, 1.0, 1.0, 1.0])
D1 = [1.0, -2.0, 3.0, 0.5]
D2 = [2.0, 1.0, -1.0, -4.0]
D3 = [-3.0, 0.5, 2.0, 1.0]
MODELS = [sd([1.0 + d for d in D]) for D in (D1, D2, D3)]


def close(a, b, tol=1e-6):
    return torch.allclose(a, T(b, dtype=a.dtype), atol=tol, rtol=0)


def test_registry_names_and_urls():
    for name in ("uniform_soup", "task_arithmetic", "ties", "dare", "dare_ties", "slerp", "delta_guided"):
        assert name in MERGE_METHODS
        assert MERGE_METHODS[name].paper_url.startswith("https://")


def test_task_vectors():
    tvs = task_vectors(BASE, MODELS)
    assert close(tvs[0]["w"], D1) and close(tvs[2]["w"], D3)


def test_uniform_soup_is_mean_of_models():
    out = merge_state_dicts("uniform_soup", BASE, MODELS)
    # mean of θk = 1 + mean(Δ): mean Δ = [0, -0.5/3, 4/3, -2.5/3]
    assert close(out["w"], [1.0, 1 - 0.5 / 3, 1 + 4 / 3, 1 - 2.5 / 3])


def test_task_arithmetic_weights_and_lambda():
    out = merge_state_dicts("task_arithmetic", BASE, MODELS, weights=[0.5, 1.0, 2.0], lam=0.5)
    # 0.5·Δ1 + Δ2 + 2·Δ3 = [-3.5, 1, 4.5, -1.75]; ×0.5 = [-1.75, 0.5, 2.25, -0.875]; +1
    assert close(out["w"], [-0.75, 1.5, 3.25, 0.125])


def test_uniform_soup_equals_task_arithmetic_with_mean_weights():
    a = merge_state_dicts("uniform_soup", BASE, MODELS)
    b = merge_state_dicts("task_arithmetic", BASE, MODELS, weights=[1 / 3] * 3, lam=1.0)
    assert torch.allclose(a["w"], b["w"], atol=1e-6)


def test_ties_trim_elect_disjoint_mean():
    out = merge_state_dicts("ties", BASE, MODELS, density=0.5, lam=1.0)
    # trim top-2 |Δ|: Δ1 -> [0,-2,3,0]  Δ2 -> [2,0,0,-4]  Δ3 -> [-3,0,2,0]
    # elect sign(sum) = sign([-1,-2,5,-4]) = [-,-,+,-]
    # disjoint mean of agreeing: [-3 (Δ3 only), -2 (Δ1), (3+2)/2, -4 (Δ2)]
    assert close(out["w"], [1 - 3.0, 1 - 2.0, 1 + 2.5, 1 - 4.0])
    # λ scales the merged task vector
    out2 = merge_state_dicts("ties", BASE, MODELS, density=0.5, lam=0.5)
    assert close(out2["w"], [1 - 1.5, 1 - 1.0, 1 + 1.25, 1 - 2.0])


def test_ties_without_normalize_sums_agreeing_entries():
    out = merge_state_dicts("ties", BASE, MODELS, density=0.5, normalize=False)
    assert close(out["w"], [1 - 3.0, 1 - 2.0, 1 + 5.0, 1 - 4.0])


def test_breadcrumbs_drops_outliers_and_small():
    base = sd([0.0] * 10)
    model = sd([float(i) for i in range(1, 11)])
    out = merge_state_dicts("breadcrumbs", base, [model], density=0.5, outliers=0.1)
    # drop the largest 10% (10), keep the next 50% (9..5), zero the rest
    assert close(out["w"], [0, 0, 0, 0, 5, 6, 7, 8, 9, 0])


def test_dare_deterministic_and_rescaled():
    base = sd([0.0] * 64)
    model = sd([float(i % 7 + 1) for i in range(64)])
    a = merge_state_dicts("dare", base, [model], drop_p=0.5, seed=3)
    b = merge_state_dicts("dare", base, [model], drop_p=0.5, seed=3)
    c = merge_state_dicts("dare", base, [model], drop_p=0.5, seed=4)
    assert torch.equal(a["w"], b["w"])
    assert not torch.equal(a["w"], c["w"])
    # every entry is dropped (0) or kept and rescaled by 1/(1-p) = 2
    kept = a["w"] != 0
    assert torch.equal(a["w"][kept], 2 * model["w"][kept])
    assert 10 < int(kept.sum()) < 54
    # density is the same knob as 1 - drop_p
    d = merge_state_dicts("dare", base, [model], density=0.5, seed=3)
    assert torch.equal(a["w"], d["w"])
    with pytest.raises(UserError, match="disagree"):
        merge_state_dicts("dare", base, [model], density=0.3, drop_p=0.5)


def test_dare_unbiased_in_expectation():
    ref = merge_state_dicts("task_arithmetic", BASE, MODELS, weights=[1.0, 0.5, 1.0])
    n = 1500
    acc = torch.zeros(4)
    for seed in range(n):
        acc += merge_state_dicts("dare", BASE, MODELS, weights=[1.0, 0.5, 1.0], drop_p=0.5, seed=seed)["w"]
    mean = acc / n
    # per-entry std of one draw <= sqrt(Σ w²Δ²) ≈ 4.3; over 1500 draws ≈ 0.11 -> 0.5 is > 4 sigma
    assert torch.allclose(mean, ref["w"], atol=0.5)
    assert not torch.allclose(mean, BASE["w"], atol=0.5)


def test_dare_ties_masks_disagreeing_signs():
    base = sd([0.0, 0.0])
    m1, m2 = sd([1.0, -1.0]), sd([3.0, 2.0])
    out = merge_state_dicts("dare_ties", base, [m1, m2], drop_p=0.0)  # no drop: pure sign consensus
    # elect sign([4, 1]) = [+, +]; entry 1: only m2 agrees -> 2; no normalize -> sum
    assert close(out["w"], [4.0, 2.0])


def test_delta_guided_element_hand_example():
    base = sd([0.0, 0.0, 0.0, 0.0])
    m1, m2 = sd([1.0, -2.0, 3.0, 0.0]), sd([3.0, 2.0, -1.0, 0.0])
    g1 = merge_state_dicts("delta_guided", base, [m1, m2], gamma=1.0)
    # w = |Δ|/Σ|Δ|: e0 .25/.75 -> 2.5; e1 .5/.5 -> 0; e2 .75/.25 -> 2; e3 0/0 guarded -> 0
    assert close(g1["w"], [2.5, 0.0, 2.0, 0.0])
    g2 = merge_state_dicts("delta_guided", base, [m1, m2], gamma=2.0, lam=0.5)
    # γ=2: e0 w = 1/10, 9/10 -> 2.8; e2 -> 0.9·3 - 0.1 = 2.6; λ=0.5 halves it
    assert close(g2["w"], [1.4, 0.0, 1.3, 0.0])
    assert torch.isfinite(g2["w"]).all()


def test_delta_guided_gamma0_is_uniform_soup():
    for gran in ("element", "row", "tensor"):
        a = merge_state_dicts("delta_guided", BASE, MODELS, gamma=0.0, granularity=gran)
        b = merge_state_dicts("uniform_soup", BASE, MODELS)
        assert torch.allclose(a["w"], b["w"], atol=1e-6), gran


def test_delta_guided_row_and_tensor_granularity():
    base = {"m": torch.zeros(2, 2)}
    m1 = {"m": T([[3.0, 4.0], [1.0, 0.0]])}
    m2 = {"m": T([[0.0, 1.0], [0.0, 2.0]])}
    row = merge_state_dicts("delta_guided", base, [m1, m2], granularity="row")
    # row L2 norms: m1 (5, 1), m2 (1, 2): row0 w = 5/6, 1/6; row1 w = 1/3, 2/3
    assert close(row["m"], [[2.5, 5 / 6 * 4 + 1 / 6], [1 / 3, 4 / 3]])
    base = {"v": torch.zeros(2)}
    m1, m2 = {"v": T([3.0, 4.0])}, {"v": T([9.0, 12.0])}
    ten = merge_state_dicts("delta_guided", base, [m1, m2], granularity="tensor")
    # tensor norms 5 and 15: w = .25, .75
    assert close(ten["v"], [7.5, 10.0])


def test_slerp_endpoints_midpoint_and_parallel_fallback():
    base = sd([1.0, 1.0])
    a, b = sd([2.0, 1.0]), sd([1.0, 3.0])  # Δ1 = e1, Δ2 = 2·e2 (orthogonal)
    assert close(merge_state_dicts("slerp", base, [a, b], t=0.0)["w"], [2.0, 1.0])
    assert close(merge_state_dicts("slerp", base, [a, b], t=1.0)["w"], [1.0, 3.0])
    mid = merge_state_dicts("slerp", base, [a, b], t=0.5)["w"]
    h = math.sqrt(0.5)  # sin(π/4)/sin(π/2)
    assert close(mid, [1 + h, 1 + 2 * h])
    unit = slerp_tensors(0.5, T([1.0, 0.0]), T([0.0, 1.0]))
    assert close(unit, [h, h]) and abs(float(unit.norm()) - 1) < 1e-6
    par = merge_state_dicts("slerp", base, [a, sd([3.0, 1.0])], t=0.5)["w"]  # Δ2 = 2Δ1 -> lerp
    assert close(par, [2.5, 1.0])
    with pytest.raises(UserError, match="exactly 2"):
        merge_state_dicts("slerp", base, [a])


def test_greedy_soup_hand_example():
    base = sd([0.0])
    models = [sd([1.0]), sd([3.0]), sd([10.0])]
    calls = []

    def score(s):
        calls.append(float(s["w"][0]))
        return -abs(float(s["w"][0]) - 2.2)

    soup, chosen = greedy_soup(base, models, score)
    # individual scores -1.2, -0.8, -7.8 -> order 1, 0, 2; soup{1,0} = 2 (score -0.2) kept;
    # adding 2 gives 14/3 (score -2.47) -> rejected
    assert chosen == [1, 0]
    assert close(soup["w"], [2.0])
    assert merge_state_dicts("greedy_soup", base, models, score_fn=score)["w"].item() == pytest.approx(2.0)


def test_dtypes_and_integer_buffers():
    base = {"w": T([1.0, 2.0], dtype=torch.float16), "pos": torch.arange(3)}
    m1 = {"w": T([3.0, 2.0], dtype=torch.float16), "pos": torch.tensor([7, 7, 7])}
    m2 = {"w": T([1.0, 4.0], dtype=torch.float16), "pos": torch.tensor([9, 9, 9])}
    for name in ("uniform_soup", "task_arithmetic", "ties", "dare", "delta_guided", "slerp"):
        out = merge_state_dicts(name, base, [m1, m2])
        assert out["w"].dtype == torch.float16, name
        assert torch.equal(out["pos"], torch.arange(3)), name
    out = merge_state_dicts("uniform_soup", base, [m1, m2])
    assert close(out["w"].float(), [2.0, 3.0])


def test_mismatch_errors_name_the_tensor_and_model():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(UserError, match=r"model 'sts'.*lacks tensor 'b'"):
        check_compatible(base, [dict(base), {"a": torch.zeros(2)}], names=["ir", "sts"])
    with pytest.raises(UserError, match=r"model 0.*tensor 'b' has shape \(4,\).*\(3,\)"):
        merge_state_dicts("task_arithmetic", base, [{"a": torch.zeros(2), "b": torch.zeros(4)}])
    with pytest.raises(UserError, match=r"has tensor 'c' that the base lacks"):
        merge_state_dicts("ties", base, [{**base, "c": torch.zeros(1)}])
    with pytest.raises(UserError, match=r"unknown merge method 'foo'.*task_arithmetic"):
        merge_state_dicts("foo", base, [base])
    with pytest.raises(UserError, match=r"does not take gamma"):
        merge_state_dicts("ties", base, [base], gamma=1.0)
    with pytest.raises(UserError, match=r"2 merge weights for 1 models"):
        merge_state_dicts("task_arithmetic", base, [base], weights=[1.0, 2.0])
