"""The trainer's command line: a subset of Megatron-LM's own flags, spelled and meaning as in
Megatron-LM's `arguments.py`, the `--spectra-*` flags of the Megatron-LM integration, and
trainer-only flags prefixed `--trainer-`.

`build_parser()` is public so that launchers can check the command lines they generate.
An unknown flag is an error naming it (argparse's "unrecognized arguments"); abbreviations
are refused, since Megatron-LM flags share long prefixes (--lr, --lr-warmup-iters, ...).
"""

from __future__ import annotations

import argparse
import math

from ..megatron.arguments import add_spectra_arguments

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")
TOKENIZERS = ("ByteLevelTokenizer", "NullTokenizer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_spectra.train", allow_abbrev=False,
        description="Pretrain a megatron-core GPT with megatron-core's DDP, (Spectra)DistributedOptimizer, "
                    "pipeline schedules and GPTDataset. Megatron-LM flag names.",
    )
    _model_args(parser)
    _training_args(parser)
    _parallel_args(parser)
    _data_args(parser)
    _logging_args(parser)
    _trainer_args(parser)
    add_spectra_arguments(parser)
    return parser


def _model_args(parser) -> None:
    g = parser.add_argument_group("model (Megatron-LM names)")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size, as in Megatron-LM")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=None, help="needs --group-query-attention, as in Megatron-LM")
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--normalization", default="LayerNorm", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--position-embedding-type", default="learned_absolute", choices=["learned_absolute", "rope", "none"])
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)


def _training_args(parser) -> None:
    g = parser.add_argument_group("training (Megatron-LM names)")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data-parallel size")
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])  # add_spectra_arguments adds spectra-*
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", default="linear", choices=DECAY_STYLES)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--lr-wsd-decay-style", default="exponential", choices=WSD_DECAY_STYLES)
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--sgd-momentum", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="stop with an error naming the iteration at a non-finite loss or gradient, before the "
                        "optimizer step (Megatron-LM's default; spectra-* check gradients per --spectra-nonfinite)")
    g.add_argument("--bf16", action="store_true")


def _parallel_args(parser) -> None:
    g = parser.add_argument_group("parallelism (Megatron-LM names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="how long a collective waits for a stalled rank before every rank fails (Megatron-LM's "
                        "flag and default; torch's own is 30 minutes)")


def _data_args(parser) -> None:
    g = parser.add_argument_group("data (Megatron-LM names)")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefixes, optionally weighted ('0.3 A 0.7 B'); absent: build the "
                        "built-in corpus into --trainer-out")
    g.add_argument("--split", default="969, 30, 1", help="train, valid, test proportions (by document)")
    g.add_argument("--tokenizer-type", default="ByteLevelTokenizer", choices=TOKENIZERS,
                   help="ByteLevelTokenizer: megatron-core's byte-level library (256 bytes + EOD); "
                        "NullTokenizer: pre-tokenized data, needs --vocab-size (EOD = vocab size)")
    g.add_argument("--vocab-size", type=int, default=None)
    g.add_argument("--data-cache-path", default=None, help="where GPTDataset caches its indices")


def _logging_args(parser) -> None:
    g = parser.add_argument_group("logging and checkpoints (Megatron-LM names)")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--ckpt-step", type=int, default=None, help="with --load: this iteration's checkpoint, not the latest")
    g.add_argument("--no-load-optim", action="store_true",
                   help="with --load: the weights and the iteration only; a fresh optimizer (e.g. another one)")
    g.add_argument("--no-load-rng", action="store_true", help="with --load: do not restore the RNG states")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: the weights only; iteration 0, fresh optimizer, scheduler and RNG")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="save the distributed optimizer gathered into model space (loadable at another TP/PP/DP "
                        "layout); default: dp_reshardable, which reshards over DP only")
    g.add_argument("--tensorboard-dir", default=None)


def _trainer_args(parser) -> None:
    g = parser.add_argument_group("trainer-only")
    g.add_argument("--trainer-cpu", action="store_true", help="megatron-core on CPU under gloo (machines without a GPU)")
    g.add_argument("--trainer-out", default="runs/train", help="output folder: metrics.jsonl, built-in corpus")
    g.add_argument("--trainer-name", default=None, help="run label in metrics.jsonl and the progress bar")
    g.add_argument("--trainer-progress", action="store_true", help="a progress bar on stderr (rank 0)")
    g.add_argument("--trainer-update-norms", action="store_true",
                   help="measure the largest update spectral norm before/after clipping at every log step")


def parse_args(argv=None, world_size: int = 1) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        derive(args, world_size)
    except ValueError as error:
        parser.error(str(error))
    return args


def derive(args: argparse.Namespace, world_size: int) -> None:
    """Megatron-LM's defaults that depend on other flags, and the checks it makes."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ValueError(f"world size {world_size} is not a multiple of TP={tp} x PP={pp}")
    args.world_size = world_size
    args.data_parallel_size = world_size // (tp * pp)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % (args.micro_batch_size * args.data_parallel_size):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not a multiple of "
                         f"--micro-batch-size {args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.num_query_groups is not None and not args.group_query_attention:
        raise ValueError("--num-query-groups needs --group-query-attention (as in Megatron-LM)")
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    if args.train_iters < 1:
        raise ValueError(f"--train-iters must be at least 1, got {args.train_iters}")
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters < 0 or args.lr_warmup_iters >= args.lr_decay_iters:
        raise ValueError(f"--lr-warmup-iters {args.lr_warmup_iters} must be at least 0 and below --lr-decay-iters "
                         f"({args.lr_decay_iters}; default --train-iters), as megatron-core's scheduler requires")
    if not args.distributed_timeout_minutes > 0:
        raise ValueError(f"--distributed-timeout-minutes must be positive, got {args.distributed_timeout_minutes}")
    if args.lr_decay_style == "WSD" and args.lr_wsd_decay_iters is None:
        raise ValueError("--lr-decay-style WSD needs --lr-wsd-decay-iters")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
    if args.tokenizer_type == "NullTokenizer" and not args.data_path:
        raise ValueError("--tokenizer-type NullTokenizer needs --data-path (the built-in corpus is byte-level)")
    args.cpu = bool(args.trainer_cpu or getattr(args, "spectra_cpu", False))
    args.save_interval = args.save_interval or (args.train_iters if args.save else None)


def padded_vocab_size(vocab_size: int, args) -> int:
    """Megatron-LM's padding: a multiple of --make-vocab-size-divisible-by x TP."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)
