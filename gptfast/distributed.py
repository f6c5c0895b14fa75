"""Data-parallel training on torch.distributed, one process per device, as torchrun launches it.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; setup() reads them and joins the
process group (nccl on CUDA, where each process takes cuda:LOCAL_RANK; gloo on CPU). Without them it returns
SINGLE, whose methods do what a single process does, so the Trainer has one code path.

- Data: every rank draws the same global batch from the same seeded sampler and keeps its own contiguous rows
  (ShardedSampler). The shards together are exactly the single-process batch, and one sampler state serves
  every rank on resume.
- Model: DistributedDataParallel, or with fsdp=True FSDP2 (torch.distributed.fsdp.fully_shard) on each
  transformer Block and then the root, so a Block's parameters are gathered only while it runs and the gptfast
  ops see ordinary, unsharded tensors. Either way the gradients are averaged over ranks: with equal shards the
  step is the single-process step on the global batch (up to the order of floating-point sums).
- Dropout: rank 0 keeps the seeded RNG stream of a single process; rank r > 0 reseeds with seed + r after the
  (identical) model init, so the shards do not share dropout masks. Checkpoints keep every rank's RNG state.
- Checkpoints: the model state is the plain state dict of the unwrapped model and the optimizer state is
  torch's own format (integer ids in param-group order), whatever the wrapping: a checkpoint written by one
  process, DDP or FSDP resumes under any of them, and `gptfast generate` reads it. Under FSDP both are
  gathered to rank 0 (collectives every rank joins) and only rank 0 writes the file, atomically as always.
"""

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import Tensor

from .model import IGNORE_INDEX  # the targets the models' losses skip

ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclasses.dataclass(frozen=True)
class Context:
    """Where this process sits in the job. The default is a single process (no process group)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    fsdp: bool = False
    distributed: bool = False  # launched by torchrun, with a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model to train: DDP or FSDP2 around it, or the model itself for a single process."""
        if not self.distributed:
            return model
        if self.fsdp:
            from torch.distributed.fsdp import fully_shard

            from .model import Block

            for module in model.modules():
                if isinstance(module, Block):
                    fully_shard(module)
            return fully_shard(model)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def shard(self, sampler):
        """This rank's part of `sampler`'s batches (the sampler itself for one process)."""
        return ShardedSampler(sampler, self) if self.distributed else sampler

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def seed(self, seed: int) -> None:
        """Distinct dropout RNG per rank (rank 0 unchanged); call after the identical model init."""
        if self.rank:
            torch.manual_seed(seed + self.rank)

    # ------------------------------------------------------------------------------------ checkpoints
    def model_state_dict(self, model: torch.nn.Module) -> dict:
        """The unwrapped model's full state dict (on rank 0; other FSDP ranks get an empty dict)."""
        if not self.fsdp:
            return self.unwrap(model).state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_state(cpu_offload=True))

    def load_model_state_dict(self, model: torch.nn.Module, state: dict) -> None:
        if not self.fsdp:
            self.unwrap(model).load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        # Every rank read the whole file: a full state dict, which each rank shards for itself.
        set_model_state_dict(model, state, options=_full_state())

    def optimizer_state_dict(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """optimizer.state_dict()'s format; under FSDP gathered (on rank 0) and keyed by id, not by name."""
        if not self.fsdp:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        by_name = get_optimizer_state_dict(model, optimizer, options=_full_state(cpu_offload=True))
        if not by_name:
            return {}
        names = _param_names(model, optimizer)  # id -> name
        index = {name: i for i, name in enumerate(names)}
        groups = [{**g, "params": [index[name] for name in g["params"]]} for g in by_name["param_groups"]]
        return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}

    def load_optimizer_state_dict(self, model, optimizer: torch.optim.Optimizer, state: dict) -> None:
        if not self.fsdp:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        names = _param_names(model, optimizer)
        by_name = {
            "state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
        set_optimizer_state_dict(model, optimizer, by_name, options=_full_state())

    def checkpoint_extra(self, model: torch.nn.Module, rng: dict) -> dict:
        """What a distributed checkpoint adds: every rank's RNG state and, under DDP, per-rank parameter sums
        (replicas must stay equal: the sums of rank r are a cheap witness that they did)."""
        if not self.distributed:
            return {}
        sums = None if self.fsdp else parameter_sums(self.unwrap(model))
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, {"rng": rng, "parameter_sums": sums})
        return {
            "distributed": {
                "world_size": self.world_size,
                "fsdp": self.fsdp,
                "rng": [g["rng"] for g in gathered],
                "parameter_sums": None if self.fsdp else [g["parameter_sums"] for g in gathered],
            }
        }

    def rank_rng_state(self, state: dict) -> dict | None:
        """This rank's RNG state from a checkpoint written by as many ranks, else None (the caller then takes
        the shared one and reseeds per rank, see seed())."""
        saved = state.get("distributed")
        if self.distributed and saved and saved.get("world_size") == self.world_size:
            return saved["rng"][self.rank]
        return None

    # ------------------------------------------------------------------------------------- collectives
    def global_mean_share(self, loss: Tensor, targets: Tensor) -> Tensor:
        """This rank's mean loss, reweighted so that the ranks' average is the global batch's mean loss.

        A rank's loss is the mean over its own counted targets (those that are not IGNORE_INDEX). When the
        shards count differently (padded captions) the plain average of the ranks' means, which DDP's gradient
        averaging and mean() compute, is not the single-process mean; loss * n_r * world_size / sum(n) is.
        With equal counts (text) the factor is exactly 1. One all-reduce of a scalar, no host sync.
        """
        if not self.distributed:
            return loss
        count = (targets != IGNORE_INDEX).sum().float()  # fp32: a bf16 loss could not hold the counts
        total = count.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return loss.float() * (count * self.world_size / total)

    def mean(self, value: Tensor) -> Tensor:
        """The mean of `value` over ranks (a scalar per rank: a loss); the value itself for one process."""
        if not self.distributed:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def close(self, barrier: bool = True) -> None:
        """Leaves the process group; after an error without the barrier, which the other ranks may never
        reach (torchrun then stops them)."""
        if self.distributed and dist.is_initialized():
            if barrier:
                dist.barrier()  # no rank tears the group down while another still saves or logs
            dist.destroy_process_group()


SINGLE = Context()


class ShardedSampler:
    """This rank's rows of each global batch `sampler` draws; next(), state_dict() and load_state_dict()."""

    def __init__(self, sampler, ctx: Context):
        self.sampler, self.ctx = sampler, ctx

    def next(self) -> tuple[Tensor, ...]:
        batch = self.sampler.next()
        rows = batch[0].shape[0] // self.ctx.world_size
        start = self.ctx.rank * rows
        return tuple(t[start : start + rows] for t in batch)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


def setup(device: torch.device, fsdp: bool, batch_size: int) -> tuple[Context, torch.device]:
    """Joins torchrun's process group when launched by it; returns the context and this process's device.

    Raises ValueError for what cannot work: --fsdp without torchrun, a batch that does not split evenly over
    the ranks, an explicit cuda:N that is not this process's GPU.
    """
    missing = [name for name in ENV if name not in os.environ]
    if missing:
        if fsdp:
            raise ValueError(
                "--fsdp shards the model over the processes torchrun starts; run it as "
                "`torchrun --nproc_per_node=N -m gptfast.cli train --fsdp ...`"
            )
        return SINGLE, device
    rank, local_rank, world_size = (int(os.environ[name]) for name in ENV)
    if batch_size % world_size:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch; it must split evenly over the {world_size} "
            "processes"
        )
    if device.type == "cuda":
        if device.index is not None and device.index != local_rank:
            raise ValueError(
                f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK "
                f"(here cuda:{local_rank}); pass --device cuda or auto"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Context(rank, local_rank, world_size, fsdp, distributed=True), device


def parameter_sums(model: torch.nn.Module) -> list[tuple[float, float]]:
    """(sum, sum of squares) in float64 of each parameter, in parameters() order."""
    with torch.no_grad():
        sums = [torch.stack([p.double().sum(), p.double().square().sum()]) for p in model.parameters()]
        sums = torch.stack(sums)
    return [tuple(row) for row in sums.cpu().tolist()]


def _full_state(cpu_offload: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Each parameter's name in the optimizer's id order (torch numbers them through its param groups)."""
    name_of = {id(p): name for name, p in model.named_parameters()}  # a tied parameter: its first name
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
