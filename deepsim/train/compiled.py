"""The whole DeePSiM iteration as one ``torch.compile`` graph, with no graph break.

:class:`CompiledStep` compiles :func:`deepsim.train.step.run_iteration` with itself as the gradient
back-end: ``torch.autograd.grad`` (traced with Dynamo's ``trace_autograd_ops``, turned on around every call
and nowhere else) and ``GatedAdam.apply``, gated by the pause rule's device bools, with an in-graph
functional all-reduce when world > 1. No host sync happens inside an iteration. Under "reduce-overhead" the
parameters, optimizer state and pause flags are static addresses and the batch is copied into a static
buffer. Design notes (CUDA graphs, dropout RNG, kernel dispatch, launch counts): docs/compiled_step.md.
"""

from __future__ import annotations

import contextlib

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
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
        combo_kernels: let inductor fuse data-independent kernels horizontally into one launch (its
            ``combo_kernels`` option: e.g. the bf16 casts of the weights under autocast); default: on CUDA.
    """

    def __init__(
        self,
        trainer,
        mode: str = "default",
        *,
        fullgraph: bool = True,
        backend: str = "inductor",
        combo_kernels: bool | None = None,
    ):
        if mode not in COMPILE_MODES + ("eager",):
            raise ValueError(f"--compile {mode!r}: expected one of off, {', '.join(COMPILE_MODES)}")
        self.trainer, self.mode = trainer, mode
        # In the optimizers' order (weight-decay groups first), which is the order GatedAdam.apply expects.
        self.g_params = trainer.opt_g.param_states()[0]
        self.d_params = trainer.opt_d.param_states()[0] if trainer.uses_discriminator else []
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.cuda_graphs = mode in ("reduce-overhead", "max-autotune") and self.g_params[0].is_cuda
        self.combo_kernels = self.g_params[0].is_cuda if combo_kernels is None else combo_kernels
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
        combo = inductor_config.patch(combo_kernels=True) if self.combo_kernels else contextlib.nullcontext()
        with _trace_autograd(), combo:
            return self._fn(batch)


def compile_step(trainer, mode: str = "default") -> CompiledStep:
    """The trainer's iteration compiled with ``torch.compile(mode=mode, fullgraph=True)``; see the module
    doc."""
    return CompiledStep(trainer, mode)


def count_graph_breaks(trainer, batch: torch.Tensor) -> tuple[int, int, list[str]]:
    """(graph count, graph-break count, break reasons) of the compiled step, from ``torch._dynamo.explain``.

    Runs one iteration (it updates the trainer's state like a real step).
    """
    step = CompiledStep(trainer, "eager")
    torch._dynamo.reset()
    with _trace_autograd():
        explanation = torch._dynamo.explain(step.iteration)(batch)
    return (
        explanation.graph_count,
        explanation.graph_break_count,
        [str(r.reason) for r in explanation.break_reasons],
    )
