"""SPECTRA through Megatron-Bridge 0.3.1: a recipe's ConfigContainer, `use_spectra` (the one
line), Bridge's own model provider (GPTModelProvider, local layer spec, wrapped in
megatron-core DDP by `provide_distributed_model`) and Bridge's own `setup_optimizer`, on CPU
processes under gloo; against the single-process reference `Spectra` on the same batches.
Then Bridge's `pretrain()` end to end (ZeRO-1 over 2 ranks, mock data, a checkpoint).

Needs megatron-bridge (scripts/install.sh installs it without its CUDA-only dependencies);
Transformer Engine is stood in for Bridge's import-time use only (tests/support/bridge.py).
"""

import pytest
import torch

pytest.importorskip("megatron.core")

from tests.support.bridge import missing_for_bridge  # noqa: E402

_MISSING = missing_for_bridge()
pytestmark = [
    pytest.mark.skipif(_MISSING is not None, reason=f"megatron-bridge not importable here (missing {_MISSING}); see scripts/install.sh"),
    pytest.mark.timeout(900),
    pytest.mark.slow,
]

from megatron_spectra.launch.spawn import run_distributed  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ, VOCAB, LR, WD, C = 4, 4, 16, 64, 3e-3, 0.1, 0.5


def recipe(**optimizer):
    """A tiny GPT recipe: Bridge's ConfigContainer as its recipes build it."""
    from megatron.bridge.models import GPTModelProvider
    from megatron.bridge.models.gpt_provider import local_layer_spec
    from megatron.bridge.training.config import (
        CheckpointConfig, ConfigContainer, LoggerConfig, MockGPTDatasetConfig, OptimizerConfig, SchedulerConfig,
        TokenizerConfig, TrainingConfig,
    )

    model = GPTModelProvider(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64, seq_length=SEQ,
        vocab_size=VOCAB, make_vocab_size_divisible_by=1, transformer_layer_spec=local_layer_spec,
        share_embeddings_and_output_weights=False, hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
        normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False, position_embedding_type="rope",
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False,
    )
    return ConfigContainer(
        model=model,
        train=TrainingConfig(train_iters=STEPS, global_batch_size=GLOBAL_BATCH, micro_batch_size=GLOBAL_BATCH // 2),
        optimizer=OptimizerConfig(optimizer="adam", lr=LR, min_lr=LR, weight_decay=WD, clip_grad=1.0, **optimizer),
        scheduler=SchedulerConfig(lr_decay_style="constant", lr_warmup_iters=0, start_weight_decay=WD, end_weight_decay=WD,
                                  weight_decay_incr_style="constant"),
        dataset=MockGPTDatasetConfig(random_seed=1, seq_length=SEQ, reset_position_ids=False, reset_attention_mask=False,
                                     eod_mask_loss=False, dataloader_type="single", num_workers=0),
        logger=LoggerConfig(),
        tokenizer=TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=VOCAB),
        checkpoint=CheckpointConfig(),
    )


def _batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def _loss(model, tokens, labels):
    position_ids = torch.arange(SEQ).expand_as(tokens)
    return model(tokens, position_ids, None, labels=labels).float().mean()


def _train_through_bridge(rank, world, distributed):
    """Every rank: the recipe + use_spectra, Bridge's setup_optimizer, STEPS steps on this
    rank's half of each batch. Returns the initial and final weights, the classes built and
    (rank 0) the reference run's final weights."""
    import warnings

    warnings.filterwarnings("ignore")
    from tests.support.bridge import import_bridge
    from tests.support.megatron import megatron_world

    bridge_optim = import_bridge()
    from megatron_spectra.megatron_bridge import use_spectra

    cfg = recipe(use_distributed_optimizer=distributed)
    cfg.ddp.use_distributed_optimizer = distributed
    use_spectra(cfg, "spectra-adamw", spectra_clip_threshold=C, spectra_clip_schedule="constant", spectra_mode="accurate")
    with megatron_world():
        cfg.validate()  # as pretrain() does: finalizes model, ddp, scheduler; re-checks the optimizer config
        model = cfg.model.provide_distributed_model(ddp_config=cfg.ddp, wrap_with_ddp=True)
        initial = {n: p.detach().clone() for n, p in model[0].module.named_parameters()}
        optimizer, scheduler = bridge_optim.setup_optimizer(cfg.optimizer, cfg.scheduler, model)
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        for step in range(STEPS):
            tokens, labels = _batch(step)
            for chunk in model:
                chunk.zero_grad_buffer()
            optimizer.zero_grad()
            _loss(model[0], tokens[rows], labels[rows]).backward()
            for chunk in model:
                chunk.finish_grad_sync()
            ok, _, _ = optimizer.step()
            assert ok
            scheduler.step(increment=1)
        final = {n: p.detach().clone() for n, p in model[0].module.named_parameters()}
        kinds = [type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        reference = _reference(cfg, initial) if rank == 0 else None
    arrays = lambda weights: weights and {n: t.numpy() for n, t in weights.items()}  # noqa: E731 -- by value through the queue
    return {"initial": arrays(initial), "final": arrays(final), "kinds": kinds, "config": type(cfg.optimizer).__name__,
            "reference": arrays(reference)}


def _reference(cfg, initial: dict) -> dict:
    """In this process (inside megatron_world): the same model and batches, the reference
    Spectra on the whole batch, the paper's weight decay (Linear weights only) and global
    grad-norm clipping."""
    from megatron_spectra.optim import Spectra

    model = cfg.model.provide()
    for name, p in model.named_parameters():
        p.data.copy_(initial[name])
    named = list(model.named_parameters())
    decayed = lambda p: p.ndim >= 2 and not getattr(p, "is_embedding_or_output_parameter", False)  # noqa: E731
    groups = [{"params": [p for _, p in named if decayed(p)], "weight_decay": WD},
              {"params": [p for _, p in named if not decayed(p)], "weight_decay": 0.0}]
    opt = Spectra(groups, lr=LR, base="adamw", clip_threshold=C, clip_schedule="constant", mode="accurate")
    for step in range(STEPS):
        opt.zero_grad()
        _loss(model, *_batch(step)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("distributed", [True, False], ids=["zero1-dp2", "ddp-dp2"])
def test_setup_optimizer_trains_like_the_reference(distributed):
    results = run_distributed(_train_through_bridge, 2, args=(distributed,), timeout=600)
    assert results[0]["config"] == "SpectraOptimizerConfig"
    assert results[0]["kinds"] == ["SpectraDistributedOptimizer" if distributed else "SpectraFP32Optimizer"]
    initial, expected = results[0]["initial"], results[0]["reference"]
    for name, want in expected.items():
        want = torch.from_numpy(want)
        assert (want - torch.from_numpy(initial[name])).abs().max() > 0, name
        for rank in (0, 1):
            got = torch.from_numpy(results[rank]["final"][name])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} rank {rank}: {m}")


def test_use_spectra_keeps_the_recipe_and_routes_setup_optimizer():
    from tests.support.bridge import import_bridge

    bridge_optim = import_bridge()
    from megatron_spectra.megatron import factory
    from megatron_spectra.megatron_bridge import uninstall, use_spectra

    cfg = recipe(use_distributed_optimizer=True, adam_beta2=0.95, bf16=True)
    cfg.scheduler.lr_warmup_iters = 2
    original = bridge_optim.get_megatron_optimizer
    try:
        got = use_spectra(cfg, "spectra-signum", spectra_clip_threshold=C)
        assert cfg.optimizer is got and got.optimizer == "spectra-signum"
        assert (got.lr, got.min_lr, got.weight_decay, got.clip_grad, got.adam_beta2) == (LR, LR, WD, 1.0, 0.95)
        assert got.use_distributed_optimizer and got.bf16
        assert (got.spectra_clip_threshold, got.spectra_warmup_steps, got.spectra_total_steps) == (C, 2, STEPS)
        assert bridge_optim.get_megatron_optimizer is factory.get_megatron_optimizer
    finally:
        uninstall()
    assert bridge_optim.get_megatron_optimizer is original
    with pytest.raises(TypeError, match="no field 'spectra_clip_treshold'"):
        use_spectra(recipe(), spectra_clip_treshold=1.0)


@pytest.mark.parametrize("section, key, flag", [("dist", "use_torch_fsdp2", "--use-torch-fsdp2"),
                                                ("ddp", "use_megatron_fsdp", "--use-megatron-fsdp"),
                                                ("dist", "use_megatron_fsdp", "--use-megatron-fsdp")])
def test_use_spectra_refuses_fsdp(section, key, flag):
    from tests.support.bridge import import_bridge

    import_bridge()
    from megatron_spectra.megatron_bridge import use_spectra

    cfg = recipe()
    setattr(getattr(cfg, section), key, True)
    with pytest.raises(ValueError, match=rf"spectra-adamw does not support {section}\.{key} \({flag}\): .*use --use-distributed-optimizer"):
        use_spectra(cfg)


def _pretrain(rank, world, workdir):
    """Bridge's pretrain() on CPU: the recipe + use_spectra, ZeRO-1 over 2 ranks, mock data,
    a torch_dist checkpoint at the end. Returns each step's loss and the optimizer's classes."""
    import warnings

    warnings.filterwarnings("ignore")
    from tests.support.bridge import bridge_on_cpu, import_bridge

    import_bridge()
    from megatron.bridge.training.callbacks import Callback
    from megatron.bridge.training.gpt_step import forward_step
    from megatron.bridge.training.pretrain import pretrain

    from megatron_spectra.megatron_bridge import use_spectra

    seen = {"losses": [], "kinds": None}

    class Watch(Callback):
        def on_train_step_end(self, context):
            seen["losses"].append(float(context.loss_dict["lm loss"]))
            seen["kinds"] = [type(o).__name__ for o in getattr(context.optimizer, "chained_optimizers", [context.optimizer])]

    cfg = recipe(use_distributed_optimizer=True)
    cfg.ddp.use_distributed_optimizer = True
    cfg.dist.distributed_backend = "gloo"
    cfg.train.eval_iters = 0
    cfg.checkpoint.save, cfg.checkpoint.save_interval = f"{workdir}/checkpoints", STEPS
    use_spectra(cfg, "spectra-adamw", spectra_clip_threshold=C)
    with bridge_on_cpu():
        pretrain(cfg, forward_step, callbacks=[Watch()])
    return seen


def test_pretrain_trains_with_spectra_on_cpu(tmp_path):
    results = run_distributed(_pretrain, 2, args=(str(tmp_path),), timeout=800)
    losses = results[0]["losses"]
    assert results[0]["kinds"] == ["SpectraDistributedOptimizer"]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    assert results[1]["losses"] == losses  # the reduced loss, alike on every rank
    assert (tmp_path / "checkpoints" / f"iter_{STEPS:07d}").is_dir()
