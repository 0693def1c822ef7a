"""BandMF noise (regularizers/dp/bandmf.py, cyclic_poisson.py) against jax-privacy's
matrix_factorization (the reference implementation, CPU JAX, test-only), float64 matrix
algebra, and Google's dp_accounting."""
import io
import math

import numpy as np
import pytest
import torch

import jax  # the `test` extra installs jax-privacy (and CPU jax): a test-only oracle
jax.config.update("jax_enable_x64", True)
from jax_privacy.matrix_factorization import toeplitz  # noqa: E402

import dp_accounting  # noqa: E402
from dp_accounting.pld import PLDAccountant  # noqa: E402

from regularizers.dp.bandmf import (BandedNoise, _loss_and_grad, bsr_coefs,  # noqa: E402
                                    minsep_sensitivity, sensitivity, strategy, workload_coefs)
from regularizers.dp.cyclic_poisson import (accounting_params, bandmf_epsilon,  # noqa: E402
                                            calibrate_bandmf_sigma, charges,
                                            cyclic_poisson_batch, partition_sample_rate,
                                            partitions, participations)
from toolkit.seeding import generator  # noqa: E402

DELTA = 1e-5


def lower_toeplitz(c, n):
    col = np.zeros(n)
    col[:min(n, len(c))] = np.asarray(c, dtype=np.float64)[:n]
    return np.array([[col[i - j] if i >= j else 0.0 for j in range(n)] for i in range(n)])


@pytest.mark.parametrize("bands", [1, 2, 3, 4, 8, 16])
def test_bsr_equals_jax_privacy_square_root(bands):
    ref = np.asarray(toeplitz.optimal_max_error_strategy_coefs(bands))
    np.testing.assert_allclose(bsr_coefs(bands), ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(strategy("bsr", bands), ref / np.linalg.norm(ref), atol=1e-12)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9])
def test_bsr_is_the_workload_square_root_cut_to_bands(momentum):
    """R R equals the momentum workload on its first b rows (the band cut leaves them
    alone) and r is Kalinin & Lampert's closed form: (|binom(-1/2, j)|) conv (beta^j ...)."""
    b = 7
    r = bsr_coefs(b, momentum)
    R = lower_toeplitz(r, b)
    np.testing.assert_allclose(R @ R, lower_toeplitz(workload_coefs(b, momentum), b), atol=1e-12)
    half = np.array([abs(math.comb(2 * j, j)) / 4 ** j for j in range(b)])  # |binom(-1/2, j)|
    closed = np.convolve(half, half * momentum ** np.arange(b))[:b]
    np.testing.assert_allclose(r, closed, atol=1e-12)
    with pytest.raises(ValueError, match="momentum"):
        workload_coefs(4, 1.0)


@pytest.mark.parametrize("n,bands", [
    (200, 8), *[pytest.param(n, b, marks=pytest.mark.slow)
                for n, b in [(64, 4), (801, 2), (1000, 16), (16, 16), (2000, 8), (4096, 32)]]])
def test_optimized_equals_jax_privacy(n, bands):
    ref = np.asarray(toeplitz.optimize_banded_toeplitz(n, bands, max_optimizer_steps=500))
    ours = strategy("optimized", bands, n)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)
    assert float(toeplitz.loss(ours, n)) <= float(toeplitz.loss(ref, n)) * (1 + 1e-9)
    # and it beats the banded square root it starts from, on jax-privacy's own loss
    assert float(toeplitz.loss(ours, n)) < float(toeplitz.loss(strategy("bsr", bands), n))


def test_loss_and_gradient_match_jax_privacy():
    rng = np.random.default_rng(0)
    for n, b, beta in [(40, 5, 0.0), (40, 5, 0.9), (7, 3, 0.0)]:
        c = np.sort(rng.uniform(0.1, 1.0, b))[::-1].copy()
        a = workload_coefs(n, beta)
        loss, grad = _loss_and_grad(c, a)
        if beta == 0:
            assert loss == pytest.approx(float(toeplitz.loss(c, n)), rel=1e-12)
            ref = np.asarray(jax.grad(lambda v, n=n: toeplitz.loss(v, n))(c))
            np.testing.assert_allclose(grad, ref, rtol=1e-9)
        fd = [(_loss_and_grad(c + e, a)[0] - _loss_and_grad(c - e, a)[0]) / 2e-6
              for e in np.eye(b) * 1e-6]
        np.testing.assert_allclose(grad, fd, rtol=1e-5)


@pytest.mark.parametrize("case", [
    0, *[pytest.param(i, marks=pytest.mark.slow) for i in (1, 2)]])
def test_sensitivity_equals_jax_privacy(case):
    c, n = [(bsr_coefs(5), 30), (strategy("optimized", 4, 64), 64), (bsr_coefs(8), 5)][case]
    assert sensitivity(c, n) == pytest.approx(
        math.sqrt(float(toeplitz.sensitivity_squared(c, n))), abs=1e-12)
    assert sensitivity(c, n) == pytest.approx(np.linalg.norm(lower_toeplitz(c, n), axis=0).max())
    for sep, k in [(len(c), 3), (2, 4), (1, 2), (3, 100)]:
        ref = math.sqrt(float(toeplitz.minsep_sensitivity_squared(
            c, min_sep=sep, max_participations=k, n=n)))
        assert minsep_sensitivity(c, n, sep, k) == pytest.approx(ref, abs=1e-9)


def test_one_example_participations_are_disjoint_blocks_of_norm_at_most_sens():
    """Thm. 4's premise, checked on the materialized C: under cyclic sampling an example of
    partition k joins steps k, k+b, ...; the columns of C at those steps have disjoint
    supports (so C G's change is orthogonal per participation) and norms <= sens(C).
    Two bands short of the separation, they overlap: the check can fail."""
    n, b = 26, 4
    C = lower_toeplitz(strategy("optimized", b, n), n)
    sens = sensitivity(strategy("optimized", b, n), n)
    for k in range(b):
        cols = C[:, k::b]
        gram = cols.T @ cols
        assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-15)
        assert np.sqrt(np.diag(gram)).max() <= sens * (1 + 1e-12)
        assert np.linalg.norm(cols.sum(1)) <= sens * math.sqrt(participations(n, b)) + 1e-12
    close = C[:, 0::b - 1].T @ C[:, 0::b - 1]
    assert np.abs(close - np.diag(np.diag(close))).max() > 0.01


def run_noise(coefs, numel, steps, seed=0, dtype=torch.float64, std=1.0):
    gen = BandedNoise(coefs, numel, dtype=dtype)
    return torch.stack([gen(std, generator(seed, t)) for t in range(steps)]), gen


def test_noise_is_c_inverse_of_the_same_draws():
    """Exactly: C X = Z, where Z are the draws the generator made (same per-step seeds)."""
    c = strategy("optimized", 4, 50)
    X, _ = run_noise(c, 1000, 12)
    Z = torch.stack([torch.normal(0.0, 1.0, (1000,), generator=generator(0, t),
                                  dtype=torch.float64) for t in range(12)])
    C = torch.from_numpy(lower_toeplitz(c, 12))
    torch.testing.assert_close(C @ X, Z, rtol=0, atol=1e-12)
    ref = np.asarray(toeplitz.inverse_as_streaming_matrix(c) @ jax.numpy.asarray(Z.numpy()))
    np.testing.assert_allclose(X.numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_covariance_is_c_inverse_c_inverse_transpose(dtype):
    """Black box: the empirical T x T covariance over 40k coordinates of the released noise
    is C^-1 C^-T (each entry within 5 standard errors), whitening by C leaves I, and the
    correlation is large enough that independent noise would fail the same check."""
    T, N, std = 10, 40_000, 2.0
    c = strategy("bsr", 3)
    X, _ = run_noise(c, N, T, seed=3, dtype=dtype, std=std)
    X = X.double() / std
    emp = (X @ X.T / N).numpy()
    Cinv = np.linalg.inv(lower_toeplitz(c, T))
    cov = Cinv @ Cinv.T
    se = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / N)
    assert np.all(np.abs(emp - cov) < 5 * se), np.abs(emp - cov).max()
    W = lower_toeplitz(c, T) @ X.numpy()
    assert np.abs(W @ W.T / N - np.eye(T)).max() < 5 * math.sqrt(2 / N)
    off = cov - np.diag(np.diag(cov))
    assert np.abs(off).max() > 20 * se.max()  # independent noise would miss by far


def test_one_band_is_plain_dpsgd_noise():
    """bands=1: the same vector DP-SGD's noisy_mean_ writes for the same generator."""
    from regularizers.dp.mechanism import noisy_mean_
    for kind in ("bsr", "optimized"):
        c = strategy(kind, 1, 10)
        assert list(c) == [1.0]
        p = torch.nn.Parameter(torch.zeros(300))
        noisy_mean_([p], [torch.zeros(300)], 1.7, 1.0, generator=generator(5, 2))
        got = BandedNoise(c, 300)(1.7, generator(5, 2))
        assert torch.equal(got, p.grad)


def test_resume_from_state_dict_is_exact():
    c = strategy("bsr", 4)
    full, _ = run_noise(c, 500, 11, seed=9, dtype=torch.float32)
    first = BandedNoise(c, 500)
    for t in range(6):
        first(1.0, generator(9, t))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = BandedNoise(c, 500)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    rest = torch.stack([resumed(1.0, generator(9, t)) for t in range(6, 11)])
    assert torch.equal(rest, full[6:])
    with pytest.raises(ValueError, match="coefficients differ"):
        BandedNoise(strategy("bsr", 3), 500).load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match="same model"):
        BandedNoise(c, 400).load_state_dict(first.state_dict())


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="bands"):
        strategy("bsr", 0)
    with pytest.raises(ValueError, match="choose one of"):
        strategy("toeplitz", 2)
    with pytest.raises(ValueError, match="needs n"):
        strategy("optimized", 2)
    with pytest.raises(ValueError, match="c_0 > 0"):
        BandedNoise([0.0, 1.0], 10)
    with pytest.raises(ValueError, match="float32 or float64"):
        BandedNoise([1.0], 10, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="parameters' device"):
        BandedNoise([1.0], 10, device="meta")(1.0, torch.Generator())
    with pytest.raises(ValueError, match="partitions"):
        partitions(3, 4, seed=0)
    with pytest.raises(ValueError, match="fewer bands"):
        partition_sample_rate(300, 1000, 4)


def test_cyclic_poisson_is_b_min_separated_poisson_on_fixed_partitions():
    N, b, q, T = 1003, 4, 0.3, 40
    parts = partitions(N, b, seed=1)
    allidx = torch.cat(parts)
    assert sorted(allidx.tolist()) == list(range(N))
    # i.i.d. uniform parts: sizes Binomial(N, 1/b), every other example's part unchanged
    # when the last one is removed (add/remove leaves the rest of the split alone)
    assert all(abs(len(p) - N / b) < 4 * math.sqrt(N / b) for p in parts)
    fewer = partitions(N - 1, b, seed=1)
    assert all(torch.equal(p[p < N - 1], r) for p, r in zip(parts, fewer))
    assert all(torch.equal(p, r) for p, r in zip(parts, partitions(N, b, seed=1)))
    last = {}
    counts = torch.zeros(N)
    for t in range(T):
        batch = cyclic_poisson_batch(parts, t, q, seed=2)
        assert set(batch.tolist()) <= set(parts[t % b].tolist())
        assert torch.equal(batch, cyclic_poisson_batch(parts, t, q, seed=2))
        for i in batch.tolist():
            assert t - last.get(i, -b) >= b
            last[i] = t
        counts[batch] += 1
    assert counts.max() <= participations(T, b)
    # inclusion rate per example = q (binomial over T/b = 10 draws x 1003 examples)
    draws = N * T / b
    assert counts.sum() / draws == pytest.approx(q, abs=4 * math.sqrt(q * (1 - q) / draws))
    assert [charges(t, b) for t in range(6)] == [True, False, False, False, True, False]


def pld_epsilon(sigma, q, steps):
    acc = PLDAccountant(value_discretization_interval=1e-4)
    acc.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps))
    return float(acc.get_epsilon(DELTA))


@pytest.mark.parametrize("kind,bands,steps,sigma,q", [
    ("bsr", 4, 1000, 3.0, 0.02), ("optimized", 2, 801, 3.0, 0.05),
    *[pytest.param(*a, marks=pytest.mark.slow)
      for a in [("bsr", 1, 300, 1.0, 0.05), ("optimized", 8, 2000, 4.0, 0.1)]]])
def test_epsilon_equals_independent_pld_on_the_partition_dpsgd(kind, bands, steps, sigma, q):
    """dp_accounting's PLD on the Poisson subsampled Gaussian with sigma / ||c||, q and
    ceil(steps / b) compositions; our PRV upper bound sits within 0.02 above it."""
    c = strategy(kind, bands, steps) * 2.5  # an unnormalized C: sens 2.5
    s_eff, q_eff, k = accounting_params(sigma, q, steps, c)
    assert (s_eff, q_eff, k) == (pytest.approx(sigma / 2.5), q, math.ceil(steps / bands))
    ref = pld_epsilon(sigma / 2.5, q, math.ceil(steps / bands))
    eps = bandmf_epsilon(sigma, q, steps, c, DELTA)
    assert ref <= eps <= ref + 0.02, (ref, eps)


@pytest.mark.slow
def test_calibration_matches_jax_privacy_amplified_helper():
    """jax-privacy's own reduction (``_AmplifiedBandMFHelper``: q = batch / (N // b),
    ceil(n / b) participations, stddev = noise multiplier x ||c||, RDP): our RDP epsilon at
    its stddev is its target, and our calibrated sigma gives the same stddev to 2%."""
    n, N, batch, target = 512, 10_000, 250, 4.0
    helper = toeplitz._AmplifiedBandMFHelper(n, N, batch, target, DELTA)
    for bands in (2, 4):
        c = np.asarray(toeplitz.optimize_banded_toeplitz(n, bands)) * 1.3
        stddev = float(helper.required_stddev(c))
        q = partition_sample_rate(batch, N, bands)
        assert bandmf_epsilon(stddev, q, n, c, DELTA, "rdp") == pytest.approx(target, rel=0.02)
        sigma = calibrate_bandmf_sigma(target, DELTA, q, n, c, "rdp")
        assert bandmf_epsilon(sigma, q, n, c, DELTA, "rdp") <= target
        assert sigma == pytest.approx(stddev, rel=0.02)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_noise_on_cuda_with_a_cuda_generator():
    c = strategy("bsr", 4)
    g = torch.Generator(device="cuda").manual_seed(0)
    noise = BandedNoise(c, 4096, device="cuda")
    X = torch.stack([noise(1.0, g) for _ in range(8)])
    assert X.device.type == "cuda" and X.dtype == torch.float32
    g.manual_seed(0)
    Z = torch.stack([torch.normal(0.0, 1.0, (4096,), generator=g, device="cuda") for _ in range(8)])
    C = torch.from_numpy(lower_toeplitz(c, 8)).float().cuda()
    torch.testing.assert_close(C @ X, Z, atol=1e-5, rtol=1e-5)


def test_cyclic_batch_sampler_drives_the_poisson_loader():
    """Same protocol as PoissonBatchSampler: the existing PoissonLoader reads it, steps
    continue from first_step, DDP ranks split one global batch, and bands=1 draws
    DP-SGD's very batches."""
    from torch.utils.data import TensorDataset

    from regularizers.dp.cyclic_poisson import CyclicPoissonBatchSampler
    from regularizers.dp.sampling import PoissonLoader

    data = TensorDataset(torch.arange(200).float()[:, None])
    start = {"t": 0}
    sampler = CyclicPoissonBatchSampler(200, 0.5, 6, 3, seed=7, first_step=lambda: start["t"])
    batches = [b[0].squeeze(1).long() for b in PoissonLoader(data, sampler)]
    parts = partitions(200, 3, 0)
    for t, b in enumerate(batches):
        assert torch.equal(b, cyclic_poisson_batch(parts, t, 0.5, 7))
    start["t"] = 4
    assert torch.equal(next(iter(PoissonLoader(data, sampler)))[0].squeeze(1).long(), batches[4])
    from regularizers.dp.sampling import PoissonBatchSampler
    one = CyclicPoissonBatchSampler(200, 0.3, 5, 1, seed=7)
    plain = PoissonBatchSampler(200, 0.3, 5, seed=7)
    assert all(torch.equal(one.global_batch(t), plain.global_batch(t)) for t in range(5))
    ranks = [CyclicPoissonBatchSampler(200, 0.5, 6, 3, world=2, rank=r, seed=7) for r in (0, 1)]
    merged = sorted(sum((next(iter(s)) for s in ranks), []))
    assert merged == batches[0].tolist()


@pytest.mark.parametrize("n,bands,momentum", [(195, 4, 0.9), (500, 8, 0.5)])
def test_optimized_momentum_strategy_is_an_unconstrained_optimum(n, bands, momentum):
    """No oracle has the momentum workload: check the optimum directly. The loss is
    scale-invariant, so at an optimum its full gradient vanishes; an unconstrained BFGS
    restart finds nothing lower; and it beats the momentum BSR."""
    from scipy.optimize import minimize
    c = strategy("optimized", bands, n, momentum)
    a = workload_coefs(n, momentum)
    f, g = _loss_and_grad(c, a)
    assert np.linalg.norm(g) <= 1e-6 * f
    res = minimize(lambda t: _loss_and_grad(np.concatenate([[c[0]], t]), a)[0], c[1:],
                   method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 4000})
    assert res.fun >= f * (1 - 1e-9)
    assert f < _loss_and_grad(strategy("bsr", bands, momentum=momentum), a)[0]
