"""The whole DeePSiM iteration as one ``torch.compile`` graph, with no graph break.

:class:`CompiledStep` wraps a :class:`~deepsim.train.step.DeePSiMTrainer` and compiles one function that
does the entire iteration: G forward, C on fake and real, D on fake and real, every loss term, both
backward passes, the pause rule and both GatedAdam updates. ``--compile off`` keeps the eager reference,
``DeePSiMTrainer.step``; the compiled path computes the same thing (the trainer's same phases -- G forward,
D's loss, G's loss -- in the same ``update_order``, the same ``PauseRule``, the same Adam arithmetic with
its weight decay and multistep LR factor) with three differences that make it one graph:

* Gradients come from ``torch.autograd.grad`` (G's objective w.r.t. G's parameters, D's loss w.r.t. D's)
  instead of ``Tensor.backward(inputs=...)`` into ``.grad``: nothing is zeroed or accumulated, and the
  ``Optimizer.zero_grad`` call that Dynamo refuses to trace disappears. Dynamo traces ``autograd.grad``
  only with ``torch._dynamo.config.trace_autograd_ops = True`` (PyTorch >= 2.10; otherwise it graph-breaks
  on both ``backward`` and ``autograd.grad``); this module turns that flag on around every call, nowhere else.
  AOTAutograd then sees the forward *and* the backward ops of both losses in a single graph, which inductor
  fuses end to end (the LReLU/bias epilogues, the loss reductions, the Adam updates of all parameters).
* The optimizer update is :func:`deepsim.train.optim.gated_adam_update` (``torch._foreach_*`` ops, gated by
  the pause rule's device bools) applied to the returned gradients via ``GatedAdam.apply``; its state was
  created eagerly on the device, so the graph only mutates tensors that already exist (which also makes it
  capturable in a CUDA graph).
* Distributed runs (world > 1) average the gradients with an in-graph functional all-reduce
  (``torch.distributed._functional_collectives``, one flat buffer per network) instead of DDP's reducer
  hooks, which fire on ``.grad`` accumulation that the functional step does not do. The eager path uses DDP
  (see :mod:`deepsim.train.distributed`). The pause-rule inputs are averaged over ranks in both paths.

No host sync happens inside an iteration: the pause rule is boolean arithmetic on device tensors, the LR
schedule a factor computed from the device step counts (so crossing a milestone neither recompiles nor
leaves a CUDA graph), and the metrics come back as 0-dim device tensors (the loop reads them every
``log_every`` steps).

Update order "code" in one graph: D's gradients are taken and D's (gated) update is applied in place in the
middle of the graph; D's second pass on the fakes then reads the updated parameters (AOTAutograd
functionalises the in-place update, so the later reads see the new values), and G's gradients are taken
through it. tests/test_compiled_step.py checks both orders against the eager step.

Kernel dispatch: before the first call is traced, :func:`deepsim.kernels.dispatch.prepare` runs the losses
once on the real batch (no_grad, RNG forked) so that every conv block's path (fused Triton or cuDNN + the
Triton epilogue) is timed and decided eagerly; tracing reads the decisions and CUDA-graph capture never
times (a no-op on CPU or with ``DEEPSIM_KERNELS`` forced).

CUDA graphs: ``mode="reduce-overhead"`` (and inductor's "max-autotune", which also uses CUDA graphs) run the
compiled step under CUDA-graph trees. The parameters, GatedAdam's moments and step counts and the pause
flags are marked static (``torch._dynamo.mark_static_address``), so a replay updates them in place; the
data batch is copied into a static input buffer owned by the step before each replay (the torch loader
returns a new tensor per step). On CPU these modes compile like "default" (inductor skips CUDA graphs).

Dropout and RNG: D's dropout draws random masks. Inductor generates random numbers with its own (Philox)
generator, so compiled masks differ from eager ones and parameters drift apart within a few steps; this is
the expected behaviour, not an error. With ``torch._inductor.config.fallback_random = True`` inductor calls
the eager RNG ops in program order, and the compiled step matches the eager one up to floating-point
reassociation (tests/test_compiled_step.py compares them that way).
"""

from __future__ import annotations

import torch
import torch._dynamo
import torch.distributed as dist

from deepsim.kernels import dispatch
from deepsim.train.step import run_iteration

__all__ = ["CompiledStep", "compile_step", "count_graph_breaks", "COMPILE_MODES"]

COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")


def _trace_autograd():
    """The Dynamo setting under which ``torch.autograd.grad`` is traced into the graph (no graph break)."""
    return torch._dynamo.config.patch(trace_autograd_ops=True)


class CompiledStep:
    """A callable ``batch -> metrics`` doing one whole training iteration as a single compiled graph.

    Args:
        trainer: the :class:`~deepsim.train.step.DeePSiMTrainer` (its networks, optimizers and pause state are
            updated in place, exactly as ``trainer.step`` would).
        mode: "default" | "max-autotune" | "reduce-overhead" (torch.compile's modes), or "eager" to run the
            same functional step without compiling (a reference for the compiled graph).
        fullgraph: refuse graph breaks (True: a break is an error, not a silent slowdown).
        backend: torch.compile's backend ("inductor"; "aot_eager" traces the same graph and runs it with
            eager kernels, which tests use to check the trace without inductor's compile time).
    """

    def __init__(self, trainer, mode: str = "default", *, fullgraph: bool = True, backend: str = "inductor"):
        if mode not in COMPILE_MODES + ("eager",):
            raise ValueError(f"--compile {mode!r}: expected one of off, {', '.join(COMPILE_MODES)}")
        self.trainer, self.mode = trainer, mode
        # In the optimizers' order (weight-decay groups first), which is the order GatedAdam.apply expects.
        self.g_params = trainer.opt_g.param_states()[0]
        self.d_params = trainer.opt_d.param_states()[0] if trainer.uses_discriminator else []
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.cuda_graphs = mode in ("reduce-overhead", "max-autotune") and self.g_params[0].is_cuda
        self._static_batch: torch.Tensor | None = None
        self._kernels_decided = False  # dispatch.prepare ran (conv paths timed before tracing / capture)
        if self.cuda_graphs:
            for optimizer in (trainer.opt_g, trainer.opt_d):
                if optimizer is not None:
                    for tensors in optimizer.param_states()[1:]:
                        for t in tensors:
                            torch._dynamo.mark_static_address(t)
            for flag in trainer.pause.buffers():
                torch._dynamo.mark_static_address(flag)
        if mode == "eager":
            self._fn = self.iteration
        else:
            options = dict(mode=mode) if backend == "inductor" else {}
            self._fn = torch.compile(self.iteration, backend=backend, fullgraph=fullgraph, **options)

    # ------------------------------------------------------------------------------ the iteration
    def _average(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Mean over the ranks, as one all-reduce of a flat buffer (traceable: functional collectives)."""
        if self.world == 1:
            return grads
        import torch.distributed._functional_collectives as funcol

        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = funcol.all_reduce(flat, "sum", dist.group.WORLD) / self.world
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    def gradients(self, network: str, loss: torch.Tensor) -> list[torch.Tensor]:
        """The gradient back-end of :func:`~deepsim.train.step.run_iteration`: ``autograd.grad`` w.r.t. the
        network's parameters (in its optimizer's order), averaged over the ranks."""
        params = self.g_params if network == "g" else self.d_params
        return self._average(list(torch.autograd.grad(loss, params)))

    def apply(self, network: str, grads: list[torch.Tensor], enabled: torch.Tensor | bool) -> None:
        (self.trainer.opt_g if network == "g" else self.trainer.opt_d).apply(grads, enabled)

    def iteration(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """One functional iteration (what is compiled): the trainer's iteration
        (:func:`~deepsim.train.step.run_iteration`) with this step as its gradient back-end."""
        return run_iteration(self.trainer, batch, self)

    def __call__(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self._kernels_decided:  # time the conv blocks' Triton vs cuDNN paths on real tensors first:
            dispatch.prepare(self.trainer.compute_losses, batch)  # the trace reads them, capture never times
            self._kernels_decided = True
        if self.cuda_graphs:  # a CUDA graph reads its input from a fixed address
            if self._static_batch is None or self._static_batch.shape != batch.shape:
                self._static_batch = torch.empty_like(batch)
                torch._dynamo.mark_static_address(self._static_batch)
            self._static_batch.copy_(batch, non_blocking=True)
            batch = self._static_batch
        with _trace_autograd():
            return self._fn(batch)


def compile_step(trainer, mode: str = "default") -> CompiledStep:
    """The trainer's iteration compiled with ``torch.compile(mode=mode, fullgraph=True)``; see the module doc."""
    return CompiledStep(trainer, mode)


def count_graph_breaks(trainer, batch: torch.Tensor) -> tuple[int, int, list[str]]:
    """(graph count, graph-break count, break reasons) of the compiled step, from ``torch._dynamo.explain``.

    Runs one iteration (it updates the trainer's state like a real step).
    """
    step = CompiledStep(trainer, "eager")
    torch._dynamo.reset()
    with _trace_autograd():
        explanation = torch._dynamo.explain(step.iteration)(batch)
    return explanation.graph_count, explanation.graph_break_count, [str(r.reason) for r in explanation.break_reasons]
