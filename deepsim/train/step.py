"""One DeePSiM training iteration: G forward, C and D on fake and real, every loss term, both backward
passes, both optimizer steps and the pause rule, with no host sync (everything stays a device tensor).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.profiler import record_function

from deepsim.losses import DeePSiMLoss, PauseRule
from deepsim.train.optim import GatedAdam

__all__ = ["DeePSiMTrainer", "METRIC_NAMES"]

METRIC_NAMES = (
    "Loss/G/total",
    "Loss/G/feat",
    "Loss/G/adv",
    "Loss/G/img",
    "Loss/D/real",
    "Loss/D/fake",
    "Pause/r",
    "Pause/train_d",
    "Pause/train_g",
)


class DeePSiMTrainer(nn.Module):
    """Holds G, D, the loss, both optimizers and the pause rule; ``step(batch)`` runs one iteration.

    The task decides what G sees: the autoencoder reconstructs its input (``prepare`` returns the batch as
    both input and target). Subclasses (inversion, VAE) override :meth:`prepare` and :meth:`generate`.

    Args:
        generator, discriminator: the networks (the discriminator may be None for the "se"/"l1" baselines).
        loss: a :class:`DeePSiMLoss`.
        lr, betas: Adam settings for both networks (seed: 2e-4, (0.9, 0.999)).
        pause: the :class:`PauseRule` (thresholds from the config).
        precision: "fp32" | "tf32" | "bf16" (bf16: autocast for the forward passes, fp32 losses and weights).
    """

    def __init__(
        self,
        generator: nn.Module,
        discriminator: nn.Module | None,
        loss: DeePSiMLoss,
        *,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        pause: PauseRule | None = None,
        precision: str = "fp32",
    ):
        super().__init__()
        self.generator, self.discriminator, self.loss = generator, discriminator, loss
        self.pause = pause if pause is not None else PauseRule()
        self.precision = precision
        self.uses_discriminator = discriminator is not None and loss.uses_discriminator
        self.opt_g = GatedAdam(generator.parameters(), lr=lr, betas=betas)
        self.opt_d = GatedAdam(discriminator.parameters(), lr=lr, betas=betas) if self.uses_discriminator else None

    # ------------------------------------------------------------------------------------ task hooks
    def prepare(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """batch -> (generator input, target image, condition for D or None). Autoencoder: x = y = batch."""
        return batch, batch, None

    def generate(self, g_input: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G forward -> (fake image, extra generator loss terms already weighted, e.g. the VAE's KL)."""
        return self.generator(g_input), {}

    # ------------------------------------------------------------------------------------- the step
    def _autocast(self, device_type: str):
        if self.precision == "bf16":
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One iteration. Returns detached 0-dim device tensors keyed by :data:`METRIC_NAMES` (+ extras)."""
        device_type = batch.device.type
        g_input, target, condition = self.prepare(batch)
        with self._autocast(device_type):
            with record_function("Gmain"):
                fake, extra = self.generate(g_input)
                d_fake_for_g = self.discriminator(fake, condition) if self.uses_discriminator else None
                g_loss = self.loss(fake, target, d_fake_for_g)
                g_total = g_loss.total + sum(extra.values()) if extra else g_loss.total
            if self.uses_discriminator:
                with record_function("Dmain"):
                    d_real = self.discriminator(target, condition)
                    d_fake = self.discriminator(fake.detach(), condition)
                    d_loss = self.loss.discriminator_loss(d_real, d_fake)

        g_params = [p for p in self.generator.parameters() if p.requires_grad]
        # `inputs=` keeps G's loss from accumulating into D's gradients (and D's loss out of G's).
        self.opt_g.zero_grad(set_to_none=False)
        g_total.backward(inputs=g_params)
        metrics = {
            "Loss/G/total": g_total.detach(),
            "Loss/G/feat": g_loss.feat.detach(),
            "Loss/G/adv": g_loss.adv.detach(),
            "Loss/G/img": g_loss.img.detach(),
        }
        for name, value in extra.items():
            metrics[f"Loss/G/{name}"] = value.detach()
        if self.uses_discriminator:
            d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
            self.opt_d.zero_grad(set_to_none=False)
            d_loss.total.backward(inputs=d_params)
            train_d, train_g, ratio = self.pause(d_loss.real, d_loss.fake, g_loss.adv)
            self.opt_d.step(train_d)
            self.opt_g.step(train_g)
            metrics.update(
                {
                    "Loss/D/real": d_loss.real.detach(),
                    "Loss/D/fake": d_loss.fake.detach(),
                    "Pause/r": ratio,
                    "Pause/train_d": train_d.float(),
                    "Pause/train_g": train_g.float(),
                }
            )
        else:
            self.opt_g.step(True)
        return metrics

    # ------------------------------------------------------------------------------------ state
    def training_state(self) -> dict:
        """Everything needed to continue training exactly: networks, optimizers, pause state."""
        state = {
            "generator": self.generator.state_dict(),
            "opt_g": self.opt_g.state_dict(),
            "pause": self.pause.state_dict(),
        }
        if self.uses_discriminator:
            state["discriminator"] = self.discriminator.state_dict()
            state["opt_d"] = self.opt_d.state_dict()
        if self.loss.comparator is not None and not self.loss.comparator.frozen and self.loss.comparator.arch != "discriminator":
            state["comparator"] = self.loss.comparator.state_dict()
        return state

    def load_training_state(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.pause.load_state_dict(state["pause"])
        if self.uses_discriminator:
            if "discriminator" not in state:
                raise ValueError("checkpoint has no discriminator, but this run trains one (was it an 'se'/'l1' run?)")
            self.discriminator.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        if "comparator" in state:
            self.loss.comparator.load_state_dict(state["comparator"])
