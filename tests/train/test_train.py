"""The built-in trainer: flags, the data path (the main job is tested in tests/test_demo.py)."""

from __future__ import annotations

import os

import numpy
import pytest

from megatron_spectra.train import build_parser
from megatron_spectra.train.args import parse_args

LLAMA = (
    "--num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --group-query-attention "
    "--num-query-groups 2 --seq-length 32 --max-position-embeddings 32 --swiglu --normalization RMSNorm "
    "--norm-epsilon 1e-5 --position-embedding-type rope --untie-embeddings-and-output-weights --disable-bias-linear "
    "--micro-batch-size 2 --global-batch-size 8 --train-iters 20 --lr 1e-3 --min-lr 0 --lr-decay-style WSD "
    "--lr-warmup-iters 2 --lr-wsd-decay-style minus_sqrt --lr-wsd-decay-iters 4 --weight-decay 0.1 --clip-grad 0.5 "
    "--adam-beta1 0.8 --adam-beta2 0.999 --adam-eps 1e-8 --optimizer spectra-adamw --seed 7 "
    "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 --use-distributed-optimizer --split 90,10,0 "
    "--log-interval 5 --eval-interval 10 --eval-iters 2 --spectra-clip-threshold 10 --spectra-mode accurate "
    "--trainer-cpu --trainer-out /tmp/x"
).split()


def test_parser_takes_megatron_lm_flags():
    args = parse_args(LLAMA, world_size=4)
    assert (args.num_layers, args.num_query_groups, args.optimizer) == (2, 2, "spectra-adamw")
    assert (args.data_parallel_size, args.num_microbatches) == (2, 2)
    assert args.spectra_clip_threshold == 10.0 and args.spectra_mode == "accurate" and args.cpu


@pytest.mark.parametrize("extra, message", [
    (["--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"),
    (["--lr-warmup", "3"], "unrecognized arguments: --lr-warmup"),  # no abbreviations of Megatron-LM flags
    (["--optimizer", "lion"], "invalid choice: 'lion'"),
])
def test_parser_names_what_it_refuses(capsys, extra, message):
    with pytest.raises(SystemExit):
        build_parser().parse_args(LLAMA + extra)
    assert message in capsys.readouterr().err


def test_megatron_lm_checks(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--num-query-groups", "2"])  # Megatron-LM ignores it without --group-query-attention
    assert "--group-query-attention" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--micro-batch-size", "3", "--global-batch-size", "8"], world_size=2)
    assert "not a multiple" in capsys.readouterr().err


def test_corpus_to_indexed_dataset_to_gpt_dataset(tmp_path):
    """Megatron's GPTDataset over our indexed corpus yields seq-length windows of the real
    text: labels are tokens shifted by one, and every stretch between EODs is corpus text."""
    from megatron_spectra.train.data import build_datasets, build_tokenizer, corpus_documents, token_windows, write_indexed_dataset

    documents = corpus_documents()[:60]
    args = parse_args(["--seq-length", "48", "--global-batch-size", "4", "--micro-batch-size", "4", "--train-iters", "5",
                       "--eval-iters", "1", "--eval-interval", "5", "--split", "80,20,0", "--trainer-out", str(tmp_path)])
    tokenizer = build_tokenizer(args)
    prefix = str(tmp_path / "corpus")
    total = write_indexed_dataset(documents, tokenizer, prefix)
    stream = token_windows(prefix)
    assert total == len(stream) == sum(len(d.encode()) + 1 for d in documents)
    assert (stream == tokenizer.eod).sum() == len(documents)
    train, valid, test = build_datasets(args, tokenizer, [prefix])
    assert test is None and len(train) >= 20 and len(valid) >= 4
    text = "\n".join(documents).encode()
    for i in range(8):
        sample = train[i]
        tokens, labels = sample["tokens"].numpy(), sample["labels"].numpy()
        assert tokens.shape == labels.shape == (48,)
        assert numpy.array_equal(tokens[1:], labels[:-1])
        window = numpy.append(tokens, labels[-1])
        for stretch in numpy.split(window, numpy.flatnonzero(window == tokenizer.eod)):
            piece = bytes(int(t) for t in stretch if t != tokenizer.eod)
            assert piece in text
