"""The model: megatron-core's GPTModel with the local (non-Transformer-Engine) layer spec,
configured from Megatron-LM's flags the way Megatron-LM's `core_transformer_config_from_args`
and `gpt_builders` do for a LLaMA-style model (--swiglu --normalization RMSNorm
--position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def transformer_config(args):
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        add_bias_linear=not args.disable_bias_linear,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size, sequence_parallel=False,
        # Every rank draws the full weight from the same seed and keeps its TP block, so the
        # model does not depend on the layout (and DDP, which does not broadcast, stays consistent).
        use_cpu_initialization=True,
        bf16=args.bf16, params_dtype=dtype, pipeline_dtype=dtype,
        # The fused kernels are CUDA-only and optional; the unfused paths run everywhere.
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
    )


def build_model(args, vocab_size: int):
    """This rank's pipeline stage of the GPT."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(args)
    model = GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization=args.normalization),
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
    )
    return model.to(config.params_dtype)


def forward_step(data_iterator, model):
    """Megatron-LM's GPT forward step: next-token loss over the loss mask; reports the sum and
    the token count so that the global mean is exact across micro-batches and DP ranks."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    loss_mask = batch["loss_mask"]

    def loss_func(output_tensor):
        losses = output_tensor.float().view(-1)
        mask = loss_mask.view(-1).float()
        loss = torch.sum(losses * mask)
        num_tokens = mask.sum().clone().detach().to(torch.int)
        # Cloned: the schedule divides `loss` in place.
        return loss, num_tokens, {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.float().view(1)])}

    return output, loss_func
