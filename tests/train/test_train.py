"""The built-in trainer: flags, the data path, the checkpoint pointer, the process group's timeout
(the main job is tested in tests/test_demo.py, resumes in test_resume.py)."""

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


# ----------------------------------------------------------------------------- reliability (issue 14)


@pytest.mark.parametrize("argv, message", [
    (["--train-iters", "0"], "--train-iters must be at least 1"),
    (["--train-iters", "5", "--lr-warmup-iters", "5"], "--lr-warmup-iters 5 must be at least 0 and below --lr-decay-iters (5"),
    (["--train-iters", "5", "--lr-warmup-iters", "-1"], "--lr-warmup-iters -1"),
    (["--distributed-timeout-minutes", "0"], "--distributed-timeout-minutes must be positive"),
])
def test_settings_megatron_would_assert_on_are_refused_by_name(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_megatron_lm_reliability_flags_and_defaults():
    args = parse_args([])
    assert args.check_for_nan_in_loss_and_grad and args.distributed_timeout_minutes == 10  # Megatron-LM's defaults
    assert not (args.no_load_optim or args.no_load_rng or args.finetune)
    args = parse_args(["--no-check-for-nan-in-loss-and-grad", "--no-load-optim", "--no-load-rng", "--finetune",
                       "--distributed-timeout-minutes", "2"])
    assert not args.check_for_nan_in_loss_and_grad and args.no_load_optim and args.no_load_rng and args.finetune
    assert args.distributed_timeout_minutes == 2


def test_a_non_finite_loss_names_the_iteration():
    from megatron_spectra.train.integrity import NonFiniteError, check_loss

    check_loss(3.5, 1)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match=r"iteration 7: the loss is (nan|inf); stopping before the optimizer step"):
            check_loss(bad, 7)


def test_a_truncated_bin_file_is_named_before_training(tmp_path):
    from megatron_spectra.train.data import build_datasets, build_tokenizer, corpus_documents, write_indexed_dataset

    args = parse_args(["--seq-length", "16", "--global-batch-size", "2", "--micro-batch-size", "2", "--train-iters", "2",
                       "--eval-iters", "0", "--trainer-out", str(tmp_path)])
    tokenizer = build_tokenizer(args)
    prefix = str(tmp_path / "corpus")
    write_indexed_dataset(corpus_documents()[:5], tokenizer, prefix)
    size = os.path.getsize(prefix + ".bin")
    os.truncate(prefix + ".bin", size - 10)
    with pytest.raises(ValueError, match=rf"{prefix}\.bin has {size - 10} bytes, its index describes {size}: the file is truncated"):
        build_datasets(args, tokenizer, [prefix])
    os.remove(prefix + ".bin")
    with pytest.raises(ValueError, match=rf"{prefix}\.bin does not exist"):
        build_datasets(args, tokenizer, ["1.0", prefix])


def _checkpoint_folder(root, iteration, complete=True):
    path = root / f"iter_{iteration:07d}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text("{}")


def test_the_latest_pointer_is_replaced_atomically_and_a_bad_one_falls_back(tmp_path, capsys):
    from megatron_spectra.train.checkpoint import LATEST, _write_atomically, resolve
    from megatron_spectra.train.integrity import CheckpointError

    root = tmp_path / "ckpt"
    assert resolve(str(root), None) is None  # nothing to load: from scratch, said so
    assert "ckpt: the folder does not exist; training from scratch" in capsys.readouterr().out
    _checkpoint_folder(root, 10)
    _checkpoint_folder(root, 20)
    _checkpoint_folder(root, 30, complete=False)  # a save that died before its trainer_state.json
    pointer = root / LATEST
    _write_atomically(str(pointer), "20")
    assert pointer.read_text() == "20"
    assert not [n for n in os.listdir(root) if ".tmp" in n]  # no temp file left behind
    assert resolve(str(root), None) == 20 and capsys.readouterr().out == ""
    assert resolve(str(root), 10) == 10  # --ckpt-step
    for torn in ("", "2", "3O", "30"):  # empty, cut short, garbled, an incomplete checkpoint
        pointer.write_text(torn)
        assert resolve(str(root), None) == 20
        assert f"says {torn!r}, which is not a complete checkpoint; loading the newest complete one instead, iteration 20" in capsys.readouterr().out
    pointer.unlink()
    assert resolve(str(root), None) == 20
    assert "no latest_checkpointed_iteration.txt; loading the newest complete checkpoint, iteration 20" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LATEST).write_text("x")
    with pytest.raises(CheckpointError, match="says 'x', and no complete checkpoint"):
        resolve(str(empty), None)


def _stalled_peer(rank, port, queue):
    import time

    import torch.distributed as dist

    from megatron_spectra.train.main import _process_group

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    with _process_group(cpu=True, timeout_minutes=0.05):  # 3 s
        if rank == 1:
            time.sleep(30)  # a frozen peer: never reaches the barrier
            return
        start = time.monotonic()
        try:
            dist.barrier()
            queue.put(("no error", time.monotonic() - start))
        except Exception as error:  # noqa: BLE001
            queue.put((type(error).__name__, time.monotonic() - start))


def test_a_stalled_peer_fails_the_others_after_distributed_timeout_minutes():
    import multiprocessing

    from megatron_spectra.launch.spawn import free_port

    ctx = multiprocessing.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_stalled_peer, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        kind, waited = queue.get(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert kind != "no error" and 2 < waited < 25, (kind, waited)
