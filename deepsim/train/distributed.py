"""Multi-GPU and multi-node training: torchrun environment, process group, DDP wrapping of G and D.

Run it with torchrun; nothing else changes::

    torchrun --nproc-per-node 8 -m deepsim.cli train --preset autoencoder-stl10-alexnet --data /data/stl10
    torchrun --nnodes 2 --node-rank R --master-addr HOST --master-port 29500 --nproc-per-node 8 \\
        -m deepsim.cli train ...

:func:`init_from_env` reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` (set by
torchrun) and starts the process group: NCCL when the process has a GPU (device ``cuda:LOCAL_RANK``), gloo
on CPU. Without those variables the run is single-process and nothing is initialised.

How the two backward passes meet DDP (eager step, ``--compile off``):

* G is wrapped as ``DDP(_GenerateModule)``: a module that holds G and calls the task's ``generate`` (the
  VAE calls ``encode``/``decode``, not ``forward``), so DDP sees every G forward. G's objective is the only
  loss differentiated w.r.t. G's parameters (``backward(inputs=G params)``), so G's reducer fires once per
  step and averages G's gradients over the ranks.
* D is wrapped as ``DDP(D)`` and runs three times per step. Its pass on the fakes for G's adversarial term
  runs under ``D.no_sync()``: that graph is differentiated only for G (``inputs=`` excludes D's
  parameters), so D's reducer must not expect gradients from it. The two passes of D's own loss (reals,
  detached fakes) run with sync on, and D's single backward (``inputs=`` D's parameters) all-reduces D's
  gradients once. In the default update order ("code") that backward and D's update come first, and the
  no_sync pass runs afterwards on the updated D (identical on every rank, as its gradients were averaged);
  in "simultaneous" the no_sync pass runs first. Every trainable parameter of both networks gets a gradient
  every step (fixed up-conv biases have ``requires_grad=False`` and DDP skips them), so the graphs are
  static and ``find_unused_parameters`` stays off.
* The pause rule's inputs (L_D_real, L_D_fake, L_adv) are averaged over the ranks with an all-reduce (a
  device collective, not a host sync), so every rank takes the same pause decision and the replicas stay
  identical. The logged metrics are the same averages (the loop also averages G's terms when it reads them).

The compiled step (:mod:`deepsim.train.compiled`) does not use DDP's hooks (they fire on ``.grad``
accumulation, which the functional step does not do); it all-reduces a flat gradient buffer per network
inside the graph with functional collectives. Both paths average gradients over the ranks, so a step with
world size W and per-rank batch B is one Adam step on the mean gradient of W*B images.

Checkpoints hold the unwrapped networks' state dicts (rank 0 writes them) and the data stream's global
sample cursor (deepsim.data.sampling), so a run resumes with another world size: the cursor says which
sample comes next in the job's stream, whatever the number of ranks that read it, and W ranks of B samples
read the same samples and crops as one process of W*B. At each checkpoint every rank reports a fingerprint
of its parameters (:func:`replica_fingerprints`); the checkpoint records them, and differing replicas are
reported. Dropout masks differ per rank (the torch RNG is offset by the rank after the networks are built).

Restarts: with ``torchrun --max-restarts N`` and ``deepsim train --resume auto`` a lost worker (or node)
brings the whole job back to its newest valid checkpoint; rank 0 picks that checkpoint and broadcasts its
path (:func:`broadcast_object`), so every rank loads the same file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DistributedContext",
    "init_from_env",
    "wrap_ddp",
    "all_reduce_mean",
    "broadcast_state",
    "broadcast_object",
    "replica_fingerprints",
    "barrier",
    "cleanup",
    "rank_world",
    "resolve_device",
]

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class DistributedContext:
    rank: int  # global rank (0 writes checkpoints and logs)
    world: int  # number of processes
    local_rank: int  # rank on this node (selects the GPU)
    device: torch.device  # this process's device
    initialized_here: bool  # init_from_env started the process group (so cleanup() ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the current process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else is checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def _device_for(local_rank: int, requested: str) -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` when CUDA is asked for (or "auto" finds it), else
    cpu."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if requested.startswith("cuda") or requested == "auto":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {requested}: CUDA is not available on this machine (use --device cpu)"
            )
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} GPU(s): "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        return torch.device("cuda", local_rank)
    return torch.device(requested)


def init_from_env(
    device: str = "auto", *, backend: str | None = None, timeout_s: float = 1800
) -> DistributedContext:
    """Start the process group from torchrun's variables (if set) and pick this process's device.

    Args:
        device: the configured device ("auto" | "cpu" | "cuda" | "cuda:N"); under torchrun a CUDA device
            becomes ``cuda:LOCAL_RANK``.
        backend: "nccl" | "gloo" (None: nccl on CUDA, gloo on CPU).
        timeout_s: collective timeout.

    Returns:
        a :class:`DistributedContext`. Without ``WORLD_SIZE`` in the environment and no process group already
        started, a single-process context (rank 0 of 1).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistributedContext(rank, world, local_rank, _device_for(local_rank, device), False)
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistributedContext(0, 1, 0, resolve_device(device), False)
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise ValueError(
            f"WORLD_SIZE is set but {', '.join(missing)} is not: start distributed runs with torchrun"
        )
    target = _device_for(local_rank, device)
    if target.type == "cuda":
        torch.cuda.set_device(target)
    backend = backend or ("nccl" if target.type == "cuda" else "gloo")
    dist.init_process_group(
        backend, timeout=timedelta(seconds=timeout_s), device_id=target if backend == "nccl" else None
    )
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, target, True)


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cleanup(context: DistributedContext | None = None) -> None:
    """End the process group if ``context`` started it (or, with no context, if one is running)."""
    if dist.is_available() and dist.is_initialized() and (context is None or context.initialized_here):
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the ranks, as a new tensor: a functional all-reduce, so it also traces
    into a compiled graph, and no host sync on NCCL."""
    # lazy: a torch built without distributed support cannot import it (only reached with a process group)
    import torch.distributed._functional_collectives as funcol

    return funcol.all_reduce(tensor.detach(), "sum", dist.group.WORLD) / dist.get_world_size()


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s (picklable) ``obj`` on every rank; ``obj`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def _fingerprint(modules, device: torch.device) -> torch.Tensor:
    """An int64 0-dim tensor that changes with any bit of the modules' parameters and buffers: the bit
    patterns of each tensor summed (wrapping), weighted by the tensor's place. Equal replicas give equal
    values."""
    bits_of = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}
    total = torch.zeros((), dtype=torch.int64, device=device)
    place = 0
    for module in modules:
        for tensor in module.state_dict().values():
            place += 1
            t = tensor.detach().contiguous()
            if t.dtype.is_floating_point or t.dtype.is_complex:
                t = t.view(bits_of[t.element_size()])
            total += t.to(torch.int64).sum() * (2 * place + 1)
    return total


def replica_fingerprints(trainer) -> list[int]:
    """Every rank's fingerprint of G, D and the pause state (one all-gather; call it on all ranks at once).

    Returns:
        [fingerprint of rank 0, rank 1, ...]; one entry without a process group.
    """
    modules = [m for m in (trainer.generator, trainer.discriminator, trainer.pause) if m is not None]
    device = next(trainer.generator.parameters()).device
    mine = _fingerprint(modules, device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [int(mine)]
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    return [int(t) for t in gathered]


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does when it wraps a module)."""
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src)


class _GenerateModule(nn.Module):
    """G plus the task's ``generate`` as ``forward``, so DDP sees every G forward (encode/decode included)."""

    def __init__(self, generator: nn.Module, generate):
        super().__init__()
        self.generator = generator
        self._generate = generate

    def forward(self, g_input: torch.Tensor):
        return self._generate(g_input)


def wrap_ddp(trainer, device: torch.device, *, ddp: bool = True) -> None:
    """Make ``trainer`` average over the ranks: G and D in DDP (``ddp=True``, the eager step) and the pause
    inputs all-reduced. ``ddp=False`` (the compiled step, which all-reduces its gradients in-graph) only sets
    the pause-input averaging. The trainer's own ``generator``/``discriminator`` stay the unwrapped modules,
    so its state dicts (and checkpoints) do not depend on the world size.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device_ids = [device.index] if device.type == "cuda" else None
    if ddp:
        trainer._parallel["generate"] = DistributedDataParallel(
            _GenerateModule(trainer.generator, trainer.generate), device_ids=device_ids
        )
        if trainer.uses_discriminator:
            trainer._parallel["discriminator"] = DistributedDataParallel(
                trainer.discriminator, device_ids=device_ids
            )
    else:
        broadcast_state(trainer)
    trainer._parallel["average"] = all_reduce_mean
