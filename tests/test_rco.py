"""RCO and its dynamic program against independent computations (autograd, brute force)."""
import itertools

import pytest
import torch

import optimizers
from optimizers import RCO, budget_dp, budget_normal, build_optimizer, retract_, tangent_project
from optimizers.rco import expected_cost, gumbel_straight_through


def _instance(seed, n=6, k=4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=dtype)
    costs = torch.randint(1, 9, (n, k), generator=g).double()
    budget = float(costs.mean(1).sum()) + 0.3
    return logits, costs, budget


def _brute_force(costs, scores, budget):
    n, k = scores.shape
    best, arg = -float("inf"), None
    for x in itertools.product(range(k), repeat=n):
        c = sum(float(costs[i, x[i]]) for i in range(n))
        s = sum(float(scores[i, x[i]]) for i in range(n))
        if c <= budget + 1e-9 and s > best:
            best, arg = s, x
    return best, arg


def test_normal_is_autograd_gradient_of_constraint_and_projection_is_orthogonal():
    logits, costs, _ = _instance(0)
    a = logits.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_cost([a], [costs]), a)
    n = budget_normal(logits, costs)
    torch.testing.assert_close(n, grad, rtol=1e-12, atol=1e-12)
    v = torch.randn_like(logits)
    (t,) = tangent_project([v], [grad])
    assert abs(float((t * grad).sum())) < 1e-12 * float(v.norm() * grad.norm())
    # a tangent vector is left as it is
    (t2,) = tangent_project([t], [grad])
    torch.testing.assert_close(t2, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_retraction_hits_budget_and_moves_along_costs(dtype):
    logits, costs, budget = _instance(1, dtype=dtype)
    a = logits.clone()
    t = retract_([a], [costs], budget)
    assert abs(float(expected_cost([a], [costs])) - budget) <= 1e-6 * budget
    torch.testing.assert_close(a, (logits.double() + t * costs).to(dtype))


def test_step_stays_on_manifold_and_momentum_is_tangent():
    logits, costs, budget = _instance(2, n=8, dtype=torch.float32)
    a = logits.clone().requires_grad_(True)
    opt = RCO([a], costs=costs, budget=budget, lr=0.3)
    target = torch.randn(8, 4, generator=torch.Generator().manual_seed(5))
    for _ in range(25):
        opt.zero_grad()
        loss = ((torch.softmax(a, -1) - target.softmax(-1)) ** 2).sum() + (a ** 3).mean()
        loss.backward()
        opt.step()
        assert abs(opt.expected_cost() - budget) <= 1e-6 * budget
        n = budget_normal(a.detach().double(), costs)
        m = opt.state[a]["exp_avg"].double()
        assert abs(float((m * n).sum())) <= 1e-6 * float(m.norm() * n.norm()) + 1e-12


def test_dp_equals_brute_force():
    for seed in range(6):
        g = torch.Generator().manual_seed(seed)
        n, k = 5, 3 + seed % 2
        costs = torch.randint(0, 7, (n, k), generator=g).double()
        scores = torch.randn(n, k, generator=g, dtype=torch.float64)
        budget = float(costs.min(1).values.sum() + seed * 2 + 1)
        res = budget_dp(costs, scores, budget)
        best, _ = _brute_force(costs, scores, budget)
        assert res.score == pytest.approx(best, abs=1e-12)
        assert res.cost <= budget
        assert float(scores[torch.arange(n), res.choice].sum()) == pytest.approx(res.score)


def test_dp_exact_budget_and_scaled_costs():
    g = torch.Generator().manual_seed(7)
    costs = torch.randint(1, 6, (5, 3), generator=g).double()
    scores = torch.randn(5, 3, generator=g, dtype=torch.float64)
    budget = float(costs[:, 1].sum())  # reachable exactly
    res = budget_dp(costs, scores, budget, exact=True)
    best = max(sum(float(scores[i, x[i]]) for i in range(5))
               for x in itertools.product(range(3), repeat=5)
               if sum(float(costs[i, x[i]]) for i in range(5)) == budget)
    assert res.cost == budget and res.score == pytest.approx(best)
    # fractional costs with a resolution give the same answer as the integer ones
    res2 = budget_dp(costs / 4, scores, budget / 4, exact=True, resolution=4)
    assert torch.equal(res2.choice, res.choice)
    with pytest.raises(ValueError, match="integer costs"):
        budget_dp(costs / 3.7, scores, budget)


def _knapsack(seed, n=6, k=4):
    g = torch.Generator().manual_seed(seed)
    costs = torch.randint(1, 9, (n, k), generator=g).double()
    values = torch.rand(n, k, generator=g, dtype=torch.float64) + costs / 8  # dearer is better
    budget = float(costs.min(1).values.sum() + 0.5 * (costs.max(1).values - costs.min(1).values).sum())
    return costs, values, budget


def test_rco_relaxation_reaches_lp_optimum():
    """On the relaxation max <p, v> s.t. p_n in the simplex, <p, c> = B (a linear program,
    solved independently by scipy) RCO's expected value converges to the LP optimum."""
    from scipy.optimize import linprog
    costs, values, budget = _knapsack(3)
    n, k = values.shape
    a_eq = torch.zeros(n + 1, n * k, dtype=torch.float64)
    for i in range(n):
        a_eq[i, i * k:(i + 1) * k] = 1
    a_eq[n] = costs.flatten()
    lp = linprog(-values.flatten().numpy(), A_eq=a_eq.numpy(),
                 b_eq=[1.0] * n + [budget], bounds=(0, None))
    a = torch.zeros(n, k, requires_grad=True)
    opt = RCO([a], costs=costs, budget=budget, lr=0.1)
    for _ in range(400):
        opt.zero_grad()
        (-(torch.softmax(a, -1) * values).sum()).backward()
        opt.step()
    got = float((torch.softmax(a.detach().double(), -1) * values).sum())
    assert abs(opt.expected_cost() - budget) <= 1e-6 * budget
    assert got == pytest.approx(-lp.fun, rel=2e-3)


def test_rco_gumbel_search_reaches_brute_force_optimum():
    costs, values, budget = _knapsack(11)
    n, k = values.shape
    best, _ = _brute_force(costs, values, budget)
    a = torch.zeros(n, k, requires_grad=True)
    opt = RCO([a], costs=costs, budget=budget, lr=0.05)
    gen = torch.Generator().manual_seed(0)
    seen = -float("inf")
    for step in range(300):
        opt.zero_grad()
        onehot, idx = gumbel_straight_through(a, 0.05 ** (step / 299), gen, costs=costs,
                                              budget=budget)
        assert float(costs[torch.arange(n), idx].sum()) <= budget  # every sample is feasible
        value = (onehot * values).sum()
        seen = max(seen, float(value.detach()))
        (-value).backward()
        opt.step()
    assert seen == pytest.approx(best, rel=1e-12)
    final = budget_dp(costs, torch.log_softmax(a.detach().double(), -1), budget)
    assert final.cost <= budget
    assert float(values[torch.arange(n), final.choice].sum()) >= 0.9 * best


def test_infeasible_budget_and_missing_costs_are_refused():
    a = torch.zeros(3, 4, requires_grad=True)
    costs = torch.tensor([2.0, 3.0, 4.0, 8.0])
    with pytest.raises(ValueError, match=r"infeasible.*\(6.0, 24.0\)"):
        RCO([a], costs=costs, budget=5.0)
    with pytest.raises(ValueError, match="infeasible"):
        RCO([a], costs=costs, budget=24.0)
    with pytest.raises(ValueError, match="needs costs"):
        RCO([a], budget=10.0)
    with pytest.raises(ValueError, match="1 logits tensors but 2 cost tensors"):
        RCO([{"params": [a], "costs": [costs, costs], "budget": 10.0}])
    with pytest.raises(ValueError, match="below the cheapest"):
        budget_dp(costs.expand(3, 4), torch.zeros(3, 4), 5.0)


def test_registry_builds_rco_over_tensors_and_groups():
    assert "rco" in optimizers.OPTIMIZERS
    a = torch.zeros(3, 4, requires_grad=True)
    b = torch.zeros(2, 4, requires_grad=True)
    costs = torch.tensor([2.0, 3.0, 4.0, 8.0])
    opt = build_optimizer([a], "rco", costs=costs, budget=12.0)
    assert isinstance(opt, RCO) and opt.param_groups[0]["lr"] == optimizers.default_lr("rco")
    assert opt.expected_cost() == pytest.approx(12.0, rel=1e-6)
    opt = build_optimizer([{"params": [a, b], "costs": [costs, costs], "budget": 20.0}], "rco",
                          lr=0.01)
    assert opt.expected_cost() == pytest.approx(20.0, rel=1e-6)
    assert "rco" not in optimizers.model_optimizers()
    with pytest.raises(ValueError, match="does not train model parameters"):
        build_optimizer(torch.nn.Linear(2, 2), "rco")
