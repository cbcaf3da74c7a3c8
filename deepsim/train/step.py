"""One DeePSiM training iteration: G forward, C and D on fake and real, every loss term, both backward
passes, both optimizer steps and the pause rule, with no host sync (everything stays a device tensor).
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import record_function

from deepsim.losses import DeePSiMLoss, DiscriminatorLoss, GeneratorLoss, PauseRule
from deepsim.train.optim import GatedAdam

__all__ = ["DeePSiMTrainer", "METRIC_NAMES", "StepLosses"]

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


class StepLosses(NamedTuple):
    """The forward half of a step: G's objective (with the task's extra terms), its terms, D's loss."""

    g_total: torch.Tensor  # lambda-weighted G objective + extra terms (0-dim, fp32)
    g_loss: GeneratorLoss
    extra: dict[str, torch.Tensor]  # extra weighted G terms (VAE: "kl")
    d_loss: DiscriminatorLoss | None  # None without a discriminator


class DeePSiMTrainer(nn.Module):
    """Holds G, D, the loss, both optimizers and the pause rule; ``step(batch)`` runs one iteration.

    The task decides what G sees: the autoencoder reconstructs its input (``prepare`` returns the batch as
    both input and target). Subclasses (inversion, VAE) override :meth:`prepare` and :meth:`generate`.

    Args:
        generator, discriminator: the networks (the discriminator may be None for the "se"/"l1" baselines).
        loss: a :class:`DeePSiMLoss`.
        lr, betas: Adam settings for both networks (seed: 2e-4, (0.9, 0.999)).
        pause: the :class:`PauseRule` (thresholds from the config).
        precision: "fp32" | "tf32" | "bf16" (bf16: autocast for the forward passes, fp32 losses and weights);
            "auto" (a config that deepsim.train.auto did not resolve) runs as fp32.
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
        # Set by deepsim.train.distributed.wrap_ddp: "generate" / "discriminator" (DDP-wrapped callables) and
        # "average" (all-reduce mean of a tensor). A plain dict, so the wrappers are not registered submodules
        # (state dicts stay those of the unwrapped networks).
        self._parallel: dict = {}

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

    def compute_losses(self, batch: torch.Tensor) -> StepLosses:
        """The forward half of :meth:`step`: G forward, C and D on fake and real, every loss term.

        Shared by the eager step and the compiled one (:mod:`deepsim.train.compiled`). Under
        DistributedDataParallel (:func:`deepsim.train.distributed.wrap_ddp`) G and D are called through
        their DDP wrappers; D's pass on the fakes for G's adversarial term runs under ``no_sync`` (that graph
        is only differentiated for G, so D's reducer must not wait for it).
        """
        device_type = batch.device.type
        g_input, target, condition = self.prepare(batch)
        generate = self._parallel.get("generate", self.generate)
        discriminator = self._parallel.get("discriminator", self.discriminator)
        with self._autocast(device_type):
            with record_function("Gmain"):
                fake, extra = generate(g_input)
                d_fake_for_g = None
                if self.uses_discriminator:
                    with discriminator.no_sync() if hasattr(discriminator, "no_sync") else contextlib.nullcontext():
                        d_fake_for_g = discriminator(fake, condition)
                g_loss = self.loss(fake, target, d_fake_for_g)
                g_total = g_loss.total + sum(extra.values()) if extra else g_loss.total
            d_loss = None
            if self.uses_discriminator:
                with record_function("Dmain"):
                    d_real = discriminator(target, condition)
                    d_fake = discriminator(fake.detach(), condition)
                    d_loss = self.loss.discriminator_loss(d_real, d_fake)
        return StepLosses(g_total, g_loss, extra, d_loss)

    def pause_inputs(self, losses: StepLosses) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_D_real, L_D_fake, L_adv) for the pause rule: averaged over the ranks when distributed (an
        all-reduce, not a host sync), so that every rank takes the same pause decision."""
        values = (losses.d_loss.real.detach(), losses.d_loss.fake.detach(), losses.g_loss.adv.detach())
        reduce = self._parallel.get("average")
        if reduce is None:
            return values
        averaged = reduce(torch.stack(values))
        return averaged[0], averaged[1], averaged[2]

    def step_metrics(self, losses: StepLosses, pause: tuple | None, pause_inputs: tuple | None) -> dict[str, torch.Tensor]:
        """The metrics dict of one step (detached 0-dim device tensors)."""
        metrics = {
            "Loss/G/total": losses.g_total.detach(),
            "Loss/G/feat": losses.g_loss.feat.detach(),
            "Loss/G/adv": losses.g_loss.adv.detach(),
            "Loss/G/img": losses.g_loss.img.detach(),
        }
        for name, value in losses.extra.items():
            metrics[f"Loss/G/{name}"] = value.detach()
        if pause is not None:
            train_d, train_g, ratio = pause
            metrics.update(
                {
                    "Loss/D/real": pause_inputs[0],
                    "Loss/D/fake": pause_inputs[1],
                    "Pause/r": ratio,
                    "Pause/train_d": train_d.float(),
                    "Pause/train_g": train_g.float(),
                }
            )
        return metrics

    def step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One iteration. Returns detached 0-dim device tensors keyed by :data:`METRIC_NAMES` (+ extras)."""
        losses = self.compute_losses(batch)
        g_params = [p for p in self.generator.parameters() if p.requires_grad]
        # `inputs=` keeps G's loss from accumulating into D's gradients (and D's loss out of G's).
        self.opt_g.zero_grad(set_to_none=False)
        losses.g_total.backward(inputs=g_params)
        if self.uses_discriminator:
            d_params = [p for p in self.discriminator.parameters() if p.requires_grad]
            self.opt_d.zero_grad(set_to_none=False)
            losses.d_loss.total.backward(inputs=d_params)
            inputs = self.pause_inputs(losses)
            pause = self.pause(*inputs)
            self.opt_d.step(pause[0])
            self.opt_g.step(pause[1])
            return self.step_metrics(losses, pause, inputs)
        self.opt_g.step(True)
        return self.step_metrics(losses, None, None)

    def to_channels_last(self) -> DeePSiMTrainer:
        """G, D and C (every 4-D weight) and the optimizers' moments in channels_last memory format.

        Call it after loading a checkpoint (``load_state_dict`` keeps the loaded moments' layout); feed
        channels_last batches too (the loop asks the loader for them). Values are unchanged.
        """
        self.to(memory_format=torch.channels_last)
        for optimizer in (self.opt_g, self.opt_d):
            if optimizer is None:
                continue
            for state in optimizer.state.values():
                for key in ("exp_avg", "exp_avg_sq"):
                    if state[key].dim() == 4:
                        state[key] = state[key].contiguous(memory_format=torch.channels_last)
        return self

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
