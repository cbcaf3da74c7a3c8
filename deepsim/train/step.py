"""One DeePSiM training iteration: G forward, C and D on fake and real, every loss term, both backward
passes, both optimizer steps and the pause rule, with no host sync (everything stays a device tensor).

Two update orders (``update_order``):

* ``"code"`` (default; the derived code's train.py): G makes the fakes; D runs on the reals and the detached
  fakes, and its update is applied (when the pause rule lets D train); THEN D runs on the fakes again, and
  G's adversarial term, its gradient and the L_adv entering the pause ratio r all come from the updated D.
* ``"simultaneous"``: every loss from the same, pre-update D; both updates at the end.

In both, the pause rule's flags set after iteration t gate iteration t + 1
(:class:`~deepsim.losses.PauseRule`). :func:`run_iteration` writes the iteration once; a
:class:`GradientBackend` supplies the gradients and the updates (eager: ``backward`` + ``GatedAdam.step``; the
compiled step: ``autograd.grad`` + ``GatedAdam.apply``). D's passes on the reals and on the detached fakes are
one pass over both (docs/compiled_step.md).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.profiler import record_function

from deepsim.config import TrainConfig
from deepsim.losses import DeePSiMLoss, DiscriminatorLoss, GeneratorLoss, PauseRule
from deepsim.train.optim import GatedAdam, decay_param_groups

__all__ = [
    "DeePSiMTrainer",
    "StepLosses",
    "Fakes",
    "UPDATE_ORDERS",
    "GradientBackend",
    "EagerGradients",
    "run_iteration",
    "detached_losses",
]

UPDATE_ORDERS = ("code", "simultaneous")


class StepLosses(NamedTuple):
    """The forward half of a step: G's objective (with the task's extra terms), its terms, D's loss."""

    g_total: torch.Tensor  # lambda-weighted G objective + extra terms (0-dim, fp32)
    g_loss: GeneratorLoss
    extra: dict[str, torch.Tensor]  # extra weighted G terms (VAE: "kl")
    d_loss: DiscriminatorLoss | None  # None without a discriminator


class Fakes(NamedTuple):
    """G's forward pass of one iteration, shared by D's loss and G's loss."""

    target: torch.Tensor  # (B, 3, H, W) the real images
    condition: torch.Tensor | None  # what D sees beside the image (inversion: the features), or None
    fake: torch.Tensor  # (B, 3, H, W) G's output (with its graph)
    extra: dict[str, torch.Tensor]  # extra weighted G terms (VAE: "kl")


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
        update_order: "code" | "simultaneous" (module docstring).
        weight_decay, weight_decay_scope: Caffe-style coupled L2 and which parameters get it
            (:func:`~deepsim.train.optim.decay_param_groups`).
        lr_milestones, lr_gamma: the multistep LR policy (:class:`~deepsim.train.optim.GatedAdam`).
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
        update_order: str = TrainConfig.update_order,
        weight_decay: float = TrainConfig.weight_decay,
        weight_decay_scope: str = TrainConfig.weight_decay_scope,
        lr_milestones: tuple[int, ...] = TrainConfig.lr_milestones,
        lr_gamma: float = TrainConfig.lr_gamma,
    ):
        super().__init__()
        if update_order not in UPDATE_ORDERS:
            raise ValueError(f"update order {update_order!r}: expected one of {', '.join(UPDATE_ORDERS)}")
        self.generator, self.discriminator, self.loss = generator, discriminator, loss
        self.pause = pause if pause is not None else PauseRule()
        self.precision, self.update_order = precision, update_order
        self.uses_discriminator = discriminator is not None and loss.uses_discriminator
        solver = dict(lr=lr, betas=betas, lr_milestones=lr_milestones, lr_gamma=lr_gamma)
        self.opt_g = GatedAdam(decay_param_groups(generator, weight_decay, weight_decay_scope), **solver)
        self.opt_d = (
            GatedAdam(decay_param_groups(discriminator, weight_decay, weight_decay_scope), **solver)
            if self.uses_discriminator
            else None
        )
        # Set by deepsim.train.distributed.wrap_ddp: "generate" / "discriminator" (DDP-wrapped callables) and
        # "average" (all-reduce mean of a tensor). A plain dict, so the wrappers are not registered submodules
        # (state dicts stay those of the unwrapped networks).
        self._parallel: dict = {}

    # ------------------------------------------------------------------------------------ task hooks
    def prepare(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """batch -> (generator input, target image, condition for D or None). Autoencoder: x = y = batch (the
        target without the zero channels of a padded batch, see ``AutoencoderGenerator.input_channels``)."""
        return batch, (batch[:, :3] if batch.shape[1] > 3 else batch), None

    def generate(self, g_input: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """G forward -> (fake image, extra generator loss terms already weighted, e.g. the VAE's KL)."""
        return self.generator(g_input), {}

    # ------------------------------------------------------------------------------- the phases
    def _autocast(self, device_type: str):
        if self.precision == "bf16":
            return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _discriminator(self):
        return self._parallel.get("discriminator", self.discriminator)

    def run_generator(self, batch: torch.Tensor) -> Fakes:
        """G's forward pass (through its DDP wrapper when distributed)."""
        g_input, target, condition = self.prepare(batch)
        generate = self._parallel.get("generate", self.generate)
        with self._autocast(batch.device.type), record_function("Gmain"):
            fake, extra = generate(g_input)
        return Fakes(target, condition, fake, extra)

    def discriminator_loss(self, fakes: Fakes) -> DiscriminatorLoss:
        """D on the reals and on the detached fakes: L_D = L_D_real + L_D_fake.

        One pass of D over the 2B batch [reals; detached fakes] (D has no batch statistics: each sample's
        logits are those of a pass on its own half), split into the two halves for the two loss terms.
        """
        discriminator = self._discriminator()
        target = fakes.target
        both = torch.cat([target, fakes.fake.detach()])  # (2B, 3, H, W); cat promotes bf16 fakes
        condition = None if fakes.condition is None else torch.cat([fakes.condition, fakes.condition])
        with self._autocast(fakes.fake.device.type), record_function("Dmain"):
            d_real, d_fake = discriminator(both, condition).split(target.shape[0])  # (B, 2) each
            return self.loss.discriminator_loss(d_real, d_fake)

    def generator_loss(self, fakes: Fakes) -> tuple[torch.Tensor, GeneratorLoss]:
        """(G's objective with the extra terms, its terms): C on fake and real, D on the fakes for L_adv.

        D's pass runs under DDP's ``no_sync`` when distributed: that graph is differentiated for G only, so
        D's reducer must not wait for it.
        """
        discriminator = self._discriminator()
        with self._autocast(fakes.fake.device.type), record_function("Gmain"):
            d_fake_for_g = None
            if self.uses_discriminator:
                with (
                    discriminator.no_sync() if hasattr(discriminator, "no_sync") else contextlib.nullcontext()
                ):
                    d_fake_for_g = discriminator(fakes.fake, fakes.condition)
            g_loss = self.loss(fakes.fake, fakes.target, d_fake_for_g)
            g_total = g_loss.total + sum(fakes.extra.values()) if fakes.extra else g_loss.total
        return g_total, g_loss

    def compute_losses(self, batch: torch.Tensor) -> StepLosses:
        """Every loss of an iteration from the same (pre-update) D: the forward half of the "simultaneous"
        order (and of every step without a discriminator). Shared by the eager and the compiled step."""
        fakes = self.run_generator(batch)
        g_total, g_loss = self.generator_loss(fakes)
        d_loss = self.discriminator_loss(fakes) if self.uses_discriminator else None
        return StepLosses(g_total, g_loss, fakes.extra, d_loss)

    def pause_inputs(self, losses: StepLosses) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L_D_real, L_D_fake, L_adv) for the pause rule: averaged over the ranks when distributed (an
        all-reduce, not a host sync), so that every rank takes the same pause decision."""
        values = (losses.d_loss.real.detach(), losses.d_loss.fake.detach(), losses.g_loss.adv.detach())
        reduce = self._parallel.get("average")
        if reduce is None:
            return values
        averaged = reduce(torch.stack(values))
        return averaged[0], averaged[1], averaged[2]

    def step_metrics(
        self, losses: StepLosses, pause: tuple | None, pause_inputs: tuple | None
    ) -> dict[str, torch.Tensor]:
        """The metrics dict of one step (detached 0-dim device tensors). ``pause`` = (train_d, train_g, r):
        the gates this step ran under and the ratio it measured."""
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
        metrics["Opt/lr_g"] = self.opt_g.current_lr()
        if self.opt_d is not None:
            metrics["Opt/lr_d"] = self.opt_d.current_lr()
        return metrics

    def _trainable(self, network: nn.Module) -> list[nn.Parameter]:
        return [p for p in network.parameters() if p.requires_grad]

    def step(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One iteration. Returns detached 0-dim device tensors keyed as metrics.jsonl's rows ("Loss/G/total",
        "Loss/G/feat", "Loss/G/adv", "Loss/G/img", "Loss/D/real", "Loss/D/fake", "Pause/r", "Pause/train_d",
        "Pause/train_g", "Opt/lr_g", "Opt/lr_d", + extras)."""
        return run_iteration(self, batch, EagerGradients(self))

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
        if (
            self.loss.comparator is not None
            and not self.loss.comparator.frozen
            and not self.loss.comparator.uses_network
        ):
            state["comparator"] = self.loss.comparator.state_dict()
        return state

    def load_training_state(self, state: dict) -> None:
        self.generator.load_state_dict(state["generator"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.pause.load_state_dict(state["pause"])
        if self.uses_discriminator:
            if "discriminator" not in state:
                raise ValueError(
                    "checkpoint has no discriminator, but this run trains one (was it an 'se'/'l1' run?)"
                )
            self.discriminator.load_state_dict(state["discriminator"])
            self.opt_d.load_state_dict(state["opt_d"])
        if "comparator" in state:
            self.loss.comparator.load_state_dict(state["comparator"])


def detached_losses(losses: StepLosses) -> StepLosses:
    """``losses`` with every tensor detached (what may outlive a gradient computation)."""
    d_loss = losses.d_loss
    return StepLosses(
        losses.g_total.detach(),
        type(losses.g_loss)(*(t.detach() for t in losses.g_loss)),
        {k: v.detach() for k, v in losses.extra.items()},
        None if d_loss is None else type(d_loss)(*(t.detach() for t in d_loss)),
    )


class GradientBackend(Protocol):
    """How an iteration turns a loss into an update of one network ("g" or "d").

    ``gradients(network, loss)`` differentiates ``loss`` w.r.t. the network's trainable parameters and
    returns an opaque handle; ``apply(network, handle, enabled)`` takes the (gated) optimizer step. The
    iteration calls ``gradients`` before ``apply`` for a network and never reuses a loss afterwards.
    """

    def gradients(self, network: str, loss: torch.Tensor) -> Any: ...

    def apply(self, network: str, handle: Any, enabled: torch.Tensor | bool) -> None: ...


class EagerGradients:
    """``backward(inputs=params)`` into ``.grad`` (zeroed first) and ``GatedAdam.step`` from ``.grad``.

    ``inputs=`` keeps G's loss from accumulating into D's gradients (and D's loss out of G's).
    """

    def __init__(self, trainer: DeePSiMTrainer):
        self.optimizers = {"g": trainer.opt_g, "d": trainer.opt_d}
        self.params = {"g": trainer._trainable(trainer.generator)}
        if trainer.uses_discriminator:
            self.params["d"] = trainer._trainable(trainer.discriminator)

    def gradients(self, network: str, loss: torch.Tensor) -> None:
        self.optimizers[network].zero_grad(set_to_none=False)
        loss.backward(inputs=self.params[network])

    def apply(self, network: str, handle: None, enabled: torch.Tensor | bool) -> None:
        self.optimizers[network].step(enabled)


def run_iteration(
    trainer: DeePSiMTrainer, batch: torch.Tensor, backend: GradientBackend
) -> dict[str, torch.Tensor]:
    """One training iteration of ``trainer`` in its ``update_order`` (module docstring), with the gradients
    and updates of ``backend``. Returns the metrics (detached 0-dim device tensors)."""
    if not trainer.uses_discriminator:
        full = trainer.compute_losses(batch)
        losses = detached_losses(full)
        backend.apply("g", backend.gradients("g", full.g_total), True)
        return trainer.step_metrics(losses, None, None)
    train_d, train_g = trainer.pause.gates()  # set by the previous iteration
    if trainer.update_order == "code":
        fakes = trainer.run_generator(batch)
        d_loss = trainer.discriminator_loss(fakes)
        d_total, d_loss = d_loss.total, type(d_loss)(*(t.detach() for t in d_loss))  # before its graph goes
        backend.apply("d", backend.gradients("d", d_total), train_d)
        g_total, g_loss = trainer.generator_loss(fakes)  # from the updated D
        losses = detached_losses(StepLosses(g_total, g_loss, fakes.extra, d_loss))
        backend.apply("g", backend.gradients("g", g_total), train_g)
    else:
        full = trainer.compute_losses(batch)
        losses = detached_losses(full)
        g_handle = backend.gradients("g", full.g_total)
        d_handle = backend.gradients("d", full.d_loss.total)
        backend.apply("d", d_handle, train_d)
        backend.apply("g", g_handle, train_g)
    inputs = trainer.pause_inputs(losses)
    _, _, ratio = trainer.pause(*inputs)  # sets the gates of the next iteration
    return trainer.step_metrics(losses, (train_d, train_g, ratio), inputs)
