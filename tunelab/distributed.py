"""Running a recipe on several processes: PyTorch DDP through Hugging Face accelerate, not an engine of our own.

`accelerate launch --multi_gpu --num_processes N` (accelerate's torchrun launcher; on CPUs too) or `torchrun
--nproc_per_node N` starts one process per device (gloo on CPUs, NCCL on GPUs) and sets RANK / WORLD_SIZE; a
recipe run without them is one process and takes none of the paths below. (`accelerate launch --cpu
--num_processes N` is accelerate's MPI path: without an mpirun hostfile it starts a single process.)

What a recipe does with it, and why:
- `train.batch_size` is the *global* batch: every rank builds the same global batch order (a pure function of
  seed and epoch) and takes its slice of each batch (`shard`), so a recipe is the same optimisation on any
  number of processes. batch_size must divide by the world size; the last, smaller batch of an epoch is cut
  as evenly as it goes, and a rank left without a row runs one row at weight 0 (DDP needs every rank in
  every backward pass).
- Loss normalisation: a model's loss is a mean over its batch's label units (tokens with a label, or rows).
  DDP *averages* gradients over ranks, which would give every rank's mean the same weight however many
  tokens it had; `loss_weight` scales rank r's loss by W * n_r / N (n_r its label units, N the global
  batch's), so the averaged gradient is that of the mean over the whole global batch, as on one process.
- Evaluation (`shard`/`gather` in tunelab.inference): the inference batches are the single-process ones; rank r
  runs batches r, r+W, ... and every rank gathers all outputs by position, then scores the full ordered set:
  no example dropped or counted twice at an uneven end, and metrics equal to one process's.
- Logging, progress bars, tracking, checkpoints and the model folder: the main process only (`is_main`).
"""

from dataclasses import dataclass

import torch

from tunelab.errors import TunelabError
from tunelab.runtime import is_main, pick_device, rank, world_size  # noqa: F401 (the launcher's view, re-exported)


@dataclass
class Dist:
    """This process's place in the run; `accelerator` is None when the run is one process."""
    world: int = 1
    rank: int = 0
    device: torch.device | None = None
    accelerator: object = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shards(self, items: list) -> list[list]:
        """Every rank's contiguous slice of `items`, in rank order (sizes differ by at most one, larger first)."""
        size, extra = divmod(len(items), self.world)
        bounds = [r * size + min(r, extra) for r in range(self.world + 1)]
        return [items[bounds[r]:bounds[r + 1]] for r in range(self.world)]

    def shard(self, items: list) -> list:
        """This rank's slice of `items` (all of them on one process)."""
        return items if self.world == 1 else self.shards(items)[self.rank]

    def gather(self, local: dict) -> dict:
        """Merge every rank's {position: value} into one dict, on every rank (values are pickled)."""
        if self.world == 1:
            return local
        from accelerate.utils import gather_object

        merged = {}
        for part in gather_object([local]):
            merged.update(part)
        return merged

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def agree(self, flag: bool) -> bool:
        """The main process's decision, on every rank (e.g. a checkpoint due by the clock)."""
        if self.world == 1:
            return flag
        from accelerate.utils import broadcast_object_list

        return bool(broadcast_object_list([flag])[0])

    def require_shared(self, found: bool, path) -> None:
        """What the main process wrote (checkpoint, best weights) must be what every process reads: on
        several machines output_dir has to be on a filesystem they share. Fail loudly rather than go on with
        different weights on different ranks."""
        if self.world > 1 and self.sum([float(found)])[0] not in (0.0, float(self.world)):
            raise TunelabError(f"{path}: some processes find the run's checkpoint files and some do not; on "
                               "several machines output_dir must be on a filesystem they all share")

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def wrap(self, model, outside_forward: tuple = ()):
        """The model for the training forward/backward: DDP-wrapped by accelerate when distributed (gradients
        all-reduced in backward), the model itself otherwise. Evaluation and saving use the plain model.

        outside_forward: name prefixes of parameters the recipe uses outside the model's forward (multi-task
        uncertainty weights, applied to the returned loss); DDP cannot hook those, so it leaves them alone
        and `average_grads` averages their gradients after the backward pass."""
        if self.world == 1:
            return model
        ignored = [n for n, _ in model.named_parameters() if outside_forward and n.startswith(outside_forward)]
        if ignored:
            from torch.nn.parallel import DistributedDataParallel

            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        return self.accelerator.prepare_model(model, device_placement=False)

    def average_grads(self, params) -> None:
        """Average gradients over the ranks by hand: for the parameters `wrap` kept out of DDP."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad)
                p.grad /= self.world

    def no_sync(self, wrapped, sync: bool):
        """Skip the gradient all-reduce on micro-batches that only accumulate (grad_accum)."""
        import contextlib

        if self.world == 1 or sync:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(wrapped)


def start(device_name: str, find_unused: bool = False) -> Dist:
    """Join the launched process group (or not, on one process) and say which device this rank uses.

    find_unused: DDP tolerates parameters that take no part in a step (multi-task heads of other tasks)."""
    if world_size() == 1:
        return Dist(device=pick_device(device_name))
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, DistributedType

    if device_name.startswith("cuda:"):
        raise TunelabError(f"train.device={device_name}: a distributed run puts each process on its own device "
                           "(the launcher's local rank); use train.device=auto or cuda")
    # Precision is tunelab's (train.bf16 autocast), not accelerate's: an accelerate config's mixed_precision
    # would wrap the model's forward a second time.
    cpu = device_name == "cpu" or (device_name == "auto" and not torch.cuda.is_available())
    acc = Accelerator(cpu=cpu, mixed_precision="no",
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)])
    if acc.distributed_type not in (DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise TunelabError(f"accelerate distributed_type {acc.distributed_type.value}: tunelab trains with DDP "
                           "(MULTI_GPU or MULTI_CPU) so far; its checkpoints need every parameter on every rank, "
                           "which FSDP and DeepSpeed shard. Use recipes/accelerate/ddp.yaml (see docs/distributed.md)")
    device = torch.device("cpu") if acc.device.type == "cpu" else acc.device  # accelerate says cpu:RANK
    return Dist(world=acc.num_processes, rank=acc.process_index, device=device, accelerator=acc)


def check_batch(batch_size: int, dist: Dist, key: str = "train.batch_size") -> None:
    """The global batch must split evenly over the processes."""
    if batch_size % dist.world:
        raise TunelabError(f"config key {key!r}: {batch_size} is the global batch and must divide by the "
                           f"{dist.world} processes (each takes batch_size / processes rows); use e.g. "
                           f"{key}={batch_size - batch_size % dist.world or dist.world}")


def describe_batch(batch_size: int, grad_accum: int, dist: Dist) -> str:
    per_device = batch_size // dist.world
    return (f"effective global batch {batch_size * grad_accum} = {per_device} per device x {grad_accum} "
            f"accumulation x {dist.world} process(es)")


def loss_units(feature: dict) -> int:
    """What a model's loss averages over in this feature: labelled tokens (token labels, -100 = none; a
    causal LM's first label is always -100, so its shift changes nothing), or one row (a class label, a
    score, a label vector, an answer span)."""
    labels = feature.get("labels")  # (extractive QA's features have answer positions instead: one row)
    return sum(1 for t in labels if t != -100) if isinstance(labels, list) else 1


def loss_weight(features: list, global_rows: list, mine: list, dist: Dist) -> float:
    """Factor for this rank's mean loss so that DDP's average over ranks is the global batch's mean:
    W * n_r / N (1 on one process)."""
    if dist.world == 1:
        return 1.0
    total = sum(loss_units(features[i]) for i in global_rows)
    return dist.world * sum(loss_units(features[i]) for i in mine) / max(1, total)


def batch_weights(features: list, batches: list[list[int]]) -> list[float]:
    """train.loss_weighting=tokens: each batch's weight on its mean loss, its loss units over the epoch's mean
    units per batch, so that every unit (a labelled token) weighs the same whatever the batch it falls in."""
    units = [sum(loss_units(features[i]) for i in b) for b in batches]
    mean = sum(units) / max(1, len(units))
    return [u / mean if mean else 1.0 for u in units]


def rng_states(dist: Dist) -> dict:
    """Every rank's torch RNG state (dropout), collected on every rank: {"torch": rank 0's, "torch.rank1": ...}."""
    own = torch.get_rng_state()
    if dist.world == 1:
        return {"torch": own}
    states = dist.gather({dist.rank: own})
    return {("torch" if r == 0 else f"torch.rank{r}"): s for r, s in states.items()}


def seed_ranks(seed: int, dist: Dist) -> None:
    """Different dropout noise on each rank (the same seed everywhere would draw the same masks on every
    shard); the model's initial weights were drawn before this, identical on every rank."""
    if dist.world > 1:
        torch.manual_seed(seed + 1_000_003 * dist.rank)
