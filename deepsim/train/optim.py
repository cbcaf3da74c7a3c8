"""GatedAdam: Adam whose step is switched on or off by a device tensor, for the pause rule without a host
sync; with Caffe's coupled weight decay and multistep learning-rate policy computed on the device."""

from __future__ import annotations

import torch

__all__ = ["GatedAdam", "gated_adam_update", "multistep_factor", "decay_param_groups", "WEIGHT_DECAY_SCOPES"]

WEIGHT_DECAY_SCOPES = ("code", "all")


class GatedAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba; the same update as ``torch.optim.Adam``) with a device-side on/off switch.

    ``step(enabled)`` takes a 0-dim bool tensor: where it is False the parameters, both moments and the
    step count stay exactly as they were, as if the step had been skipped (the derived Caffe code skips
    the solver step of a paused network), and no value is read back to the host. The state lives on the
    parameters' device and is created eagerly, so the optimizer is capturable in a CUDA graph and traceable
    by torch.compile (where inductor fuses the per-parameter updates into a few kernels).

    Solver of the derived code (net_templates/solver_template.prototxt), per parameter group:

    * ``weight_decay``: Caffe's L2 regularisation, added to the gradient BEFORE the Adam moments
      (grad += weight_decay * p: coupled, like ``torch.optim.Adam(weight_decay=...)``, not AdamW).
    * ``lr_milestones``, ``lr_gamma``: Caffe's "multistep" policy, lr = base lr * gamma^k where k is the
      number of milestones reached. The count is this optimizer's own step count t (gated steps only), as
      each network's Caffe solver counts its own iterations in the derived code (its ``increment_iter`` runs
      only when that network trains). The factor is computed from the device step counts inside the update,
      so the schedule never recompiles a compiled step and never leaves a CUDA graph.

    Update with gate g in {0, 1}: t += g; grad += wd * p; m += g (1 - b1) (grad - m);
    v += g (1 - b2) (grad^2 - v); p -= g lr gamma^k(t) (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    """

    def __init__(
        self,
        params,
        lr: float = 2e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        weight_decay: float = 0.0,
        lr_milestones: tuple[int, ...] = (),
        lr_gamma: float = 1.0,
    ):
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"GatedAdam: invalid lr {lr} or betas {betas}")
        if weight_decay < 0 or lr_gamma <= 0:
            raise ValueError(f"GatedAdam: invalid weight_decay {weight_decay} or lr_gamma {lr_gamma}")
        if list(lr_milestones) != sorted(lr_milestones) or any(m <= 0 for m in lr_milestones):
            raise ValueError(
                f"GatedAdam: lr_milestones must be increasing positive step counts, got {lr_milestones}"
            )
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        defaults.update(lr_milestones=tuple(lr_milestones), lr_gamma=lr_gamma)  # the schedule (see above)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }

    def __setstate__(self, state: dict) -> None:
        # Optimizer.load_state_dict restores the saved groups' settings; a checkpoint written before weight
        # decay and the LR schedule existed has none, and those runs had neither.
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("weight_decay", 0.0)
            group.setdefault("lr_milestones", ())
            group.setdefault("lr_gamma", 1.0)
            group["lr_milestones"] = tuple(group["lr_milestones"])

    def load_state_dict(self, state_dict: dict) -> None:
        """``Optimizer.load_state_dict``, then :meth:`place_state`: a checkpoint read with
        ``map_location="cpu"`` leaves ``step`` on the CPU (torch moves only the moments to the parameters'
        device unless a group is capturable or fused), and a CPU step would mix devices in the update."""
        super().load_state_dict(state_dict)
        self.place_state()

    def place_state(self) -> None:
        """Every state tensor (``step`` included) on its parameter's device; values unchanged."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p, {})
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.device != p.device:
                        state[key] = value.to(p.device)

    def param_states(self) -> tuple[list, list, list, list]:
        """(params, step counts, first moments, second moments), flat over the groups, in parameter order."""
        params = [p for group in self.param_groups for p in group["params"]]
        return (
            params,
            [self.state[p]["step"] for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
        )

    def current_lr(self, group: int = 0) -> torch.Tensor:
        """The learning rate of ``group``'s latest step (of its first step, before any), as a 0-dim device
        tensor (no host sync): base lr * gamma^(milestones reached by the group's step count)."""
        settings = self.param_groups[group]
        step = self.state[settings["params"][0]]["step"].clamp_min(1.0)
        return settings["lr"] * multistep_factor(step, settings["lr_milestones"], settings["lr_gamma"])

    @torch.no_grad()
    def apply(self, grads: list[torch.Tensor | None], enabled: torch.Tensor | bool = True) -> None:
        """The update with explicit gradients (one per parameter, in :meth:`param_states` order; None skips).

        This is what the compiled step calls (its gradients come from ``torch.autograd.grad``, not ``.grad``).
        """
        start = 0
        for group in self.param_groups:
            params = group["params"]
            chosen = [(p, g) for p, g in zip(params, grads[start : start + len(params)]) if g is not None]
            start += len(params)
            if not chosen:
                continue
            ps = [p for p, _ in chosen]
            gated_adam_update(
                ps,
                [g for _, g in chosen],
                [self.state[p]["step"] for p in ps],
                [self.state[p]["exp_avg"] for p in ps],
                [self.state[p]["exp_avg_sq"] for p in ps],
                enabled,
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                lr_milestones=group["lr_milestones"],
                lr_gamma=group["lr_gamma"],
            )

    @torch.no_grad()
    def step(self, enabled: torch.Tensor | bool = True):  # type: ignore[override]
        """One gated step from the parameters' ``.grad`` (a parameter whose ``.grad`` is None is skipped)."""
        self.apply([p.grad for group in self.param_groups for p in group["params"]], enabled)


def decay_param_groups(module: torch.nn.Module, weight_decay: float, scope: str = "code") -> list[dict]:
    """The trainable parameters of ``module`` as optimizer groups: decayed (``weight_decay``) and not (0).

    Args:
        module: a network; frozen parameters (``requires_grad=False``, e.g. fixed up-conv biases) are left
        out.
        weight_decay: the solver's L2 coefficient (Caffe's weight_decay).
        scope: "code": the parameters the derived code decays (Caffe's decay_mult 1), as the network's
            ``code_decayed_parameters()`` lists them (a network without that method: none); "all": every one.

    Returns:
        a list of parameter-group dicts (empty groups left out) for :class:`GatedAdam`; one group, in
        parameter order, when ``weight_decay`` is 0 (the layout of optimizer states saved before weight
        decay).
    """
    if scope not in WEIGHT_DECAY_SCOPES:
        raise ValueError(f"weight decay scope {scope!r}: expected one of {', '.join(WEIGHT_DECAY_SCOPES)}")
    trainable = [p for p in module.parameters() if p.requires_grad]
    if not weight_decay:
        return [dict(params=trainable, weight_decay=0.0)]
    if scope == "all":
        chosen = {id(p) for p in trainable}
    else:
        listed = getattr(module, "code_decayed_parameters", None)
        chosen = {id(p) for p in listed()} if listed is not None else set()
    decayed = [p for p in trainable if id(p) in chosen]
    plain = [p for p in trainable if id(p) not in chosen]
    groups = [dict(params=decayed, weight_decay=weight_decay), dict(params=plain, weight_decay=0.0)]
    return [g for g in groups if g["params"]]


def multistep_factor(step: torch.Tensor, milestones: tuple[int, ...], gamma: float) -> torch.Tensor:
    """gamma^k, k = number of ``milestones`` <= ``step`` (a device tensor; the result stays on the device).

    Caffe's "multistep" policy: with milestones (300k, 500k, ...) and gamma 0.5, steps 1 .. 299,999 use the
    base rate, steps 300k .. 499,999 half of it, and so on.
    """
    if not milestones:
        return torch.ones_like(step)
    reached = torch.zeros_like(step)
    for milestone in milestones:
        reached = reached + (step >= milestone).to(step.dtype)
    return torch.pow(gamma, reached)


def gated_adam_update(
    params,
    grads,
    steps,
    exp_avgs,
    exp_avg_sqs,
    enabled,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay: float = 0.0,
    lr_milestones: tuple[int, ...] = (),
    lr_gamma: float = 1.0,
) -> None:
    """The GatedAdam update on lists of tensors, in place, with ``torch._foreach_*`` ops (one launch per op
    for all parameters in eager mode; under torch.compile inductor fuses the lot into a few kernels).

    Every list has one entry per parameter; ``enabled`` is a 0-dim bool tensor (or a Python bool). The
    arithmetic is the per-parameter formula of :class:`GatedAdam`, op for op, so it does not depend on
    whether it runs through foreach kernels, a loop or a compiled graph beyond floating-point fusion.
    """
    device = params[0].device
    gate = torch.as_tensor(enabled, device=device).to(torch.float32)  # 0-dim: 1.0 steps, 0.0 keeps everything
    grads = [g.float() if g.dtype != p.dtype else g for p, g in zip(params, grads)]
    if weight_decay:  # Caffe's Regularize(): L2, added to the gradient before the solver's update
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_add_(steps, [gate] * len(steps))  # (the list form: Dynamo reads a lone tensor as a scalar)
    t = torch._foreach_clamp_min(steps, 1.0)  # a never-stepped parameter must not divide by zero
    m_delta = torch._foreach_sub(grads, exp_avgs)
    torch._foreach_mul_(m_delta, gate * (1 - beta1))
    torch._foreach_add_(exp_avgs, m_delta)
    v_delta = torch._foreach_mul(grads, grads)
    torch._foreach_sub_(v_delta, exp_avg_sqs)
    torch._foreach_mul_(v_delta, gate * (1 - beta2))
    torch._foreach_add_(exp_avg_sqs, v_delta)
    bias1 = torch._foreach_pow(beta1, t)  # beta^t, per parameter (0-dim)
    bias2 = torch._foreach_pow(beta2, t)
    m_hat = torch._foreach_div(exp_avgs, [1 - b for b in bias1])
    v_hat = torch._foreach_div(exp_avg_sqs, [1 - b for b in bias2])
    denom = torch._foreach_sqrt(v_hat)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(m_hat, denom)
    if lr_milestones:  # the multistep factor of each parameter's own step count, on the device
        torch._foreach_mul_(update, [multistep_factor(s, lr_milestones, lr_gamma) for s in t])
    torch._foreach_mul_(update, gate * lr)
    torch._foreach_sub_(params, update)
