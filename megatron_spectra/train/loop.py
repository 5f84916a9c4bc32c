"""The training loop: Megatron-LM's `pretrain` reduced to what a GPT pretraining run needs,
built from megatron-core parts only: parallel_state, GPTModel, DDP with the distributed
optimizer, our `get_megatron_optimizer` (spectra-* and megatron's own names), the pipeline
schedules with finalize_model_grads, and OptimizerParamScheduler for lr and weight decay.
"""

from __future__ import annotations

import math
import os
import random
import time

import numpy
import torch
import torch.distributed as dist

from . import checkpoint, integrity
from ..engine import comm_device
from ..megatron.arguments import spectra_config_from_args
from ..megatron.scalars import spectra_scalars
from .args import padded_vocab_size
from .data import build_datasets, build_tokenizer, ensure_builtin_corpus, micro_batches
from .logs import MetricsFile, ProgressBar, training_line, validation_lines
from .model import build_model, forward_step
from .norms import UpdateNorms


class Trainer:
    """`Trainer(args, device).run()` trains this rank's part of the model for the parsed flags.

    Two optional hooks, for callers that need to see inside a run (the tests do):
    - `init_model(module)`: called with this rank's GPTModel stage right after it is built,
      before DDP wraps it and before any --load; it may overwrite the weights in place.
    - `on_step(trainer, record)`: called at the start of `run()` with record None (after any
      --load) and after every iteration with that iteration's record (lm_loss, skipped, lr,
      ...); `trainer.iteration`, `.model` and `.optimizer` are the live ones.
    """

    def __init__(self, args, device: torch.device, init_model=None, on_step=None):
        from megatron.core import parallel_state as ps

        self.args, self.device = args, device
        self.rank0 = dist.get_rank() == 0
        tokenizer = build_tokenizer(args)
        data_path = args.data_path or [ensure_builtin_corpus(args.trainer_out, tokenizer)]
        self.train_ds, self.valid_ds, _ = build_datasets(args, tokenizer, data_path)
        self.dp_rank = ps.get_data_parallel_rank()
        module = build_model(args, padded_vocab_size(tokenizer.vocab_size, args))
        if init_model is not None:
            init_model(module)
        self.model = wrap_ddp(module.to(device), args)
        self.optimizer = build_optimizer(args, self.model)
        self.scheduler = build_scheduler(args, self.optimizer)
        self.iteration, self.eval_round = 0, 0
        if args.load:
            resumed = checkpoint.load(args.load, self.model, self.optimizer, self.scheduler, args.ckpt_step,
                                      load_optim=not args.no_load_optim, load_rng=not args.no_load_rng,
                                      finetune=args.finetune)
            self.iteration, self.eval_round = resumed["iteration"], resumed["eval_round"]
        # Megatron-LM's --check-for-nan-in-loss-and-grad. A Spectra optimizer checks the
        # gradients itself (--spectra-nonfinite: raise naming the parameter, or skip the step);
        # with skip, a non-finite loss is skipped as well, as asked.
        spectra = args.optimizer.startswith("spectra-")
        self.check_loss = args.check_for_nan_in_loss_and_grad and not (spectra and args.spectra_nonfinite == "skip")
        self.check_grads = args.check_for_nan_in_loss_and_grad and not spectra
        self.on_step = on_step
        self.norms = UpdateNorms([self.model], self.optimizer, args.weight_decay) if args.trainer_update_norms else None
        self.metrics = MetricsFile(os.path.join(args.trainer_out, "metrics.jsonl") if self.rank0 else None)
        self.tensorboard = _tensorboard(args.tensorboard_dir) if self.rank0 else None

    # ------------------------------------------------------------------ one iteration

    def _batches(self, dataset, index: int):
        return iter([{k: v.to(self.device) for k, v in b.items()} for b in micro_batches(dataset, index, self.args, self.dp_rank)])

    def _forward_backward(self, data, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=[self.model],
            num_microbatches=self.args.num_microbatches, seq_length=self.args.seq_length,
            micro_batch_size=self.args.micro_batch_size, forward_only=forward_only,
        )

    def train_step(self, measure: bool) -> dict:
        """One iteration; its global loss, grad norm, lr, timings and (if measured) update norms."""
        start = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reduced = self._forward_backward(self._batches(self.train_ds, self.iteration), forward_only=False)
        loss = global_loss(reduced)
        if self.check_loss:  # before the step: the weights stay as they were
            integrity.check_loss(loss, self.iteration + 1)
        if self.check_grads:
            integrity.check_gradients(self.model, self.iteration + 1)
        lr = self.optimizer.param_groups[0]["lr"]
        if measure:
            self.norms.arm()
        _sync(self.device)
        step_start = time.perf_counter()
        ok, grad_norm, _ = self.optimizer.step()
        _sync(self.device)
        step_seconds = time.perf_counter() - step_start
        record = {"lr": lr, "grad_norm": _float(grad_norm), "skipped": not ok}
        if measure:
            norms = self.norms.measure(lr)
            if norms is not None:
                record["update_norm_before"], record["update_norm_after"] = norms
        if ok:
            self.scheduler.step(increment=1)
        record["lm_loss"] = loss
        record.update(spectra_scalars(self.optimizer))
        self.iteration += 1
        record["iteration_ms"] = 1000 * (time.perf_counter() - start)
        record["optimizer_ms"] = 1000 * step_seconds
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Megatron-LM's evaluation: --eval-iters global batches of the validation split, each
        evaluation taking the next ones."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64)
        for k in range(self.args.eval_iters):
            reduced = self._forward_backward(self._batches(self.valid_ds, self.eval_round * self.args.eval_iters + k), True)
            totals += _loss_totals(reduced)
        self.eval_round += 1
        self.model.train()
        totals = totals.to(comm_device())
        dist.all_reduce(totals)
        return (totals[0] / totals[1]).item()

    # ------------------------------------------------------------------ the run

    def run(self) -> dict:
        args = self.args
        bar = ProgressBar(args.train_iters, args.trainer_name or args.optimizer) if self.rank0 and args.trainer_progress else None
        window, train_ms, opt_ms, timed = [], 0.0, 0.0, 0
        val_loss = None
        if self.on_step is not None:
            self.on_step(self, None)
        while self.iteration < args.train_iters:
            measure = self.norms is not None and (self.iteration + 1) % args.log_interval == 0
            record = self.train_step(measure)
            window.append(record)
            if self.iteration > 1:  # the first iteration pays for warm-up; not a throughput sample
                train_ms, opt_ms, timed = train_ms + record["iteration_ms"], opt_ms + record["optimizer_ms"], timed + 1
            self.metrics.write("train", iteration=self.iteration, **record)
            self._tensorboard(record)
            if self.iteration % args.log_interval == 0:
                self._log(window)
                window = []
            if bar is not None:
                bar.update(self.iteration, record["lm_loss"])
            if args.eval_iters > 0 and self.iteration % args.eval_interval == 0:
                val_loss = self._validate()
            if args.save and args.save_interval and self.iteration % args.save_interval == 0:
                checkpoint.save(args.save, self.iteration, self.model, self.optimizer, self.scheduler,
                                args.dist_ckpt_optim_fully_reshardable, eval_round=self.eval_round)
            if self.on_step is not None:
                self.on_step(self, record)
        if args.eval_iters > 0 and (val_loss is None or self.iteration % args.eval_interval):
            val_loss = self._validate()
        return self._summary(val_loss, train_ms, opt_ms, timed)

    def _validate(self) -> float:
        loss = self.evaluate()
        if self.rank0:
            print("\n".join(validation_lines(self.iteration, loss)), flush=True)
        self.metrics.write("valid", iteration=self.iteration, lm_loss=loss)
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("lm loss validation", loss, self.iteration)
        return loss

    def _log(self, window: list[dict]) -> None:
        if not self.rank0:
            return
        args, last = self.args, window[-1]
        extra = {}
        if "spectra/clip-threshold" in last:
            extra["spectra threshold"] = float(last["spectra/clip-threshold"])
        if "update_norm_before" in last:
            extra["update norm before clip"] = last["update_norm_before"]
            extra["update norm after clip"] = last["update_norm_after"]
        line = training_line(
            self.iteration, args.train_iters, self.iteration * args.global_batch_size,
            sum(r["iteration_ms"] for r in window) / len(window), last["lr"], args.global_batch_size,
            sum(r["lm_loss"] for r in window) / len(window), last["grad_norm"],
            sum(r["skipped"] for r in window), sum(not math.isfinite(r["lm_loss"]) for r in window), extra,
        )
        print(line, flush=True)

    def _tensorboard(self, record: dict) -> None:
        if self.tensorboard is None:
            return
        for key in ("lm_loss", "lr", "grad_norm", "update_norm_before", "update_norm_after"):
            if record.get(key) is not None:
                self.tensorboard.add_scalar(key.replace("_", " "), record[key], self.iteration)
        for key, value in record.items():
            if key.startswith("spectra/"):
                self.tensorboard.add_scalar(key, value, self.iteration)

    def _summary(self, val_loss, train_ms: float, opt_ms: float, timed: int) -> dict:
        args = self.args
        seconds = train_ms / 1000
        summary = {
            "name": args.trainer_name or args.optimizer, "optimizer": args.optimizer, "lr": args.lr,
            "iterations": self.iteration, "val_loss": val_loss,
            "tokens_per_s": timed * args.global_batch_size * args.seq_length / seconds if seconds > 0 else None,
            "optimizer_share": opt_ms / train_ms if train_ms > 0 else None,
            "tp": args.tensor_model_parallel_size, "pp": args.pipeline_model_parallel_size, "dp": args.data_parallel_size,
        }
        self.metrics.write("summary", **summary)
        self.metrics.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary


# ---------------------------------------------------------------------- building blocks


def wrap_ddp(module, args):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        use_distributed_optimizer=args.use_distributed_optimizer, grad_reduce_in_fp32=True,
        overlap_grad_reduce=False, overlap_param_gather=False,
    )
    model = DistributedDataParallel(config=module.config, ddp_config=ddp_config, module=module)
    # As Megatron-LM does: the schedule then reduces grads over DP (and ties PP stages) itself.
    module.config.finalize_model_grads_func = finalize_model_grads
    module.config.no_sync_func = model.no_sync
    return model


def optimizer_config(args):
    """megatron-core's OptimizerConfig from the args (Megatron-LM copies every field it finds
    on args the same way); a SpectraOptimizerConfig for spectra-* names."""
    import dataclasses

    from megatron.core.optimizer import OptimizerConfig

    from ..megatron.config import OPTIMIZERS

    if args.optimizer in OPTIMIZERS:
        return spectra_config_from_args(args)
    fields = {f.name for f in dataclasses.fields(OptimizerConfig) if f.init}
    return OptimizerConfig(**{name: getattr(args, name) for name in fields if hasattr(args, name)})


def build_optimizer(args, model):
    from ..megatron.factory import get_megatron_optimizer

    return get_megatron_optimizer(optimizer_config(args), [model])


def build_scheduler(args, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=args.lr_warmup_init, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters, lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay, end_wd=args.weight_decay, wd_incr_steps=args.train_iters, wd_incr_style="constant",
        wsd_decay_steps=args.lr_wsd_decay_iters, lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def set_seed(seed: int) -> None:
    """Megatron-LM's seeding: the same seed on every TP and DP rank of a pipeline stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    seed = seed + 100 * ps.get_pipeline_model_parallel_rank()
    random.seed(seed)
    numpy.random.seed(seed)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def _loss_totals(reduced) -> torch.Tensor:
    """(sum of token losses, number of tokens) of this rank's micro-batches (last stage only)."""
    total = torch.zeros(2, dtype=torch.float64)
    for item in reduced:
        total += item["lm loss"].detach().double().cpu()
    return total


def global_loss(reduced) -> float:
    """Mean token loss of the global batch, on every rank. TP ranks report the same numbers
    twice over, numerator and denominator alike, so the ratio is exact."""
    totals = _loss_totals(reduced).to(comm_device())
    dist.all_reduce(totals)
    return (totals[0] / totals[1]).item()


def _float(value):
    return None if value is None else float(value)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _tensorboard(path: str | None):
    if not path:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise SystemExit(f"--tensorboard-dir needs the tensorboard package ({error})") from error
    return SummaryWriter(log_dir=path)
