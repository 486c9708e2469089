"""Several processes: what the launcher asked for is what runs, or the run stops before anything loads.

    torchrun --nproc_per_node N -m llava_lora train ...                                           DDP
    accelerate launch --config_file $(llava-lora config-path fsdp2) -m llava_lora train ...         FSDP2
    llava-lora config-path NAME      the path of a shipped accelerate config (ddp, fsdp2, zero2, zero3)

The launchers say what they were asked in the environment of each process (WORLD_SIZE; accelerate's
ACCELERATE_USE_FSDP, FSDP_VERSION, ACCELERATE_USE_DEEPSPEED); ``make_accelerator`` builds accelerate's Accelerator
and compares what it set up with that. Two launches would otherwise run something else, silently:

- ``accelerate launch --cpu`` takes accelerate's one-process launcher whatever ``--num_processes`` and the config
  say (it sets MASTER_PORT for the processes it was asked for, but starts one and tells it nothing else);
- accelerate 1.15 sets up FSDP and DeepSpeed only on an accelerator: on a CPU it falls back to DDP. FSDP2 is
  torch's ``fully_shard``, which runs on a CPU over gloo, so there accelerate is told FSDP (``_fsdp_on_cpu``);
  DeepSpeed is refused on a CPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..config import field as config_field
from ..errors import UsageError

CONFIGS = ("ddp", "fsdp2", "zero2", "zero3")


@dataclass(frozen=True)
class Asked:
    """What the launcher asked for: the number of processes and the strategy (none, ddp, fsdp1, fsdp2, zero2...)."""

    world: int
    strategy: str

    @classmethod
    def from_env(cls, env=os.environ) -> "Asked":
        world = int(env.get("WORLD_SIZE", "1"))
        if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            strategy = f"zero{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '')}"
        elif env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
            strategy = f"fsdp{env.get('FSDP_VERSION', '1')}"
        else:
            strategy = "ddp" if world > 1 else "none"
        return cls(world, strategy)


def _refuse_one_process_launcher(env=os.environ) -> None:
    """accelerate launch --cpu: one process started (no WORLD_SIZE) where more were asked (MASTER_PORT set)."""
    if "ACCELERATE_USE_CPU" in env and "WORLD_SIZE" not in env and "MASTER_PORT" in env:
        raise UsageError("accelerate launch started one process where more were asked: with --cpu (or use_cpu: "
                         "true, or distributed_type: NO in its config) it takes its one-process launcher, whatever "
                         "--num_processes and the config say. Drop --cpu (without a GPU the processes run on the "
                         "CPU anyway) and give a config: llava-lora config-path ddp|fsdp2; or use torchrun "
                         "--nproc_per_node N")


def _fsdp_on_cpu(accelerator) -> None:
    """Tell accelerate FSDP where it set up DDP only because the device is a CPU (its state offers FSDP on
    accelerators alone): torch's fully_shard runs on a CPU over gloo, and accelerate's FSDP2 code then applies."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables accelerate launch set
    if plugin.fsdp_version != 2:
        raise UsageError("FSDP on a CPU runs as FSDP2 only (fsdp_version: 2, as the shipped fsdp2 config)")
    accelerator.state.fsdp_plugin = plugin
    # both states: each AcceleratorState() made later copies the process state's distributed type
    PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP


def make_accelerator(device: str, mixed_precision: str):
    """accelerate's Accelerator for this run, checked against what the launcher asked (``UsageError`` if not)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    _refuse_one_process_launcher()
    asked = Asked.from_env()
    if asked.strategy.startswith("zero") and device == "cpu":
        raise UsageError(f"DeepSpeed ZeRO-{asked.strategy[4:]} was asked on a CPU: accelerate 1.15 runs DeepSpeed "
                         "on accelerators only (its launcher and state skip it with cpu); use the fsdp2 config")
    # One process may run several trainings (a notebook, the tests), each with its own precision; accelerate
    # keeps the first one's in a process-wide singleton (the distributed state, PartialState, is kept).
    AcceleratorState._reset_state()
    # find_unused_parameters: a micro-batch without images leaves the projector without gradients
    acc = Accelerator(cpu=device == "cpu", mixed_precision=mixed_precision,
                      kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if asked.strategy.startswith("fsdp") and acc.distributed_type == DistributedType.MULTI_CPU:
        _fsdp_on_cpu(acc)
    ran = strategy(acc)
    if ran == "fsdp1":
        raise UsageError("FSDP1 (fsdp_version: 1) is not supported: use FSDP2, as the shipped config does "
                         "(llava-lora config-path fsdp2)")
    if acc.num_processes != asked.world or ran != asked.strategy:
        raise UsageError(f"the launcher asked for {asked.world} process(es) with {asked.strategy}, but accelerate "
                         f"set up {acc.num_processes} with {ran} ({acc.distributed_type}): check the launch "
                         "command and its --config_file")
    return acc


def strategy(acc) -> str:
    """none, ddp, fsdp1, fsdp2, zero2, zero3: how ``acc`` spreads the run."""
    from accelerate.utils import DistributedType

    kind = acc.distributed_type
    if kind == DistributedType.FSDP:
        return f"fsdp{acc.state.fsdp_plugin.fsdp_version}"
    if kind == DistributedType.DEEPSPEED:
        return f"zero{acc.state.deepspeed_plugin.zero_stage}"
    return "none" if acc.num_processes == 1 else "ddp"


def describe(acc) -> str:
    """The start line's part: 'FSDP2 over 2 processes on 1 node (gloo): every weight sharded, ...'."""
    how = strategy(acc)
    if how == "none":
        return "one process"
    nodes = acc.num_processes // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", acc.num_processes)))
    n = acc.num_processes
    where = f"{n} process{'es' if n > 1 else ''} on {nodes} node{'s' if nodes > 1 else ''} ({acc.state.backend})"
    sharding = {"ddp": "the whole model on every process, gradients averaged",
                "fsdp1": "every weight sharded (FSDP1)",
                "fsdp2": "every weight sharded, frozen and trained, gathered layer by layer",
                "zero2": "optimizer state and gradients sharded, weights whole",
                "zero3": "every weight sharded, gathered layer by layer"}[how]
    return f"{how.upper().replace('ZERO', 'ZeRO-')} over {where}: {sharding}"


def sharded(acc) -> bool:
    """Whether each process holds only shards of the weights (FSDP, ZeRO-3)."""
    return strategy(acc) in ("fsdp1", "fsdp2", "zero3")


def trained_state(acc, loss_module, peft_model) -> dict:
    """name -> whole tensor of every trained parameter, gathered from the shards (every process must call it, in
    the same order): what ``save_pretrained(state_dict=...)`` writes as a plain peft adapter."""
    from torch.distributed.tensor import DTensor

    trained = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    if strategy(acc) == "zero3":  # DeepSpeed's partitions: accelerate gathers the whole model (untested here)
        whole = acc.get_state_dict(loss_module)
        return {n: whole[f"peft_model.{n}"] for n in trained} if acc.is_main_process else {}
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for n, p in peft_model.named_parameters() if p.requires_grad}


@contextlib.contextmanager
def whole_root(module, sharded_run: bool):
    """``module``'s own shard group gathered meanwhile (FSDP2's unshard): for generation, which calls the wrapped
    model's parts without going through ``module``'s forward. Every process must enter it."""
    if not sharded_run:
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def optimizer_state(acc, module, optimizer) -> dict:
    """The optimizer's state to save: whole (gathered by torch's distributed state-dict API) where sharded."""
    if not sharded(acc):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(module, optimizer.optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_optimizer(acc, module, optimizer, state: dict) -> None:
    """``optimizer_state``'s inverse: under FSDP each process keeps its shard of the whole state."""
    if strategy(acc).startswith("zero"):
        raise UsageError("--resume under DeepSpeed ZeRO: the checkpoints hold rank 0's share of the optimizer state "
                         "only; resume under DDP or FSDP2")
    if not sharded(acc):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(module, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))


# --------------------------------------------------------------------------------------------- config-path
@dataclass
class ConfigPathConfig:
    name: str = config_field(positional=True, help="a shipped accelerate config: " + ", ".join(CONFIGS))

    def __post_init__(self) -> None:
        if self.name not in CONFIGS:
            raise UsageError(f"config-path {self.name}: no such config; the shipped ones are {', '.join(CONFIGS)}")


def config_path(name: str) -> Path:
    return Path(str(resources.files("llava_lora") / "recipes" / "accelerate" / f"{name}.yaml"))


def main(cfg: ConfigPathConfig) -> int:
    print(config_path(cfg.name))
    return 0
