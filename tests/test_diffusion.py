"""Tests for nanodalle/diffusion.py: the schedules, q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), the loss,
DDPM / DDIM sampling and inversion, and classifier-free guidance.

Every check compares against an independent computation: the schedules are rebuilt in numpy float64 from the
papers' formulas, the posterior from the product of two Gaussians (Bayes), and the samplers are run with the
EXACT denoiser of a known data distribution (a single point, or a 1-D Gaussian), whose samples we know.
No network is trained; the file takes a few seconds on one CPU thread.
"""
import math

import numpy as np
import pytest
import torch

from nanodalle.diffusion import GaussianDiffusion, guided, guided_batched

T = 1000




def np_alphas_cumprod(schedule: str, timesteps: int = T) -> np.ndarray:
    """ᾱ for code timesteps 0..T-1, written out from the papers, independently of diffusion.py."""
    if schedule == "linear":  # DDPM §4, scaled by 1000/T
        scale = 1000 / timesteps
        betas = np.linspace(scale * 1e-4, scale * 0.02, timesteps)
    else:  # improved DDPM eq. 17, β clipped at 0.999
        def f(t):
            return np.cos((t / timesteps + 0.008) / 1.008 * np.pi / 2) ** 2
        betas = np.array([min(1 - f(t + 1) / f(t), 0.999) for t in range(timesteps)])
    return np.cumprod(1 - betas)


def exact_gaussian_model(predict: str, schedule: str, mu: float, s: float):
    """The exact denoiser of data x_0 ~ N(mu, s²) (s = 0: the single point mu), in float64.

    x_t = √ᾱ x_0 + √(1 − ᾱ) ε is Gaussian with variance v = ᾱ s² + 1 − ᾱ, so
        E[ε | x_t]   = √(1 − ᾱ) (x_t − √ᾱ mu) / v
        E[x_0 | x_t] = mu + √ᾱ s² (x_t − √ᾱ mu) / v
    For s = 0, ε = (x_t − √ᾱ mu) / √(1 − ᾱ) and x_0 = mu exactly.
    """
    ab = torch.tensor(np_alphas_cumprod(schedule), dtype=torch.float64)
    calls = []

    def model_fn(x_t, t):
        calls.append(t.clone())
        a = ab[t].reshape(-1, *([1] * (x_t.dim() - 1)))
        x = x_t.double()
        v = a * s * s + 1 - a
        if predict == "eps":
            out = (1 - a).sqrt() * (x - a.sqrt() * mu) / v
        else:
            out = mu + a.sqrt() * s * s * (x - a.sqrt() * mu) / v
        return out.to(x_t.dtype)
    model_fn.calls = calls
    return model_fn


# ------------------------------------------------------------------------------------------------------------
# schedules

def test_linear_schedule_matches_ddpm():
    d = GaussianDiffusion(T, "linear")
    expected = np.prod(1 - np.linspace(1e-4, 0.02, 1000))  # ᾱ_T of DDPM, in float64
    assert expected == pytest.approx(4.04e-5, rel=2e-3)
    assert d.alphas_cumprod[-1].item() == pytest.approx(expected, rel=1e-4)
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    # other T: scaled by 1000/T, so β goes from 4e-4 to 0.08 at T = 250
    d250 = GaussianDiffusion(250, "linear")
    assert d250.betas[0].item() == pytest.approx(4e-4) and d250.betas[-1].item() == pytest.approx(0.08)
    np.testing.assert_allclose(d250.alphas_cumprod.numpy(), np_alphas_cumprod("linear", 250), rtol=1e-5)


def test_cosine_schedule_matches_formula():
    d = GaussianDiffusion(T, "cosine")

    def f(t):
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for paper_t in [1, 10, 100, 500, 900, 990]:  # far from t = T, where the 0.999 clip starts to matter
        assert d.alphas_cumprod[paper_t - 1].item() == pytest.approx(f(paper_t) / f(0), rel=1e-5)
    assert d.betas.max().item() <= 0.999 + 1e-7
    assert d.betas[-1].item() == pytest.approx(0.999)  # the clip is hit at t = T, where ᾱ → 0
    assert (d.betas > 0).all()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_shifted_schedule_divides_snr(schedule):
    """shift k: SNR'_t = SNR_t / k² at every t where β is not clipped (simple diffusion §3.1); k = 1 changes
    nothing. SNR from the independent numpy ᾱ."""
    ab = np_alphas_cumprod(schedule)
    snr = ab / (1 - ab)
    d1 = GaussianDiffusion(T, schedule, shift=1.0)
    np.testing.assert_array_equal(d1.betas.numpy(), GaussianDiffusion(T, schedule).betas.numpy())
    for k in (0.5, 2.0, 3.0):
        d = GaussianDiffusion(T, schedule, shift=k)
        ts = np.arange(0, 990)  # the cosine schedule's β clip bites only in its last few steps
        np.testing.assert_allclose(d.snr.numpy()[ts], snr[ts] / k ** 2, rtol=1e-4)
        assert (d.betas > 0).all() and d.betas.max().item() <= 0.999 + 1e-7
    with pytest.raises(ValueError, match="shift"):
        GaussianDiffusion(T, schedule, shift=0.0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_buffers_are_float32_and_not_saved(schedule):
    d = GaussianDiffusion(T, schedule)
    buffers = dict(d.named_buffers())
    assert {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
            "sqrt_one_minus_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
            "posterior_mean_coef1", "posterior_mean_coef2"} <= set(buffers)
    for name, buf in buffers.items():
        assert buf.dtype == torch.float32, name
        assert buf.shape == (T,), name
        assert torch.isfinite(buf).all(), name
    assert d.state_dict() == {}  # rebuilt from (timesteps, schedule), never stored in checkpoints
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), np_alphas_cumprod(schedule), rtol=1e-5)
    assert d.alphas_cumprod_prev[0].item() == 1.0
    np.testing.assert_array_equal(d.alphas_cumprod_prev[1:].numpy(), d.alphas_cumprod[:-1].numpy())


def test_bad_names_raise():
    with pytest.raises(ValueError, match="schedule"):
        GaussianDiffusion(T, "quadratic")
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(T, "cosine", predict="velocity")
    with pytest.raises(ValueError, match="timesteps"):
        GaussianDiffusion(10, "linear")  # β would go up to 2
    with pytest.raises(ValueError, match="DDIM steps"):
        GaussianDiffusion(100).ddim_sample(lambda x, t: x, (1, 2), steps=101)


# ------------------------------------------------------------------------------------------------------------
# q(x_t | x_0) and q(x_{t-1} | x_t, x_0)

def test_q_sample_moments():
    d = GaussianDiffusion(T, "cosine")
    t_val, x0_val, N = 300, 0.7, 200_000
    torch.manual_seed(0)
    x_t = d.q_sample(torch.full((N,), x0_val), torch.full((N,), t_val))
    ab = np_alphas_cumprod("cosine")[t_val]
    # within ~5 standard errors of the sample mean and of the sample variance
    assert abs(x_t.mean().item() - math.sqrt(ab) * x0_val) < 5 * math.sqrt((1 - ab) / N)
    assert abs(x_t.var().item() - (1 - ab)) < 5 * (1 - ab) * math.sqrt(2 / N)


def test_q_sample_broadcasts_per_example_timesteps():
    d = GaussianDiffusion(T, "linear")
    ab = np_alphas_cumprod("linear")
    x0, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)  # (B, C, H, W)
    t = torch.tensor([0, 499, 999])
    x_t = d.q_sample(x0, t, noise)
    for i in range(3):
        a = ab[t[i].item()]
        expected = math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_matches_bayes(schedule):
    d = GaussianDiffusion(T, schedule)
    ab = np_alphas_cumprod(schedule)
    x0, x_t = torch.randn(4, 5), torch.randn(4, 5)  # (B, D): embeddings
    for t_val in [1, 10, 500, 999]:
        # q(x_{t-1} | x_0) = N(√ᾱ_{t-1} x_0, 1 − ᾱ_{t-1}),  q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t):
        # the posterior's precision is the sum of precisions, its mean the precision-weighted means.
        a_prev, a_t = ab[t_val - 1], ab[t_val]
        alpha = a_t / a_prev
        beta = 1 - alpha
        precision = 1 / (1 - a_prev) + alpha / beta
        var = 1 / precision
        mean = var * (math.sqrt(a_prev) / (1 - a_prev) * x0.double() + math.sqrt(alpha) / beta * x_t.double())
        got_mean, got_var, got_log_var = d.q_posterior(x0, x_t, torch.full((4,), t_val))
        assert got_mean.shape == (4, 5) and got_var.shape == (4, 1)
        torch.testing.assert_close(got_mean.double(), mean, rtol=1e-4, atol=1e-5)
        assert got_var[0, 0].item() == pytest.approx(var, rel=1e-4)
        assert got_log_var[0, 0].item() == pytest.approx(math.log(var), rel=1e-4, abs=1e-5)
    # t = 0: x_{-1} is x_0 itself, with variance 0; the log variance is clipped to that of t = 1
    mean, var, log_var = d.q_posterior(x0, x_t, torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(mean, x0, rtol=1e-5, atol=1e-5)
    assert var[0].item() == 0.0
    assert log_var[0].item() == pytest.approx(d.posterior_log_variance_clipped[1].item())


@pytest.mark.parametrize("predict", ["eps", "x0", "v"])
def test_output_to_x0_eps_is_consistent_with_x_t(predict):
    d = GaussianDiffusion(T, "cosine", predict)
    x_t, out = torch.randn(6, 3, 4, 4) * 2, torch.randn(6, 3, 4, 4) * 2
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    for clip in [None, 1.0]:
        x0, eps = d.output_to_x0_eps(out, x_t, t, clip_x0=clip)
        if clip is not None:
            assert x0.abs().max().item() <= clip
        elif predict == "x0":
            torch.testing.assert_close(x0, out)
        elif predict == "eps":
            torch.testing.assert_close(eps, out)
        else:  # v = √ᾱ·ε − √(1−ᾱ)·x_0, computed here in float64 from the schedule's formula
            ab = torch.tensor(np_alphas_cumprod("cosine")[t.numpy()])[:, None, None, None]
            v = ab.sqrt() * eps.double() - (1 - ab).sqrt() * x0.double()
            torch.testing.assert_close(v.float(), out, rtol=1e-4, atol=1e-4)
        # whatever was predicted or clipped, x0 and eps put back together give x_t
        torch.testing.assert_close(d.q_sample(x0, t, eps), x_t, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# the loss

def test_loss_with_perfect_and_zero_models():
    x0, noise = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    d_eps = GaussianDiffusion(T, "cosine", "eps")
    assert d_eps.loss(lambda x_t, t: noise, x0, noise=noise).item() == 0.0
    loss_zero = d_eps.loss(lambda x_t, t: torch.zeros_like(x_t), x0, noise=noise).item()
    assert loss_zero == pytest.approx((noise ** 2).mean().item(), rel=1e-6)
    d_x0 = GaussianDiffusion(T, "cosine", "x0")
    assert d_x0.loss(lambda x_t, t: x0, x0, noise=noise).item() == 0.0
    loss_zero = d_x0.loss(lambda x_t, t: torch.zeros_like(x_t), x0, noise=noise).item()
    assert loss_zero == pytest.approx((x0 ** 2).mean().item(), rel=1e-6)
    # v: the target at t is √ᾱ_t·ε − √(1−ᾱ_t)·x_0 (independently: from the numpy schedule)
    d_v = GaussianDiffusion(T, "cosine", "v")
    t = torch.arange(8) * 120
    ab = torch.tensor(np_alphas_cumprod("cosine")[t.numpy()], dtype=torch.float32)[:, None, None, None]
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert d_v.loss(lambda x_t, tt: v, x0, t=t, noise=noise).item() == pytest.approx(0.0, abs=1e-10)
    loss_zero = d_v.loss(lambda x_t, tt: torch.zeros_like(x_t), x0, t=t, noise=noise).item()
    assert loss_zero == pytest.approx((v ** 2).mean().item(), rel=1e-5)


@pytest.mark.parametrize("predict", ["eps", "v", "x0"])
def test_min_snr_loss_is_the_clamped_snr_times_the_x0_error(predict):
    # Min-SNR-γ (Hang et al. 2023): whatever the model predicts, the weighted loss is
    # mean_b min(SNR_b, γ) · ‖x_0 − x̂_0‖²_b, with x̂_0 recovered from the output and SNR from the numpy schedule
    gamma = 5.0
    d = GaussianDiffusion(T, "cosine", predict)
    x0, noise, out = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    t = torch.tensor([0, 10, 60, 150, 300, 500, 800, 999])
    ab = np_alphas_cumprod("cosine")[t.numpy()]
    snr = torch.tensor(ab / (1 - ab), dtype=torch.float32)
    x_t = torch.tensor(np.sqrt(ab), dtype=torch.float32)[:, None, None, None] * x0 \
        + torch.tensor(np.sqrt(1 - ab), dtype=torch.float32)[:, None, None, None] * noise
    x0_hat, _ = d.output_to_x0_eps(out, x_t, t)
    want = (snr.clamp(max=gamma) * (x0 - x0_hat).pow(2).flatten(1).mean(1)).mean()
    got = d.loss(lambda x, tt: out, x0, t=t, noise=noise, snr_gamma=gamma)
    assert got.item() == pytest.approx(want.item(), rel=2e-3)
    # γ = 0 is the plain loss; the weights are not all 1 (the test would pass for any weighting otherwise)
    plain = d.loss(lambda x, tt: out, x0, t=t, noise=noise)
    assert d.loss(lambda x, tt: out, x0, t=t, noise=noise, snr_gamma=0.0).item() == plain.item()
    assert abs(got.item() - plain.item()) > 1e-3 * plain.item()


def test_loss_draws_t_and_noise_from_the_generator():
    d = GaussianDiffusion(T, "linear")
    ab = np_alphas_cumprod("linear")
    x0 = torch.randn(64, 5)
    seen = []

    def model_fn(x_t, t):
        seen.append((x_t, t))
        return torch.zeros_like(x_t)
    loss_a = d.loss(model_fn, x0, generator=torch.Generator().manual_seed(1))
    loss_b = d.loss(model_fn, x0, generator=torch.Generator().manual_seed(1))
    (x_t_a, t_a), (x_t_b, t_b) = seen
    assert torch.equal(t_a, t_b) and torch.equal(x_t_a, x_t_b) and loss_a.item() == loss_b.item()
    assert t_a.dtype == torch.long and t_a.shape == (64,)
    assert 0 <= t_a.min().item() and t_a.max().item() < T and len(set(t_a.tolist())) > 50
    # x_t is √ᾱ x_0 + √(1 − ᾱ) ε for the drawn t: recover ε and check that it looks like N(0, 1) noise
    a = torch.tensor(ab, dtype=torch.float64)[t_a][:, None]
    eps = (x_t_a.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()
    assert abs(eps.mean().item()) < 0.2 and abs(eps.std().item() - 1) < 0.15
    # and the loss of a zero ε-model is the mean of ε²
    assert loss_a.item() == pytest.approx((eps ** 2).mean().item(), rel=1e-3)


# ------------------------------------------------------------------------------------------------------------
# sampling

def test_ddim_is_deterministic():
    d = GaussianDiffusion(T, "cosine")

    def model_fn(x_t, t):  # any smooth function of (x_t, t) will do
        return torch.tanh(x_t) * (t.float() / T).reshape(-1, 1, 1, 1)
    noise = torch.randn(2, 3, 4, 4)
    a = d.ddim_sample(model_fn, noise.shape, steps=20, noise=noise)
    b = d.ddim_sample(model_fn, noise.shape, steps=20, noise=noise)
    assert torch.equal(a, b)
    # η > 0 draws fresh noise every step: the same generator seed gives the same sample, another seed does not
    c = d.ddim_sample(model_fn, noise.shape, steps=20, eta=0.5, generator=torch.Generator().manual_seed(3))
    e = d.ddim_sample(model_fn, noise.shape, steps=20, eta=0.5, generator=torch.Generator().manual_seed(3))
    f = d.ddim_sample(model_fn, noise.shape, steps=20, eta=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(c, e) and not torch.equal(c, f)
    # same for DDPM, on a shorter schedule
    d100 = GaussianDiffusion(100, "linear")
    g = d100.ddpm_sample(model_fn, noise.shape, generator=torch.Generator().manual_seed(3))
    h = d100.ddpm_sample(model_fn, noise.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(g, h)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_with_eta_1_and_all_steps_is_ddpm(schedule):
    # DDIM §4.1: with η = 1, σ_t² = β̃_t, so DDIM over all T steps is DDPM's ancestral sampler. Both draw
    # their per-step noise from the generator in the same order, so with the same seed they give the same sample.
    d = GaussianDiffusion(100, schedule)

    def model_fn(x_t, t):  # any smooth function of (x_t, t) will do
        return torch.tanh(x_t) * (t.float() / 100).reshape(-1, 1, 1, 1) + 0.1
    noise = torch.randn(2, 3, 4, 4)
    ddpm = d.ddpm_sample(model_fn, noise.shape, noise=noise, generator=torch.Generator().manual_seed(5))
    ddim = d.ddim_sample(model_fn, noise.shape, steps=100, eta=1.0, noise=noise,
                         generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [2, 7, 50, 64, 250, T])
def test_ddim_timesteps_are_original_and_evenly_spaced(steps):
    d = GaussianDiffusion(T, "cosine")
    model_fn = exact_gaussian_model("eps", "cosine", 0.0, 0.0)
    d.ddim_sample(model_fn, (3, 2), steps=steps)
    seen = [t[0].item() for t in model_fn.calls]
    for t in model_fn.calls:  # one timestep for the whole batch, as a LongTensor (B,)
        assert t.dtype == torch.long and t.shape == (3,) and (t == t[0]).all()
    assert len(seen) == steps == len(set(seen))
    assert seen[0] == T - 1 and seen[-1] == 0
    gaps = -np.diff(seen)
    assert (gaps > 0).all() and gaps.max() - gaps.min() <= 1  # descending, evenly spaced up to rounding
    # inversion walks the same timesteps upwards (the step out of T-1 is not needed)
    model_fn.calls.clear()
    d.ddim_invert(model_fn, torch.zeros(3, 2), steps=steps)
    assert [t[0].item() for t in model_fn.calls] == seen[::-1][:-1]


def test_ddpm_visits_every_timestep():
    d = GaussianDiffusion(200, "linear")
    seen = []

    def model_fn(x_t, t):
        seen.append(t[0].item())
        return torch.zeros_like(x_t)
    d.ddpm_sample(model_fn, (2, 3))
    assert seen == list(range(199, -1, -1))


@pytest.mark.parametrize("predict", ["eps", "x0"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_with_exact_model_of_one_point(schedule, predict):
    # The data is one point x*: the exact denoiser knows x_0 = x* from any x_t, so every sampler must end there.
    d = GaussianDiffusion(T, schedule, predict)
    x_star = torch.tensor([0.9, -0.4, 0.1, 0.6])
    model_fn = exact_gaussian_model(predict, schedule, x_star, 0.0)
    gen = torch.Generator().manual_seed(0)
    target = x_star.expand(5, 4)
    torch.testing.assert_close(d.ddim_sample(model_fn, (5, 4), steps=50, generator=gen), target, atol=1e-4, rtol=0)
    torch.testing.assert_close(d.ddim_sample(model_fn, (5, 4), steps=10, eta=1.0, generator=gen), target,
                               atol=1e-4, rtol=0)
    torch.testing.assert_close(d.ddpm_sample(model_fn, (5, 4), generator=gen), target, atol=1e-4, rtol=0)

    # DDIM inversion: for one point, ε stays constant along the DDIM path, so inverting x_0 = x* (taken as
    # the sample at t = 0) gives x_{T-1} = √ᾱ_{T-1} x* + √(1 − ᾱ_{T-1}) ε₀ with ε₀ = ε(x*, 0).
    ab = np_alphas_cumprod(schedule)
    eps0 = (1 - math.sqrt(ab[0])) / math.sqrt(1 - ab[0]) * x_star.double()
    expected = math.sqrt(ab[-1]) * x_star.double() + math.sqrt(1 - ab[-1]) * eps0
    x_T = d.ddim_invert(model_fn, target, steps=50)
    torch.testing.assert_close(x_T.double(), expected.expand(5, 4), atol=1e-4, rtol=0)
    # and back: DDIM sampling from the inverted noise returns x*
    torch.testing.assert_close(d.ddim_sample(model_fn, (5, 4), steps=50, noise=x_T), target, atol=1e-4, rtol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_samplers_with_exact_model_of_a_gaussian(schedule):
    # Data x_0 ~ N(0.5, 0.3²): with its exact denoiser, samples must have that mean and standard deviation.
    # DDPM (all T steps, β̃ variance) and DDIM with all T steps solve the reverse process almost exactly.
    mu, s, N = 0.5, 0.3, 10_000
    for predict in ["eps", "x0"]:
        d = GaussianDiffusion(T, schedule, predict)
        model_fn = exact_gaussian_model(predict, schedule, mu, s)
        gen = torch.Generator().manual_seed(0)
        samples = {"ddpm": d.ddpm_sample(model_fn, (N, 1), generator=gen)}
        if predict == "eps":
            samples["ddim"] = d.ddim_sample(model_fn, (N, 1), steps=T, generator=gen)
        for name, x in samples.items():
            assert abs(x.mean().item() - mu) < 0.015, name  # standard error 0.003
            assert abs(x.std().item() - s) < 0.03 * s, name  # standard error 0.7%
    # DDIM inversion then sampling round-trips, up to the ODE's discretisation error (first order in 1/steps)
    d = GaussianDiffusion(T, schedule, "eps")
    model_fn = exact_gaussian_model("eps", schedule, mu, s)
    x0 = torch.linspace(-0.5, 1.5, 9)[:, None]
    errors = []
    for steps in [50, 250]:
        back = d.ddim_sample(model_fn, x0.shape, steps=steps, noise=d.ddim_invert(model_fn, x0, steps=steps))
        errors.append((back - x0).abs().max().item())
    assert errors[1] < errors[0] / 3 and errors[1] < 0.05


def test_noise_and_shape_must_agree():
    d = GaussianDiffusion(100, "cosine")
    with pytest.raises(ValueError, match="shape"):
        d.ddim_sample(lambda x, t: x, (2, 3), steps=5, noise=torch.randn(2, 4))


# ------------------------------------------------------------------------------------------------------------
# classifier-free guidance

def test_guidance():
    x, t = torch.randn(4, 3, 2, 2), torch.tensor([5, 6, 7, 8])

    def cond(x_t, t):
        return 2 * x_t + t.float().reshape(-1, 1, 1, 1)

    def uncond(x_t, t):
        return 0.5 * x_t - 1
    assert torch.equal(guided(cond, uncond, 1.0)(x, t), cond(x, t))
    assert torch.equal(guided(cond, uncond, 0.0)(x, t), uncond(x, t))
    c, u = cond(x, t), uncond(x, t)
    torch.testing.assert_close(guided(cond, uncond, 3.0)(x, t), u + 3.0 * (c - u))
    torch.testing.assert_close(guided(cond, uncond, 3.0)(x, t), 3 * c - 2 * u)  # the same, rearranged

    def doubled(x2, t2):  # a model that is conditional on the first half of the batch, unconditional on the rest
        B = x2.shape[0] // 2
        assert torch.equal(x2[:B], x2[B:]) and torch.equal(t2[:B], t2[B:])
        return torch.cat([cond(x2[:B], t2[:B]), uncond(x2[B:], t2[B:])])
    for scale in [0.0, 1.0, 3.0]:
        torch.testing.assert_close(guided_batched(doubled, scale)(x, t), guided(cond, uncond, scale)(x, t))
