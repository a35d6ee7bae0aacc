"""The VQ-VAE of Gangloff et al. (RFIAP 2022), after van den Oord et al. (NeurIPS 2017).

Chapter 3 (``book/03_vqvae``) derives every piece; chapter 4 (``book/04_alignment_map``) uses
the alignment map that the quantiser returns. What is here, with the paper's equations:

- :class:`Encoder` / :class:`Decoder`: ``n_down`` convolutions 4×4, stride 2, padding 1, each
  followed by ReLU then BatchNorm, and 3 residual layers (ReLU, conv 3×3, ReLU, conv 1×1), 256
  channels throughout (Section 3.1). ``n_down=3`` for 256×256 images (latent 32×32),
  ``n_down=2`` for UCSD Ped1 at 128×128 (32×32) and CIFAR-10 at 32×32 (8×8). The decoder
  mirrors the encoder with transposed convolutions.
- :class:`VectorQuantizer`: M = 512 codewords of dimension D = 256, nearest-codeword
  assignment (Eq. 2, the deterministic posterior of Eq. 3), straight-through gradient, the
  alignment and commitment terms of Eq. 4, the alignment map of Eq. 6, codebook usage and
  perplexity.
- The decoder likelihood: continuous Bernoulli (Loaiza-Ganem & Cunningham, NeurIPS 2019) on
  images in [0, 1], with its log-normaliser computed stably near λ = 1/2, or a Gaussian (L2)
  for comparison. The reconstruction used for anomaly maps is the distribution's mean.

Conventions: images are (B, C, H, W) float in [0, 1]; latents are (B, D, h, w) with
h = H / 2**n_down. Losses are means (over pixels for the reconstruction term, over latent
entries for the two codebook terms), so the weights of Eq. 4 keep their meaning whatever
the image size. The model holds no training code (see :mod:`adcore.train.vqvae`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "LIKELIHOODS",
    "Decoder",
    "Encoder",
    "QuantizerOutput",
    "ResidualLayer",
    "VQVAE",
    "VQVAEConfig",
    "VQVAELoss",
    "VQVAEOutput",
    "VectorQuantizer",
    "continuous_bernoulli_log_norm",
    "continuous_bernoulli_log_prob",
    "continuous_bernoulli_mean",
    "gaussian_log_prob",
]

LIKELIHOODS: tuple[str, ...] = ("cbernoulli", "gaussian")


# --------------------------------------------------------------------------- likelihoods
def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (bf16 autocast) are promoted; float64 stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(λ) of the continuous Bernoulli, as a function of the logit η = log(λ / (1 − λ)).

    C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ), which in terms of η is η / tanh(η / 2): both
    numerator and denominator vanish at λ = 1/2, where the naive formula divides 0 by 0.
    With u = η / 2, log C = log 2 + log(u / tanh u); near u = 0 we use the series
    u²/3 − 7u⁴/90 + 62u⁶/2835 (error < 1e-9 for |u| < 0.1), elsewhere
    log|u| − log|tanh u| with log|tanh u| = log1p(−e^{−2|u|}) − log1p(e^{−2|u|}).

    Args:
        logits: η, any shape, float.

    Returns:
        log C, same shape, float32 at least (log 2 at η = 0, growing like log|η| for large |η|).
    """
    eta = _at_least_float32(logits)
    u = (eta / 2).abs()
    small = u < 0.1
    u_safe = torch.where(small, torch.ones_like(u), u)  # keeps log() finite in the unused branch
    e = torch.exp(-2 * u_safe)
    far = torch.log(u_safe) - (torch.log1p(-e) - torch.log1p(e))
    u2 = u * u
    near = u2 / 3 - 7 * u2 * u2 / 90 + 62 * u2 * u2 * u2 / 2835
    return math.log(2.0) + torch.where(small, near, far)


def continuous_bernoulli_log_prob(logits: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """log p(x | η) of the continuous Bernoulli, per pixel.

    log p = x log λ + (1 − x) log(1 − λ) + log C(λ) = −BCE(η, x) + log C(η), computed from
    the logits so that nothing saturates.

    Args:
        logits: (B, C, H, W) decoder outputs η.
        images: (B, C, H, W) in [0, 1].

    Returns:
        (B, C, H, W) log-densities (can be positive: it is a density on [0, 1]).
    """
    eta = _at_least_float32(logits)
    bce = F.binary_cross_entropy_with_logits(eta, images.to(eta.dtype), reduction="none")
    return continuous_bernoulli_log_norm(eta) - bce


def continuous_bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """E[x] of the continuous Bernoulli: 1 / (1 − e^{−η}) − 1 / η (λ / (2λ − 1) + 1 / (2 artanh(1 − 2λ))).

    It is not λ = sigmoid(η): the mean is pulled towards 1/2. Near η = 0 the two terms of
    the closed form cancel; there we use the series 1/2 + η/12 − η³/720 + η⁵/30240.

    Args:
        logits: η, any shape.

    Returns:
        The mean, same shape, float32 at least, in (0, 1).
    """
    eta = _at_least_float32(logits)
    small = eta.abs() < 0.1
    eta_safe = torch.where(small, torch.ones_like(eta), eta)
    far = 1.0 / (-torch.expm1(-eta_safe)) - 1.0 / eta_safe
    eta2 = eta * eta
    near = 0.5 + eta / 12 - eta * eta2 / 720 + eta * eta2 * eta2 / 30240
    return torch.where(small, near, far)


def gaussian_log_prob(means: torch.Tensor, images: torch.Tensor, scale: float) -> torch.Tensor:
    """log N(x; μ, σ²) per pixel, with a fixed σ = ``scale``: the L2 decoder of the comparison.

    Args:
        means: (B, C, H, W) decoder outputs μ.
        images: (B, C, H, W).
        scale: the standard deviation σ > 0.
    """
    mu = _at_least_float32(means)
    return (-0.5 * ((images.to(mu.dtype) - mu) / scale) ** 2
            - math.log(scale) - 0.5 * math.log(2 * math.pi))


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class VQVAEConfig:
    """Every setting of the model; the defaults are the paper's MVTec AD settings.

    Attributes:
        in_channels: 1 (grey, UCSD Ped1) or 3 (RGB).
        image_size: side of the square inputs; inputs of another size are refused.
        n_down: number of stride-2 convolutions (3 for 256², 2 for 128² and 32²).
        hidden_channels: channels of every hidden layer (256 in the paper).
        n_residual: residual layers in the encoder and in the decoder (3).
        codebook_size: M, the number of codewords (512).
        embedding_dim: D, the codeword dimension (256). When it differs from
            ``hidden_channels`` a 1×1 convolution maps between them.
        beta: β, the weight of the commitment term of Eq. 4 (0.25).
        likelihood: ``"cbernoulli"`` (the paper) or ``"gaussian"`` (L2, for comparison).
        gaussian_scale: σ of the Gaussian decoder.
    """

    in_channels: int = 3
    image_size: int = 256
    n_down: int = 3
    hidden_channels: int = 256
    n_residual: int = 3
    codebook_size: int = 512
    embedding_dim: int = 256
    beta: float = 0.25
    likelihood: str = "cbernoulli"
    gaussian_scale: float = 0.1

    def __post_init__(self) -> None:
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels={self.in_channels}: expected 1 (grey) or 3 (RGB)")
        if self.n_down < 1:
            raise ValueError(f"n_down={self.n_down}: expected at least 1 downsampling")
        if self.image_size % (2 ** self.n_down) or self.image_size < 2 ** self.n_down:
            raise ValueError(f"image_size={self.image_size} is not a multiple of 2**n_down = "
                             f"{2 ** self.n_down}; the latent grid must be whole")
        for name in ("hidden_channels", "codebook_size", "embedding_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: expected a positive integer")
        if self.n_residual < 0:
            raise ValueError(f"n_residual={self.n_residual}: expected 0 or more")
        if self.beta < 0:
            raise ValueError(f"beta={self.beta}: expected a non-negative weight")
        if self.likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood={self.likelihood!r}: expected one of {LIKELIHOODS}")
        if self.gaussian_scale <= 0:
            raise ValueError(f"gaussian_scale={self.gaussian_scale}: expected σ > 0")

    @property
    def latent_size(self) -> int:
        """Side of the latent grid, ``image_size / 2**n_down``."""
        return self.image_size // 2 ** self.n_down

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints and result files."""
        return asdict(self)


# --------------------------------------------------------------------------- networks
class ResidualLayer(nn.Module):
    """x + conv1×1(ReLU(conv3×3(ReLU(x)))): one residual layer of the paper (Section 3.1).

    Args:
        channels: input and output channels.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(channels, channels, kernel_size=1, stride=1, padding=0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> (B, C, h, w)."""
        return x + self.block(x)


class Encoder(nn.Module):
    """Enc_φ: ``n_down`` × (conv 4/2/1, ReLU, BatchNorm), then the residual layers.

    Args:
        config: the model configuration.
    """

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = config.in_channels
        for _ in range(config.n_down):
            layers += [nn.Conv2d(channels, config.hidden_channels, 4, stride=2, padding=1),
                       nn.ReLU(), nn.BatchNorm2d(config.hidden_channels)]
            channels = config.hidden_channels
        layers += [ResidualLayer(config.hidden_channels) for _ in range(config.n_residual)]
        if config.embedding_dim != config.hidden_channels:
            layers.append(nn.Conv2d(config.hidden_channels, config.embedding_dim, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> z_e (B, D, H / 2**n_down, W / 2**n_down)."""
        return self.net(images)


class Decoder(nn.Module):
    """Dec_θ, the mirror of the encoder: residual layers, then ``n_down`` transposed convs 4/2/1.

    Every transposed convolution but the last is followed by ReLU then BatchNorm; the last
    outputs the parameters of p_θ(x | z) (logits η for the continuous Bernoulli, means for
    the Gaussian), one per pixel and channel.

    Args:
        config: the model configuration.
    """

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        if config.embedding_dim != config.hidden_channels:
            layers.append(nn.Conv2d(config.embedding_dim, config.hidden_channels, 1))
        layers += [ResidualLayer(config.hidden_channels) for _ in range(config.n_residual)]
        for i in range(config.n_down):
            last = i == config.n_down - 1
            out = config.in_channels if last else config.hidden_channels
            layers.append(nn.ConvTranspose2d(config.hidden_channels, out, 4, stride=2, padding=1))
            if not last:
                layers += [nn.ReLU(), nn.BatchNorm2d(config.hidden_channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, C, h * 2**n_down, w * 2**n_down) distribution parameters."""
        return self.net(latents)


# --------------------------------------------------------------------------- quantiser
class QuantizerOutput(NamedTuple):
    """What :class:`VectorQuantizer` returns.

    Attributes:
        quantized: (B, D, h, w) z_q with the straight-through gradient (value e_{z_k},
            gradient copied to z_e).
        indices: (B, h, w) int64, z_k of Eq. 2.
        alignment_map: (B, h, w) float32, ‖sg[z_e] − e_{z_k}‖² per latent position (Eq. 6).
        codebook_loss: scalar, the alignment term ‖sg[z_e] − e‖² of Eq. 4 (mean over entries).
        commitment_loss: scalar, ‖z_e − sg[e]‖² (mean over entries), to be weighted by β.
        perplexity: scalar, exp of the entropy of codeword frequencies in the batch (1 = one
            codeword used, M = all used equally).
        usage: scalar, fraction of the M codewords used at least once in the batch.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    alignment_map: torch.Tensor
    codebook_loss: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VectorQuantizer(nn.Module):
    """The codebook e_1 … e_M ∈ R^D and nearest-codeword quantisation (Eq. 2 and 3).

    The distances and the codebook terms are computed in float32 even under bf16 autocast:
    an argmin over distances rounded to bf16 would pick wrong codewords. Nothing here reads
    a value on the host, so it never synchronises a GPU.

    Args:
        codebook_size: M.
        embedding_dim: D.
    """

    def __init__(self, codebook_size: int = 512, embedding_dim: int = 256) -> None:
        super().__init__()
        self.codebook_size = codebook_size
        self.embedding_dim = embedding_dim
        self.codebook = nn.Parameter(torch.empty(codebook_size, embedding_dim))
        # van den Oord et al.'s initialisation: small uniform codewords.
        nn.init.uniform_(self.codebook, -1.0 / codebook_size, 1.0 / codebook_size)

    def distances(self, flat: torch.Tensor) -> torch.Tensor:
        """Squared distances (N, M) between encoder outputs (N, D) and every codeword (float32)."""
        codebook = self.codebook.float()
        flat = flat.float()
        return ((flat * flat).sum(1, keepdim=True) - 2 * flat @ codebook.t()
                + (codebook * codebook).sum(1)[None])

    def forward(self, z_e: torch.Tensor) -> QuantizerOutput:
        """Quantise encoder outputs.

        Args:
            z_e: (B, D, h, w) encoder outputs.

        Returns:
            A :class:`QuantizerOutput`.

        Raises:
            ValueError: ``z_e`` is not 4-D with D channels.
        """
        if z_e.dim() != 4 or z_e.shape[1] != self.embedding_dim:
            raise ValueError(f"encoder output has shape {tuple(z_e.shape)}; expected "
                             f"(B, {self.embedding_dim}, h, w)")
        batch, dim, height, width = z_e.shape
        with torch.autocast(z_e.device.type, enabled=False):
            flat = z_e.float().permute(0, 2, 3, 1).reshape(-1, dim)
            indices = self.distances(flat.detach()).argmin(1)  # Eq. 2
            codewords = F.embedding(indices, self.codebook.float())
            # Eq. 6: computed from the difference, not from the expanded distance, which
            # loses digits by cancellation.
            alignment = ((flat.detach() - codewords.detach()) ** 2).sum(1)
            codebook_loss = F.mse_loss(codewords, flat.detach())
            commitment_loss = F.mse_loss(flat, codewords.detach())
            quantized = flat + (codewords - flat).detach()  # straight-through estimator
            counts = torch.zeros(self.codebook_size, device=z_e.device).scatter_add_(
                0, indices, torch.ones_like(indices, dtype=torch.float32))
            probs = counts / indices.numel()
            perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            usage = (counts > 0).float().mean()
        quantized = quantized.reshape(batch, height, width, dim).permute(0, 3, 1, 2)
        return QuantizerOutput(
            quantized=quantized.to(z_e.dtype),
            indices=indices.reshape(batch, height, width),
            alignment_map=alignment.reshape(batch, height, width),
            codebook_loss=codebook_loss,
            commitment_loss=commitment_loss,
            perplexity=perplexity,
            usage=usage,
        )


# --------------------------------------------------------------------------- the model
class VQVAEOutput(NamedTuple):
    """What :meth:`VQVAE.forward` returns.

    Attributes:
        params: (B, C, H, W) decoder outputs: logits η (continuous Bernoulli) or means (Gaussian).
        z_e: (B, D, h, w) encoder outputs.
        quantizer: the :class:`QuantizerOutput` (indices, alignment map, codebook terms, ...).
    """

    params: torch.Tensor
    z_e: torch.Tensor
    quantizer: QuantizerOutput


class VQVAELoss(NamedTuple):
    """The terms of Eq. 4, as scalars: ``total = reconstruction + codebook + β · commitment``.

    ``reconstruction`` is the mean over pixels and channels of −log p_θ(x | z_q).
    """

    total: torch.Tensor
    reconstruction: torch.Tensor
    codebook: torch.Tensor
    commitment: torch.Tensor


class VQVAE(nn.Module):
    """The VQ-VAE of the paper: encoder, vector quantiser, decoder and likelihood.

    Args:
        config: a :class:`VQVAEConfig` (the paper's MVTec AD settings by default); keyword
            arguments override its fields, e.g. ``VQVAE(in_channels=1, image_size=128,
            n_down=2)``.

    Example:
        >>> model = VQVAE(image_size=64, n_down=2, hidden_channels=32, embedding_dim=32,
        ...               codebook_size=64)
        >>> out = model(torch.rand(2, 3, 64, 64))
        >>> out.quantizer.alignment_map.shape
        torch.Size([2, 16, 16])
    """

    def __init__(self, config: VQVAEConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        base = config or VQVAEConfig()
        self.config = VQVAEConfig(**{**asdict(base), **overrides}) if overrides else base
        self.encoder = Encoder(self.config)
        self.quantizer = VectorQuantizer(self.config.codebook_size, self.config.embedding_dim)
        self.decoder = Decoder(self.config)

    def check_images(self, images: torch.Tensor) -> None:
        """Raise a clear error if ``images`` does not fit the configured model (shapes only, no sync)."""
        cfg = self.config
        if images.dim() != 4:
            raise ValueError(f"images have shape {tuple(images.shape)}; expected (B, "
                             f"{cfg.in_channels}, {cfg.image_size}, {cfg.image_size})")
        if images.shape[1] != cfg.in_channels:
            raise ValueError(f"images have {images.shape[1]} channels (shape {tuple(images.shape)}) "
                             f"but the model was configured for in_channels={cfg.in_channels}")
        if tuple(images.shape[2:]) != (cfg.image_size, cfg.image_size):
            raise ValueError(f"images are {images.shape[2]}x{images.shape[3]} (shape "
                             f"{tuple(images.shape)}) but the model was configured for "
                             f"image_size={cfg.image_size}")
        if not images.is_floating_point():
            raise ValueError(f"images have dtype {images.dtype}; expected floats in [0, 1]")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """z_e = Enc_φ(x): (B, C, H, W) in [0, 1] -> (B, D, h, w)."""
        self.check_images(images)
        return self.encoder(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoder parameters from (quantised) latents: (B, D, h, w) -> (B, C, H, W)."""
        return self.decoder(latents)

    def forward(self, images: torch.Tensor) -> VQVAEOutput:
        """Encode, quantise (Eq. 2), decode.

        Args:
            images: (B, C, H, W) float in [0, 1].
        """
        z_e = self.encode(images)
        quantized = self.quantizer(z_e)
        return VQVAEOutput(self.decode(quantized.quantized), z_e, quantized)

    def log_prob(self, params: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """log p_θ(x | z_q) per pixel: (B, C, H, W) (float32)."""
        if self.config.likelihood == "cbernoulli":
            return continuous_bernoulli_log_prob(params, images)
        return gaussian_log_prob(params, images, self.config.gaussian_scale)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The reconstruction x̂: the mean of p_θ(x | z_q), (B, C, H, W) float32."""
        if self.config.likelihood == "cbernoulli":
            return continuous_bernoulli_mean(params)
        return params.float()

    def loss(self, images: torch.Tensor, output: VQVAEOutput) -> VQVAELoss:
        """Eq. 4 as a loss to minimise: −log p(x | z_q) + ‖sg[z_e] − e‖² + β‖z_e − sg[e]‖².

        Args:
            images: (B, C, H, W) the inputs that produced ``output``.
            output: :meth:`forward`'s result.
        """
        reconstruction = -self.log_prob(output.params, images).mean()
        q = output.quantizer
        total = reconstruction + q.codebook_loss + self.config.beta * q.commitment_loss
        return VQVAELoss(total, reconstruction, q.codebook_loss, q.commitment_loss)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and alignment map, for anomaly maps (no gradient).

        Args:
            images: (B, C, H, W) in [0, 1].

        Returns:
            ``(reconstruction (B, C, H, W) float32, alignment_map (B, h, w) float32)``.
        """
        output = self(images)
        return self.mean(output.params), output.quantizer.alignment_map
