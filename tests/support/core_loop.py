"""megatron-core's own training loop at test size, for what the built-in trainer does not
build: mixture-of-experts and the interleaved (virtual pipeline) schedule.

    with megatron_world(tp=2, expert_model_parallel_size=2):
        run = CoreRun(core_config(tp=2, ep=2, **CORE_MOE), core_optimizer_config())
        losses = [run.step() for _ in range(4)]
    core_reference(4, **CORE_MOE)     # one process, the reference Spectra, the whole batch

megatron-core's GPTModel (local spec) in model chunks, DDP, our get_megatron_optimizer and
megatron-core's forward_backward_func, on seeded random tokens. The weights come from
`CoreWeights`: one full tensor per global name (global layer and expert index), of which each
rank keeps its TP (expert TP) block, so every layout trains the same model.
"""

from __future__ import annotations

import torch

from tests.support.megatron import SEED, full_weight, global_name, megatron_world

CORE_GPT = dict(
    num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2, kv_channels=8,
    gated_linear_unit=True, normalization="RMSNorm", layernorm_epsilon=1e-5, add_bias_linear=False,
    hidden_dropout=0.0, attention_dropout=0.0,
)
CORE_MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_router_load_balancing_type="none",
                moe_aux_loss_coeff=0.0, moe_token_dispatcher_type="allgather", moe_grouped_gemm=False)
CORE_VOCAB, CORE_SEQ = 64, 16


def core_config(tp=1, pp=1, ep=1, etp=None, vpp=None, **model):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    fields = {**CORE_GPT, **model}
    return TransformerConfig(
        **fields, activation_func=F.silu,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=etp if etp is not None else tp,
        sequence_parallel=tp > 1 and "num_moe_experts" in fields,  # megatron-core's MoE asks for it under TP
        use_cpu_initialization=True, params_dtype=torch.float32, pipeline_dtype=torch.float32,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )


def core_chunks(config) -> list:
    """This rank's model chunks (one per virtual stage), weights from `CoreWeights`."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    vpp = config.virtual_pipeline_model_parallel_size
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts, moe_grouped_gemm=False, normalization="RMSNorm")
    chunks = []
    for stage in range(vpp or 1):
        vp = stage if vpp else None
        chunk = GPTModel(
            config=config, transformer_layer_spec=_sequence_parallel_norms(spec, config, vp), vocab_size=CORE_VOCAB,
            max_sequence_length=CORE_SEQ,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=False, position_embedding_type="rope", vp_stage=vp,
        )
        CoreWeights()(chunk, vp)
        chunks.append(chunk)
    return chunks


class SequenceParallelRMSNorm:
    """torch's RMSNorm with its weight marked `sequence_parallel`, as TE's and Apex's norms mark
    theirs (finalize_model_grads then sums its gradient over TP). The local spec's norm
    (WrappedTorchNorm) refuses sequence parallelism, which megatron-core's MoE asks for under
    TP; TE and Apex are not installable on CPU."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = True
        return norm


def _sequence_parallel_norms(spec, config, vp_stage):
    """The local layer spec with SequenceParallelRMSNorm everywhere (under sequence parallelism)."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if not config.sequence_parallel:
        return spec
    layer = ModuleSpec(module=spec.module, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=SequenceParallelRMSNorm, pre_mlp_layernorm=SequenceParallelRMSNorm))
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=SequenceParallelRMSNorm)


class CoreWeights:
    """NamedWeights for megatron-core chunks: the global layer index from megatron's own layer
    offset (virtual stages included) and the global expert index (EP rank x local experts + i);
    experts are cut by the expert TP group, everything else by the TP group."""

    @torch.no_grad()
    def __call__(self, module, vp_stage=None) -> None:
        import re

        from megatron.core import parallel_state as ps
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

        offset = get_transformer_layer_offset(module.config, vp_stage)
        experts = module.config.num_moe_experts
        local = experts // ps.get_expert_model_parallel_world_size() if experts else 0
        for name, p in module.named_parameters():
            name = global_name(name, offset)
            expert = re.search(r"local_experts\.(\d+)\.", name)
            if expert:
                index = ps.get_expert_model_parallel_rank() * local + int(expert.group(1))
                name = name.replace(expert.group(0), f"local_experts.{index}.")
                tp, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
            else:
                tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
            p.copy_(_tp_block(full_weight(name, _full_shape(p, tp), SEED), p, tp, rank))


def _full_shape(p, tp) -> tuple:
    shape = list(p.shape)
    if getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0:
        shape[p.partition_dim] *= tp
    return tuple(shape)


def _tp_block(full, p, tp, rank):
    if not (getattr(p, "tensor_model_parallel", False) and getattr(p, "partition_dim", -1) >= 0):
        return full
    chunks = torch.chunk(full, tp * getattr(p, "partition_stride", 1), dim=p.partition_dim)
    return torch.cat(chunks[rank::tp], dim=p.partition_dim)


def core_batch(iteration: int, global_batch: int) -> dict:
    """The iteration's global batch of random tokens (the same for every layout)."""
    g = torch.Generator().manual_seed(SEED + iteration % 2)  # two batches in turn: the loss falls
    tokens = torch.randint(0, CORE_VOCAB, (global_batch, CORE_SEQ + 1), generator=g)
    return {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": torch.ones(global_batch, CORE_SEQ),
            "position_ids": torch.arange(CORE_SEQ).expand(global_batch, CORE_SEQ)}


def _micro_batches(batch: dict, dp: int, dp_rank: int, micro: int) -> list:
    mine = {k: v.chunk(dp)[dp_rank] for k, v in batch.items()}
    n = mine["tokens"].shape[0] // micro
    return [{k: v[i * micro : (i + 1) * micro] for k, v in mine.items()} for i in range(n)]


def core_optimizer_config(**spectra):
    from megatron_spectra.megatron.config import SpectraOptimizerConfig

    return SpectraOptimizerConfig(**{**CORE_OPTIMIZER, **spectra})


CORE_OPTIMIZER = dict(optimizer="spectra-adamw", lr=1e-2, weight_decay=0.1, clip_grad=1.0, spectra_mode="accurate",
                      spectra_clip_threshold=0.5, spectra_clip_schedule="constant", use_distributed_optimizer=True)
CORE_REFERENCE = dict(base="adamw", clip_threshold=0.5, clip_schedule="constant", mode="accurate")


class CoreRun:
    """One training run of `core_chunks` in megatron-core's loop, on this process's part of the
    world (entered after megatron_world): `step()` trains one iteration and returns its loss."""

    def __init__(self, config, optimizer_config, global_batch=8, micro_batch=2):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_spectra.megatron.factory import get_megatron_optimizer

        ddp = DistributedDataParallelConfig(use_distributed_optimizer=optimizer_config.use_distributed_optimizer,
                                            grad_reduce_in_fp32=True)
        self.chunks = core_chunks(config)
        self.models = [DistributedDataParallel(config=config, ddp_config=ddp, module=c) for c in self.chunks]
        config.finalize_model_grads_func = finalize_model_grads
        no_sync = [m.no_sync for m in self.models]
        config.no_sync_func = no_sync if len(no_sync) > 1 else no_sync[0]
        self.optimizer = get_megatron_optimizer(optimizer_config, self.models)
        lr = optimizer_config.lr
        self.scheduler = OptimizerParamScheduler(  # constant lr and weight decay, for checkpoints
            self.optimizer, init_lr=lr, max_lr=lr, min_lr=lr, lr_warmup_steps=0, lr_decay_steps=1, lr_decay_style="constant",
            start_wd=optimizer_config.weight_decay, end_wd=optimizer_config.weight_decay, wd_incr_steps=1,
            wd_incr_style="constant")
        self.global_batch, self.micro_batch, self.iteration = global_batch, micro_batch, 0

    def step(self) -> float:
        from megatron.core import parallel_state as ps
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_spectra.train.loop import global_loss
        from megatron_spectra.train.model import forward_step

        for m in self.models:
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        parts = _micro_batches(core_batch(self.iteration, self.global_batch), ps.get_data_parallel_world_size(),
                               ps.get_data_parallel_rank(), self.micro_batch)
        data = [iter(parts) for _ in self.models]
        reduced = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data if len(data) > 1 else data[0],
            model=self.models if len(self.models) > 1 else self.models[0], num_microbatches=len(parts),
            seq_length=CORE_SEQ, micro_batch_size=self.micro_batch, forward_only=False,
        )
        ok, _, _ = self.optimizer.step()
        assert ok, "a step was skipped"
        self.scheduler.step(increment=1)
        self.iteration += 1
        return global_loss(reduced)


def core_reference(steps: int, global_batch: int = 8, spectra_kwargs: dict | None = None, **model) -> list[float]:
    """`steps` iterations of the core model in this one process with the reference Spectra on
    the whole batch: wd on the Linear weights only (the paper's placement: not the embedding
    and output layer), global grad-norm clipping at CORE_OPTIMIZER's clip_grad."""
    from megatron_spectra.optim import Spectra
    from megatron_spectra.train.model import forward_step

    with megatron_world():
        (module,) = core_chunks(core_config(**model))
        named = list(module.named_parameters())
        decayed = lambda p: p.ndim >= 2 and not getattr(p, "is_embedding_or_output_parameter", False)  # noqa: E731
        groups = [{"params": [p for _, p in named if decayed(p)], "param_names": [n for n, p in named if decayed(p)],
                   "weight_decay": CORE_OPTIMIZER["weight_decay"]},
                  {"params": [p for _, p in named if not decayed(p)], "param_names": [n for n, p in named if not decayed(p)],
                   "weight_decay": 0.0}]
        opt = Spectra(groups, lr=CORE_OPTIMIZER["lr"], **(spectra_kwargs or CORE_REFERENCE))
        losses = []
        for iteration in range(steps):
            opt.zero_grad()
            output, loss_func = forward_step(iter([core_batch(iteration, global_batch)]), module)
            total, tokens, _ = loss_func(output)
            (total / tokens).backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), CORE_OPTIMIZER["clip_grad"])
            opt.step()
            losses.append((total / tokens).item())
    return losses
