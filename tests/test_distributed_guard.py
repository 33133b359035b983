"""Stage 2 and GRPO run the model in several passes outside the wrapper's forward: plain DDP would
silently skip the gradient sync, so it is refused with the fix named; DeepSpeed and one process pass."""

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from mirage_trl.errors import MirageError
from mirage_trl.trainers.common import check_distributed_support


@pytest.mark.parametrize("kind", [DistributedType.MULTI_GPU, DistributedType.MULTI_CPU])
def test_plain_ddp_is_refused_with_the_fix(kind):
    with pytest.raises(
        MirageError, match=r"stage 2 on several processes needs DeepSpeed.*zero_configs/zero2.yaml"
    ):
        check_distributed_support(SimpleNamespace(distributed_type=kind, num_processes=2), "stage 2")


@pytest.mark.parametrize(
    "kind,procs", [(DistributedType.DEEPSPEED, 2), (DistributedType.NO, 1), (DistributedType.MULTI_GPU, 1)]
)
def test_deepspeed_and_single_process_pass(kind, procs):
    assert (
        check_distributed_support(SimpleNamespace(distributed_type=kind, num_processes=procs), "stage 2")
        is None
    )
