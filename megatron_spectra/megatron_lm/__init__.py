"""Megatron-LM itself (its `pretrain_gpt.py`) with Spectra, above the megatron-core adapter:

- `hook`: importing it patches Megatron-LM's training package for `--optimizer spectra-*`
  (what `patches/apply.sh` adds to pretrain_gpt.py);
- `__main__`: the zero-edit runner, `torchrun ... -m megatron_spectra.megatron_lm
  /path/to/Megatron-LM/pretrain_gpt.py [args]`.

Importing this package installs nothing.
"""
