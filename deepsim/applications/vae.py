"""The DeePSiM VAE (PAPER.md, "VAE"): the VAE's reconstruction term is replaced by the DeePSiM loss.

    L_G = lambda_feat * L_feat + lambda_adv * L_adv + lambda_img * L_img + lambda_kl * KL(q(z|x) || N(0, I))

Every term is a per-sample sum averaged over the batch (deepsim.losses' scale convention); the KL term is
returned by :meth:`VAETrainer.generate` as the extra term ``"kl"`` (already weighted), logged as Loss/G/kl.
D is the autoencoder's discriminator (no feature branch): it tells reconstructions from the inputs.
"""

from __future__ import annotations

import torch

from deepsim.train.step import DeePSiMTrainer

from .generators import VariationalAutoencoder, kl_divergence

__all__ = ["VAETrainer"]


class VAETrainer(DeePSiMTrainer):
    """DeePSiM training of a :class:`VariationalAutoencoder` (the trainer's ``generator`` is the whole VAE,
    so encoder and decoder share G's optimizer and are saved together under "generator")."""

    def __init__(self, vae: VariationalAutoencoder, discriminator, loss, *, lambda_kl: float = 1.0, **kwargs):
        super().__init__(vae, discriminator, loss, **kwargs)
        self.lambda_kl = lambda_kl

    def generate(self, g_input: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x -> (decode(z), {"kl": lambda_kl * KL}), z ~ q(z|x) in training mode, z = mu in eval mode."""
        fake, mu, logvar = self.generator(
            g_input
        )  # through forward(), so a DDP-wrapped G syncs its gradients
        return fake, {"kl": self.lambda_kl * kl_divergence(mu, logvar)}
