"""Megatron-LM's FSDP paths with `--optimizer spectra-*`: refused at start-up, on every rank,
with a message naming the flag and what to use instead.

- `--use-torch-fsdp2`: megatron-core's TorchFullyShardedDataParallel calls torch's
  `fully_shard` on every TransformerLayer, the embedding and the model, so each parameter
  becomes a DTensor shard (Shard(0) over the data-parallel mesh) of its tensor-parallel
  piece. The wrapper itself cannot be built on CPU: it hard-codes
  `DeviceMesh.from_group(group, "cuda")`, and fully_shard then puts the parameters on that
  CUDA device. Tested here: the same `fully_shard` of a real megatron-core GPT on a CPU
  mesh, which the factory refuses by its DTensor parameters.
- `--use-megatron-fsdp`: Megatron-FSDP's wrapper (mcore_fsdp_adapter) cannot be built on CPU
  either (its device meshes are "cuda", its buffers `torch.cuda` allocations, and it needs
  einops); the factory reads the flag from the model chunks' `ddp_config.use_megatron_fsdp`,
  which is what that wrapper carries. Tested with a real GPT carrying such a ddp_config.
- Megatron-LM: the hook refuses both flags in validate_args, before any model is built;
  tested through `pretrain_gpt.py` and the zero-edit runner on 2 ranks when MEGATRON_LM
  names a checkout.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")

from megatron_spectra.launch.spawn import run_all_failures  # noqa: E402

pytestmark = pytest.mark.slow

WHY = {
    "--use-torch-fsdp2": "--optimizer spectra-adamw does not support --use-torch-fsdp2: megatron-core's TorchFullyShardedDataParallel",
    "--use-megatron-fsdp": "--optimizer spectra-adamw does not support --use-megatron-fsdp: Megatron-FSDP keeps the main params",
}


def _build_on_fsdp(rank, world, how):
    """A real megatron-core GPT, its parameters made FSDP2 DTensors (or its ddp_config
    saying Megatron-FSDP); then our factory. Returns what it raised."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from megatron_spectra.megatron.config import SpectraOptimizerConfig
    from megatron_spectra.megatron.factory import get_megatron_optimizer
    from tests.support.megatron import megatron_world

    with megatron_world():
        config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True)
        model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=32, max_sequence_length=8,
                         share_embeddings_and_output_weights=False)
        if how == "--use-torch-fsdp2":  # TorchFullyShardedDataParallel's calls, on a CPU mesh
            mesh = init_device_mesh("cpu", (world,))
            for module in model.modules():
                if isinstance(module, TransformerLayer):
                    fully_shard(module, mesh=mesh)
            fully_shard(model, mesh=mesh)
            assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        else:
            model.ddp_config = DistributedDataParallelConfig(use_megatron_fsdp=True)
        opt_config = SpectraOptimizerConfig(optimizer="spectra-adamw", lr=1e-3)
        get_megatron_optimizer(opt_config, [model])
        torch.distributed.barrier()
    return "built"


@pytest.mark.parametrize("flag", sorted(WHY))
def test_factory_refuses_fsdp_on_every_rank(flag):
    outcomes = run_all_failures(_build_on_fsdp, 2, args=(flag,), timeout=300)
    for ok, value in outcomes:
        assert not ok, value
        assert "ValueError: " + WHY[flag] in value, value[-2000:]
        assert "--use-distributed-optimizer" in value


# ----------------------------------------------------------------------------- Megatron-LM

MEGATRON_LM = os.environ.get("MEGATRON_LM")
REPO = Path(__file__).resolve().parents[2]
ARGS = (
    "--optimizer spectra-adamw --mock-data --tokenizer-type NullTokenizer --vocab-size 127 --num-layers 2 "
    "--hidden-size 64 --num-attention-heads 4 --seq-length 32 --max-position-embeddings 32 --micro-batch-size 2 "
    "--global-batch-size 4 --train-iters 2 --lr 1e-3 --transformer-impl local --untie-embeddings-and-output-weights "
    "--no-gradient-accumulation-fusion --ckpt-format torch_dist --spectra-cpu"
).split()


@pytest.mark.skipif(not MEGATRON_LM, reason="set MEGATRON_LM to a Megatron-LM checkout")
@pytest.mark.parametrize("flag", sorted(WHY))
def test_megatron_lm_refuses_fsdp_at_start_up_on_every_rank(flag, tmp_path):
    from tests.megatron.test_megatron_lm import _env, _free_port, _requirements

    _requirements()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
               "-m", "megatron_spectra.megatron_lm", str(Path(MEGATRON_LM) / "pretrain_gpt.py"), *ARGS, flag]
    env = _env(tmp_path)
    env["CUDA_DEVICE_MAX_CONNECTIONS"] = "8"  # Megatron's FSDP checks want more than one; ours comes first anyway
    done = subprocess.run(command, cwd=MEGATRON_LM, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert len(re.findall(re.escape("ValueError: " + WHY[flag]), output)) == 2, output[-3000:]  # both ranks
    assert "building GPT model" not in output  # refused before any model was built
