"""Data, the way a cluster run gets it: megatron-core's indexed dataset (.bin/.idx) read
through megatron-core's GPTDataset, built by BlendedMegatronDatasetBuilder.

Without `--data-path` the trainer first writes its own small corpus in that format: the
Python language reference that ships with every CPython (`pydoc_data.topics`, ~465 kB of
English prose with code snippets), split into documents of a few paragraphs, tokenized with
megatron-core's byte-level tokenizer (256 byte values + one end-of-document token) and
written with megatron-core's IndexedDatasetBuilder. Nothing needs a download.

Batches follow Megatron-LM's pretraining sampler: the global batch of iteration k is samples
[k·G, (k+1)·G) of the split, taken as micro-batches of `micro_batch_size x dp` consecutive
samples, of which data-parallel rank r reads the r-th slice of `micro_batch_size`.
"""

from __future__ import annotations

import os

import numpy
import torch

CORPUS_NAME = "pydoc_topics"
DOCUMENT_CHARS = 2000  # a document: consecutive paragraphs of one topic, up to about this many characters


def corpus_documents(document_chars: int = DOCUMENT_CHARS) -> list[str]:
    """The Python language reference shipped with CPython, as documents of a few paragraphs."""
    from pydoc_data.topics import topics

    documents = []
    for key in sorted(topics):
        current = ""
        for paragraph in topics[key].split("\n\n"):
            if current and len(current) + len(paragraph) > document_chars:
                documents.append(current)
                current = ""
            current = f"{current}\n\n{paragraph}" if current else paragraph
        if current.strip():
            documents.append(current)
    return documents


def build_tokenizer(args):
    """megatron-core's tokenizer for --tokenizer-type (its new tokenizer system, no files needed)."""
    from megatron.core.tokenizers import MegatronTokenizer

    if args.tokenizer_type == "ByteLevelTokenizer":
        # 256 byte values, EOD = 256; the pad id -1 never occurs (megatron's own "no pad" value).
        return MegatronTokenizer.from_pretrained(metadata_path={"library": "byte-level"}, vocab_size=257, _eos_id=256, _pad_id=-1)
    return MegatronTokenizer.from_pretrained(metadata_path={"library": "null"}, vocab_size=args.vocab_size)


def write_indexed_dataset(documents: list[str], tokenizer, prefix: str) -> int:
    """Tokenize each document, append EOD (Megatron-LM's preprocess_data --append-eod) and
    write `prefix`.bin/.idx with megatron-core's builder. Returns the number of tokens."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(tokenizer.vocab_size))
    total = 0
    for text in documents:
        ids = list(tokenizer.tokenize(text)) + [tokenizer.eod]
        builder.add_document(numpy.array(ids), [len(ids)])
        total += len(ids)
    builder.finalize(prefix + ".idx")
    return total


def ensure_builtin_corpus(out_dir: str, tokenizer) -> str:
    """The built-in corpus under out_dir/data (built by rank 0 once; others wait). Its prefix."""
    prefix = os.path.join(out_dir, "data", f"{CORPUS_NAME}_text_document")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0 and not os.path.exists(prefix + ".idx"):
        write_indexed_dataset(corpus_documents(), tokenizer, prefix + ".tmp")
        for ext in (".bin", ".idx"):  # complete files only: a killed build leaves no half dataset
            os.replace(prefix + ".tmp" + ext, prefix + ext)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return prefix


def split_sample_counts(args) -> list[int]:
    """Megatron-LM's train/valid/test sample counts for a run of --train-iters."""
    evals = args.train_iters // args.eval_interval + 1 if args.eval_iters > 0 else 0
    g = args.global_batch_size
    return [args.train_iters * g, evals * args.eval_iters * g, args.eval_iters * g]


def build_datasets(args, tokenizer, data_path: list[str]):
    """(train, valid, test) GPTDatasets of megatron-core over the indexed dataset(s)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    blend = get_blend_from_list(data_path)
    for prefix in blend[0]:
        check_indexed_dataset(prefix)
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=blend,
        split=args.split, path_to_cache=args.data_cache_path or os.path.join(args.trainer_out, "data", "cache"),
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,  # the causal mask is implied by the attention's mask type
    )
    # The trainer never reads the test split. Not building it keeps Megatron-LM's split
    # boundaries and spares a small corpus an empty test split (GPTDataset loops forever
    # looking for the epochs to fill one).
    config.split_matrix[2] = None
    # Every rank builds (rank 0 first, megatron synchronises): TP ranks need the same batches.
    return BlendedMegatronDatasetBuilder(GPTDataset, split_sample_counts(args), lambda: True, config).build()


def check_indexed_dataset(prefix: str) -> None:
    """A .bin/.idx pair that megatron can read: both files there, and the .bin as long as its
    index says (a truncated .bin otherwise fails deep in numpy, naming no file)."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    for ext in (".idx", ".bin"):
        if not os.path.isfile(prefix + ext):
            raise ValueError(f"--data-path {prefix}: {prefix + ext} does not exist")
    try:
        index = _IndexReader(prefix + ".idx", multimodal=False)
    except (AssertionError, ValueError) as error:
        raise ValueError(f"--data-path {prefix}: {prefix}.idx is not a readable megatron index ({error})") from error
    if index.sequence_count:
        needed = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
        size = os.path.getsize(prefix + ".bin")
        if size < needed:
            raise ValueError(f"--data-path {prefix}: {prefix}.bin has {size} bytes, its index describes {needed}: "
                             f"the file is truncated (or does not belong to this .idx)")


def micro_batches(dataset, iteration: int, args, dp_rank: int) -> list[dict]:
    """This data-parallel rank's micro-batches of the global batch of `iteration`."""
    g, mbs, dp = args.global_batch_size, args.micro_batch_size, args.data_parallel_size
    first = iteration * g
    batches = []
    for j in range(args.num_microbatches):
        start = first + j * mbs * dp + dp_rank * mbs
        samples = [dataset[(start + i) % len(dataset)] for i in range(mbs)]
        batches.append({key: torch.stack([s[key] for s in samples]) for key in samples[0]})
    return batches


def token_windows(prefix: str) -> numpy.ndarray:
    """All tokens of an indexed dataset, concatenated (for checks)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return numpy.concatenate([dataset[i] for i in range(len(dataset))])
