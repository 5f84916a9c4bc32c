"""SPECTRA through torchtitan's optimizer and LR-scheduler containers, on CPU.

    pip install --no-deps torchtitan==0.3.0 spmd_types==0.2.3 && pip install tyro
    torchrun --nproc_per_node=2 examples/torchtitan_cpu.py [--steps 5]

A few steps of a tiny LLaMA (the FSDP benchmark's model) under FSDP2 over gloo processes.
torchtitan's own LLaMA-3 cannot train on CPU (FlexAttention has no CPU backward), so the
model is not torchtitan's; the optimizer container, its param groups from FQN patterns and
the warmup schedule are. Each step prints the loss, the lr and SPECTRA's threshold c_k,
which follows the warmup so that c_k * lr_k stays c * peak lr.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist
from torchtitan.components.optimizer import LRSchedulersContainer

from megatron_spectra.bench.models import LlamaConfig, TinyLlama, batch, loss_fn, parallelize
from megatron_spectra.fsdp.torchtitan import spectra_optimizer


def main(steps: int) -> None:
    dist.init_process_group("gloo")
    world, cfg = dist.get_world_size(), LlamaConfig()
    model = TinyLlama(cfg)
    dp_rank, dp_size = parallelize(model, "fsdp", world)
    optimizers = spectra_optimizer(lr=1e-2, base="adamw", warmup_steps=2, clip_threshold=1.0).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=steps)
    spectra = optimizers.optimizers[0]
    for step in range(steps):
        x, y = batch(step, cfg, global_batch=8)
        loss = loss_fn(model, x.chunk(dp_size)[dp_rank], y.chunk(dp_size)[dp_rank])
        loss.backward()
        lr = spectra.param_groups[0]["lr"]
        optimizers.step()
        optimizers.zero_grad()
        schedulers.step()
        if dist.get_rank() == 0:
            print(f"step {step}: loss (rank 0's batch) {loss.item():.4f}  lr {lr:.2e}  c {spectra.last_threshold:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    main(parser.parse_args().steps)
