"""The built-in trainer: `python -m megatron_spectra.train [Megatron-LM flags]`.

Pretrains a megatron-core GPTModel with megatron-core's DDP, the (Spectra)DistributedOptimizer
from our factory, the pipeline schedules, OptimizerParamScheduler and megatron-core's indexed
dataset + GPTDataset; Megatron-LM's flag names and log lines. The main job (`spectra demo`)
and cluster launches both run it.

Modules: `args` (the flags), `data` (corpus -> tokenizer -> indexed dataset -> GPTDataset),
`model` (GPTModel, LLaMA-style via flags), `loop` (the Trainer), `norms` (update spectral
norms), `logs` (log lines, progress bar, metrics.jsonl), `checkpoint`, `main` (process set-up).
"""

from .args import build_parser

__all__ = ["build_parser"]
