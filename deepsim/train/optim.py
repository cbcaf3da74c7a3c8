"""GatedAdam: Adam whose step is switched on or off by a device tensor, for the pause rule without a host sync."""

from __future__ import annotations

import torch

__all__ = ["GatedAdam"]


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

    @torch.no_grad()
    def step(self, enabled: torch.Tensor | bool = True):  # type: ignore[override]
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                gate = torch.as_tensor(enabled, device=p.device).to(torch.float32)
                grad = p.grad.float() if p.grad.dtype != torch.float32 and p.dtype == torch.float32 else p.grad
                state["step"].add_(gate)
                t = state["step"].clamp_min(1.0)  # a never-stepped parameter must not divide by zero
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.add_((grad - m) * (gate * (1 - beta1)))
                v.add_((grad * grad - v) * (gate * (1 - beta2)))
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                p.sub_(m_hat / (v_hat.sqrt() + eps) * (gate * lr))
