"""Gaussian diffusion: noise schedules, the forward process, the training loss, DDPM / DDIM sampling and
classifier-free guidance. Used by both halves of unCLIP: the prior (on CLIP embeddings, (B, D)) and the
decoder / upsampler (on images, (B, C, H, W)).

The forward process adds Gaussian noise in T small steps (DDPM, Ho et al. 2020, eq. 2):
    q(x_t | x_{t-1}) = N(√(1 − β_t) · x_{t-1}, β_t · I)
so in one jump, with α_t = 1 − β_t and ᾱ_t = ∏_{s ≤ t} α_s (eq. 4):
    q(x_t | x_0) = N(√ᾱ_t · x_0, (1 − ᾱ_t) · I)
A network learns to undo one step; it predicts either the noise ε that was added ("eps", DDPM), the clean
sample x_0 itself ("x0", as the unCLIP prior does), or the "velocity" v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0 ("v",
Salimans & Ho 2022, §4). Whichever it predicts, the others follow from x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε.
Why v: at the noisiest steps ᾱ_t → 0 and x̂_0 = (x_t − √(1 − ᾱ_t) · ε̂)/√ᾱ_t multiplies any error in ε̂ by
1/√ᾱ_t (10⁴ at the last cosine step), so an ε-model decides the coarse layout and colours of a sample from
its worst estimates; x̂_0 = √ᾱ_t · x_t − √(1 − ᾱ_t) · v̂ amplifies nothing at either end. A small model
trained briefly shows it: ε-prediction gets the background colour of toy images wrong, v-prediction right.

Timesteps. The papers count t = 1..T; the code counts t = 0..T-1 (code t is paper t + 1), so buffers are
indexed directly by t. "Before timestep 0" is the clean data: ᾱ = 1 there.

The model. Everything here takes a `model_fn(x_t, t) -> output` of x_t's shape, where t is a LongTensor (B,)
of integer timesteps in [0, T). Conditioning (text, CLIP embeddings) is the caller's business: close over
it with a lambda or functools.partial. Samplers always pass the ORIGINAL integer timesteps, so a model
trained with T = 1000 samples with any number of DDIM steps.

Schedules are computed in float64 on the CPU (ᾱ_t gets very close to 0 and 1, where float32 loses digits)
and stored as float32 buffers (MPS has no float64). They are not saved in checkpoints (persistent=False):
they are rebuilt from (timesteps, schedule, shift).
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")


def linear_betas(timesteps: int) -> np.ndarray:
    """DDPM §4: β from 1e-4 to 0.02 over T = 1000 steps. Scaled by 1000/T for other T (as improved-
    diffusion does), so that ᾱ_T stays about the same: fewer, larger steps reach the same noise level."""
    scale = 1000 / timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=np.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """The cosine schedule of improved DDPM (Nichol & Dhariwal 2021), eq. 17:
        ᾱ(t) = f(t) / f(0),  f(t) = cos²((t/T + s)/(1 + s) · π/2)

    β_t = min(1 − ᾱ_t / ᾱ_{t-1}, 0.999): the clip avoids a singularity at t = T, where ᾱ → 0 (§3.2).
    The offset s = 0.008 keeps β_t from being too small near t = 0: with tiny amounts of noise the network
    could not predict ε accurately enough (§3.2).
    """
    t = np.arange(timesteps + 1, dtype=np.float64)  # paper times 0..T
    f = np.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    return np.minimum(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], max_beta)


def shift_betas(betas: np.ndarray, shift: float, max_beta: float = 0.999) -> np.ndarray:
    """The same schedule with every SNR_t = ᾱ_t / (1 − ᾱ_t) divided by shift² (Hoogeboom et al. 2023, "simple
    diffusion" §3.1: shift the log-SNR by −2·log(shift); Chen 2023 scales the input by 1/shift, the same thing).

    Why: noise hides an object in proportion to its pixels' SNR, but a large flat object spreads its signal over
    many pixels, so it is still visible at a noise level that hides a textured one. The cosine schedule, made for
    natural images, then decides such layouts in its last few (noisiest) steps; dividing the SNR by shift² moves
    more training and sampling steps to those noise levels. Solving SNR' = SNR / shift² for ᾱ':
        ᾱ'_t = ᾱ_t / (ᾱ_t + shift² · (1 − ᾱ_t)),   β'_t = min(1 − ᾱ'_t / ᾱ'_{t-1}, max_beta).
    On the toy decoder (32 px shapes) shift 2 measured no better than 1 (README, Results), so presets keep 1.
    """
    alphas_cumprod = np.cumprod(1 - betas)
    shifted = alphas_cumprod / (alphas_cumprod + shift ** 2 * (1 - alphas_cumprod))
    shifted_prev = np.append(1.0, shifted[:-1])
    return np.minimum(1 - shifted / shifted_prev, max_beta)


def _extract(buf: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """buf[t] for a batch of timesteps t (B,), shaped (B, 1, ..., 1) to broadcast against x (B, ...)."""
    out = buf[t]  # (B,)
    return out.reshape(t.shape[0], *([1] * (x.dim() - 1)))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) steps -> (B, dim): [cos(t·ω_i), sin(t·ω_i)] with ω_i = max_period^(−i/(dim/2)), i < dim/2,
    the Transformer's position encoding (Vaswani et al. 2017 §3.5) used for t as in DDPM (Ho et al. 2020, App. B)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, 1) · (1, dim/2) -> (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


class GaussianDiffusion(nn.Module):
    """The schedule buffers and every formula that uses them. It has no parameters: the network is model_fn."""

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine", predict: str = "eps", shift: float = 1.0):
        super().__init__()
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown noise schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if predict not in PREDICTIONS:
            raise ValueError(f"unknown prediction target {predict!r}: choose one of {', '.join(PREDICTIONS)}")
        if timesteps < 2:
            raise ValueError(f"diffusion needs at least 2 timesteps, got {timesteps}")
        if not shift > 0:
            raise ValueError(f"the schedule shift must be > 0 (1 = none), got {shift}")
        self.num_timesteps, self.schedule, self.predict, self.shift = timesteps, schedule, predict, shift

        # Everything in float64 here; converted to float32 buffers at the end.
        betas = linear_betas(timesteps) if schedule == "linear" else cosine_betas(timesteps)
        if shift != 1:
            betas = shift_betas(betas, shift)
        if not (betas > 0).all() or not (betas < 1).all():
            raise ValueError(f"the {schedule} schedule with {timesteps} timesteps gives β outside (0, 1): "
                             "use more timesteps")
        alphas = 1 - betas
        alphas_cumprod = np.cumprod(alphas)                           # ᾱ_t, DDPM eq. 4
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])     # ᾱ_{t-1}; 1 before the first step
        # Posterior q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t · I), DDPM eq. 6-7.
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)  # β̃_t
        # β̃_0 = 0 (x_0 is known exactly given x_1), whose log is -inf: use β̃_1 in its place, as
        # improved-diffusion does. Sampling adds no noise at t = 0 anyway.
        posterior_log_variance = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1 / alphas_cumprod),        # 1/√ᾱ_t
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1 / alphas_cumprod - 1),  # √(1 − ᾱ_t)/√ᾱ_t
            "snr": alphas_cumprod / (1 - alphas_cumprod),                     # SNR_t = ᾱ_t / (1 − ᾱ_t)
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance,
            # μ̃_t(x_t, x_0) = coef1 · x_0 + coef2 · x_t   (DDPM eq. 7)
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * np.sqrt(alphas) / (1 - alphas_cumprod),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32), persistent=False)

    # ----------------------------------------------------------------------------------------------------
    # the forward process and its posterior

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(√ᾱ_t · x_0, (1 − ᾱ_t) · I)   (DDPM eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        mean_coef = _extract(self.sqrt_alphas_cumprod, t, x0)          # √ᾱ_t, (B, 1, ...)
        std = _extract(self.sqrt_one_minus_alphas_cumprod, t, x0)      # √(1 − ᾱ_t)
        return mean_coef * x0 + std * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and (clipped) log variance of q(x_{t-1} | x_t, x_0)   (DDPM eq. 6-7)."""
        coef1 = _extract(self.posterior_mean_coef1, t, x_t)
        coef2 = _extract(self.posterior_mean_coef2, t, x_t)
        mean = coef1 * x0 + coef2 * x_t
        variance = _extract(self.posterior_variance, t, x_t)
        log_variance = _extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t − √(1 − ᾱ_t) · ε) / √ᾱ_t: eq. 4 solved for x_0 (DDIM eq. 12's x̂₀)."""
        recip = _extract(self.sqrt_recip_alphas_cumprod, t, x_t)      # 1/√ᾱ_t
        recipm1 = _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)  # √(1 − ᾱ_t)/√ᾱ_t
        return recip * x_t - recipm1 * eps

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """ε = (x_t − √ᾱ_t · x_0) / √(1 − ᾱ_t): eq. 4 solved for ε."""
        recip = _extract(self.sqrt_recip_alphas_cumprod, t, x_t)
        recipm1 = _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t)
        return (recip * x_t - x0) / recipm1

    def velocity(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = √ᾱ_t · ε − √(1 − ᾱ_t) · x_0, the target of v-prediction (Salimans & Ho 2022, §4)."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0) * eps
                - _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0)

    def output_to_x0_eps(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                         clip_x0: float | None = None):
        """Turn a model output (ε, x_0 or v, per `self.predict`) into the pair (x̂_0, ε̂).

        clip_x0: clamp x̂_0 to [-clip_x0, clip_x0] (1.0 for images in [-1, 1]; None for CLIP embeddings,
        which have no fixed range). After clipping, ε̂ is recomputed from the clipped x̂_0 so that the two stay
        consistent with x_t, as improved-diffusion does.
        """
        if self.predict == "eps":
            eps = output
            x0 = self.predict_x0(x_t, t, eps)
        elif self.predict == "v":  # x_0 = √ᾱ·x_t − √(1−ᾱ)·v and ε = √(1−ᾱ)·x_t + √ᾱ·v (v's definition, solved)
            a, b = _extract(self.sqrt_alphas_cumprod, t, x_t), _extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)
            x0 = a * x_t - b * output
            eps = b * x_t + a * output
        else:
            x0 = output
            eps = None
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = None
        if eps is None:
            eps = self.predict_eps(x_t, t, x0)
        return x0, eps

    # ----------------------------------------------------------------------------------------------------
    # training

    def loss(self, model_fn, x0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             generator: torch.Generator | None = None, snr_gamma: float = 0.0) -> torch.Tensor:
        """L_simple (DDPM eq. 14): ‖target − model(x_t, t)‖², averaged, with t ~ U{0..T-1} and ε ~ N(0, I).

        The target is ε (predict="eps"), x_0 (predict="x0", unCLIP §2.2 for the prior) or v (predict="v"). Pass t and / or noise
        to fix them; `generator` (on x0's device) makes the draws reproducible, else the global RNG is used.

        snr_gamma > 0: Min-SNR-γ weighting (Hang et al. 2023, eq. 8). Every target's error is a multiple of the
        x_0 error: ‖ε − ε̂‖² = SNR·‖x_0 − x̂_0‖² and ‖v − v̂‖² = (SNR + 1)·‖x_0 − x̂_0‖², with SNR_t = ᾱ_t / (1 − ᾱ_t).
        Min-SNR weights the x_0 error by min(SNR, γ), so that the nearly clean steps (huge SNR, where the x_0
        error is all but zero and ε is easy) do not pull against the noisy ones; here that is the weight
        min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v and min(SNR, γ) for x_0.
        """
        B = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (B,), generator=generator, device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        output = model_fn(x_t, t)
        if self.predict == "eps":
            target = noise
        elif self.predict == "v":
            target = self.velocity(x0, t, noise)
        else:
            target = x0
        if snr_gamma <= 0:
            return F.mse_loss(output.float(), target.float())  # float: the model may run under bf16 autocast
        per_sample = (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
        snr = self.snr[t]  # (B,)
        weight = snr.clamp(max=snr_gamma) / {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[self.predict]
        return (weight.float() * per_sample).mean()

    # ----------------------------------------------------------------------------------------------------
    # sampling

    def _start(self, shape, noise, generator):
        """x_T: the given noise, or a fresh draw from N(0, I) on the buffers' device."""
        if noise is None:
            return torch.randn(shape, generator=generator, device=self.betas.device)
        if tuple(noise.shape) != tuple(shape):
            raise ValueError(f"noise has shape {tuple(noise.shape)} but shape {tuple(shape)} was asked for")
        return noise

    def _t_batch(self, t: int, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), t, device=self.betas.device, dtype=torch.long)

    @torch.no_grad()
    def ddpm_sample(self, model_fn, shape, noise=None, generator=None, clip_x0=None, progress=False):
        """Ancestral sampling over all T steps (DDPM Algorithm 2).

        Each step predicts x̂_0, then draws x_{t-1} ~ q(x_{t-1} | x_t, x̂_0) = N(μ̃_t, β̃_t · I) (eq. 6-7),
        the "fixed small" variance of DDPM §3.2. The last step (t = 0) adds no noise.
        """
        x = self._start(shape, noise, generator)
        for t in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress, desc="DDPM"):
            t_batch = self._t_batch(t, x.shape[0])
            x0, _ = self.output_to_x0_eps(model_fn(x, t_batch), x, t_batch, clip_x0)
            mean, _, log_variance = self.q_posterior(x0, x, t_batch)
            if t > 0:
                z = torch.randn(x.shape, generator=generator, device=x.device)
                x = mean + torch.exp(0.5 * log_variance) * z
            else:
                x = mean
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` distinct timesteps evenly spaced in [0, T-1], both ends included, ascending."""
        if not 2 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps must be between 2 and {self.num_timesteps} (the training timesteps), "
                             f"got {steps}")
        return [int(t) for t in np.linspace(0, self.num_timesteps - 1, steps).round()]

    def _ddim_step(self, x, t: int, t_next: int | None, eps, x0, eta: float, generator):
        """One DDIM step (DDIM eq. 12) from x at timestep t to timestep t_next (None = the clean data, ᾱ = 1).

        x_next = √ᾱ_next · x̂_0 + √(1 − ᾱ_next − σ²) · ε̂ + σ · z
        σ = η · √((1 − ᾱ_next)/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_next)
        η = 0 is deterministic (the DDIM ODE); η = 1 has DDPM's variance. Going up in t (inversion), use η = 0.
        """
        a_t = self.alphas_cumprod[t]
        a_next = self.alphas_cumprod[t_next] if t_next is not None else torch.ones_like(a_t)
        sigma = eta * torch.sqrt((1 - a_next) / (1 - a_t)) * torch.sqrt((1 - a_t / a_next).clamp(min=0))
        x_next = torch.sqrt(a_next) * x0 + torch.sqrt((1 - a_next - sigma ** 2).clamp(min=0)) * eps
        if eta > 0:
            x_next = x_next + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x_next

    @torch.no_grad()
    def ddim_sample(self, model_fn, shape, steps=50, eta=0.0, noise=None, generator=None, clip_x0=None,
                    progress=False):
        """DDIM sampling (Song et al. 2021, eq. 12) over `steps` of the T timesteps, from T-1 down to 0."""
        x = self._start(shape, noise, generator)
        timesteps = self.ddim_timesteps(steps)[::-1]  # descending: T-1, ..., 0
        for i in tqdm(range(len(timesteps)), disable=not progress, desc="DDIM"):
            t = timesteps[i]
            t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None  # None: after 0 comes the clean data
            t_batch = self._t_batch(t, x.shape[0])
            x0, eps = self.output_to_x0_eps(model_fn(x, t_batch), x, t_batch, clip_x0)
            x = self._ddim_step(x, t, t_next, eps, x0, eta, generator)
        return x

    @torch.no_grad()
    def ddim_invert(self, model_fn, x0, steps=50, clip_x0=None, progress=False):
        """Deterministic DDIM run backwards, x_0 -> x_{T-1}: the noise that ddim_sample(η=0) maps back to x0
        (up to the ODE's discretisation error). unCLIP §3 uses it to encode an image as (z_i, x_T), the
        starting point of variations.

        x0 is taken as the sample at timestep 0 (ᾱ_0 ≈ 1), and each step predicts ε̂ at the current point
        (x_t, t) and moves it to the next, higher timestep with eq. 12 (as improved-diffusion does).
        """
        x = x0
        timesteps = self.ddim_timesteps(steps)  # ascending: 0, ..., T-1
        for i in tqdm(range(len(timesteps) - 1), disable=not progress, desc="DDIM inversion"):
            t, t_next = timesteps[i], timesteps[i + 1]
            t_batch = self._t_batch(t, x.shape[0])
            x0_hat, eps = self.output_to_x0_eps(model_fn(x, t_batch), x, t_batch, clip_x0)
            x = self._ddim_step(x, t, t_next, eps, x0_hat, 0.0, None)
        return x


# --------------------------------------------------------------------------------------------------------
# classifier-free guidance (Ho & Salimans 2022; GLIDE §2.4; unCLIP §2.1)

def guided(model_fn_cond, model_fn_uncond, scale: float):
    """A model_fn whose output is out_uncond + scale · (out_cond − out_uncond).

    scale = 1 is the conditional model, scale = 0 the unconditional one; scale > 1 pushes samples further
    towards the condition (sharper, less diverse). Works for ε- and x0-prediction alike.
    """
    def model_fn(x_t, t):
        if scale == 1:  # no unconditional pass needed (and the output is exactly the conditional one)
            return model_fn_cond(x_t, t)
        if scale == 0:
            return model_fn_uncond(x_t, t)
        out_uncond = model_fn_uncond(x_t, t)
        out_cond = model_fn_cond(x_t, t)
        return out_uncond + scale * (out_cond - out_uncond)
    return model_fn


def guided_batched(model_fn, scale: float):
    """Like `guided`, with one model call on a doubled batch instead of two calls (faster on a GPU).

    model_fn gets x_t and t repeated twice, [x_t; x_t], and must treat the first half as conditional and the
    second as unconditional (e.g. its closure holds [cond; null cond]). Its output (2B, ...) is split back.
    """
    def doubled_fn(x_t, t):
        out = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]))  # (2B, ...)
        out_cond, out_uncond = out.chunk(2)                       # (B, ...) each
        return out_uncond + scale * (out_cond - out_uncond)
    return doubled_fn
