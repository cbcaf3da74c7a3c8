"""GatedAdam: Adam whose step is switched on or off by a device tensor, for the pause rule without a host sync."""

from __future__ import annotations

import torch

__all__ = ["GatedAdam", "gated_adam_update"]


class GatedAdam(torch.optim.Optimizer):
    """Adam (Kingma & Ba; the same update as ``torch.optim.Adam``) with a device-side on/off switch.

    ``step(enabled)`` takes a 0-dim bool tensor: where it is False the parameters, both moments and the
    step count stay exactly as they were, as if the step had been skipped (the derived Caffe code skips
    the solver step of a paused network), and no value is read back to the host. The state lives on the
    parameters' device and is created eagerly, so the optimizer is capturable in a CUDA graph and traceable
    by torch.compile (where inductor fuses the per-parameter updates into a few kernels).

    Update with gate g in {0, 1}: t += g; m += g (1 - b1) (grad - m); v += g (1 - b2) (grad^2 - v);
    p -= g lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps).
    """

    def __init__(self, params, lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"GatedAdam: invalid lr {lr} or betas {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p] = {
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }

    def param_states(self) -> tuple[list, list, list, list]:
        """(params, step counts, first moments, second moments), flat over the groups, in parameter order."""
        params = [p for group in self.param_groups for p in group["params"]]
        return (
            params,
            [self.state[p]["step"] for p in params],
            [self.state[p]["exp_avg"] for p in params],
            [self.state[p]["exp_avg_sq"] for p in params],
        )

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
                ps, [g for _, g in chosen], [self.state[p]["step"] for p in ps], [self.state[p]["exp_avg"] for p in ps],
                [self.state[p]["exp_avg_sq"] for p in ps], enabled,
                lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], eps=group["eps"],
            )

    @torch.no_grad()
    def step(self, enabled: torch.Tensor | bool = True):  # type: ignore[override]
        """One gated step from the parameters' ``.grad`` (a parameter whose ``.grad`` is None is skipped)."""
        self.apply([p.grad for group in self.param_groups for p in group["params"]], enabled)


def gated_adam_update(params, grads, steps, exp_avgs, exp_avg_sqs, enabled, *, lr, beta1, beta2, eps) -> None:
    """The GatedAdam update on lists of tensors, in place, with ``torch._foreach_*`` ops (one launch per op
    for all parameters in eager mode; under torch.compile inductor fuses the lot into a few kernels).

    Every list has one entry per parameter; ``enabled`` is a 0-dim bool tensor (or a Python bool). The
    arithmetic is the per-parameter formula of :class:`GatedAdam`, op for op, so it does not depend on
    whether it runs through foreach kernels, a loop or a compiled graph beyond floating-point fusion.
    """
    device = params[0].device
    gate = torch.as_tensor(enabled, device=device).to(torch.float32)  # 0-dim: 1.0 steps, 0.0 keeps everything
    grads = [g.float() if g.dtype != p.dtype else g for p, g in zip(params, grads)]
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
    torch._foreach_mul_(update, gate * lr)
    torch._foreach_sub_(params, update)
