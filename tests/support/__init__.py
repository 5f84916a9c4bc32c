"""Test scaffolding shared by the test folders (the product never imports it).

- `megatron`: the built-in trainer at test size (tiny-GPT flags, layout-independent weights
  seeded by name, per-step records and a NaN-gradient hook) and the single-process
  reference run with `optim.Spectra` on the trainer's own batches;
- `core_loop`: megatron-core's own loop (model chunks, MoE) and its single-process reference;
- `fsdp`: FSDP runs of the benchmark's tiny LLaMA and their single-process reference;
- `fsdp_workers`, `torchtitan_workers`: what the FSDP tests' two launches run.

Spawned test processes unpickle their functions by module name, so workers live in
importable modules: `tests.support.*`, with the repository root on pytest's `pythonpath`
(pytest.ini), which spawned children inherit.
"""
