"""TEST-ONLY: Lightning's ``DeepSpeedStrategy`` made to run on the CPU (gloo), for CI without GPUs.

Lightning refuses DeepSpeed off CUDA in three places; DeepSpeed's own engine (ZeRO-1/2,
``save_checkpoint``) runs on the CPU. This subclass overrides exactly those three:

* ``setup_environment``: the "only supported on CUDA GPUs" accelerator check;
* ``setup_distributed``: the device-index validation (CPU devices have no index);
* ``root_device``: ``cpu`` instead of ``cuda:<local_rank>``.

It also keeps DeepSpeed from JIT-compiling its optional shared-memory all-reduce op for the CPU
(``deepspeed_shm_comm``, ~2-3 min with g++ on a 2-core box): it is only a faster all-reduce than
gloo's, and ``deepspeed.comm`` falls back to ``torch.distributed`` when the op is marked
incompatible, which is what we do while the communication backend is created.

It relies on Lightning internals and is never offered to users (it is not in the ``onedc``
package and no config names it); it exists so that the DeepSpeed code paths of the stages
(single optimiser, ZeRO partitioned optimiser state, checkpoint folders) are tested on the CPU.
"""
from __future__ import annotations

import deepspeed.ops
import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

SHM_OP = "deepspeed_shm_comm"


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` on ``accelerator="cpu"`` with the gloo backend (tests only)."""

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA check; keep the rest of the parent chain (DDP's set-up).
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # DeepSpeedStrategy's version minus the device-index validation.
        reset_seed()
        self.set_world_ranks()
        compatible = deepspeed.ops.__compatible_ops__
        saved = compatible.get(SHM_OP)
        compatible[SHM_OP] = False
        try:
            self._init_deepspeed_distributed()
        finally:
            compatible[SHM_OP] = saved

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)

    def _get_process_group_backend(self) -> str:
        return "gloo"


def release_distributed() -> None:
    """Destroy this process's torch.distributed group and DeepSpeed's cached references to it.

    In-process DeepSpeed tests share a pytest worker: a later test must not find the process
    group objects an earlier one destroyed (DeepSpeed caches them in module globals).
    """
    import sys

    import torch

    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and hasattr(groups, "_release_process_group_references"):
        groups._release_process_group_references()
