"""The parallel layout: world size, data-parallel size and gradient accumulation.

Megatron-LM needs `global_batch % (micro_batch * DP) == 0` with DP = world / (TP * PP), and
TP to divide the heads (and query groups), PP the layers. Each violated rule is an error
naming the key to change, with the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch_size: int
    grad_accum: int

    def describe(self) -> str:
        return (
            f"{self.world_size} processes = TP {self.tensor_parallel} x PP {self.pipeline_parallel} x DP {self.data_parallel}; "
            f"global batch = micro {self.micro_batch_size} x DP {self.data_parallel} x accumulation {self.grad_accum}"
        )


def layout(data) -> Layout:
    data = getattr(data, "data", data)
    par, train = data["parallel"], data["training"]
    world = par["nodes"] * par["gpus_per_node"]
    tp, pp = par["tensor_parallel"], par["pipeline_parallel"]
    dp = world // (tp * pp)
    micro = train["micro_batch_size"]
    return Layout(world, tp, pp, dp, micro, train["global_batch_size"] // (micro * dp))


def check_layout(data: dict) -> None:
    par, train, model = data["parallel"], data["training"], data["model"]
    for section, key in (("parallel", "nodes"), ("parallel", "gpus_per_node"), ("parallel", "tensor_parallel"),
                         ("parallel", "pipeline_parallel"), ("training", "micro_batch_size"),
                         ("training", "global_batch_size"), ("training", "train_iters")):
        if data[section][key] < 1:
            raise ConfigError(f"{section}.{key}", f"must be >= 1, got {data[section][key]}")
    world = par["nodes"] * par["gpus_per_node"]
    tp, pp = par["tensor_parallel"], par["pipeline_parallel"]
    if world % (tp * pp):
        raise ConfigError("parallel.tensor_parallel", f"TP {tp} x PP {pp} = {tp * pp} does not divide the world size {world} (nodes x gpus_per_node)")
    dp = world // (tp * pp)
    micro, gbs = train["micro_batch_size"], train["global_batch_size"]
    if gbs % (micro * dp):
        raise ConfigError(
            "training.global_batch_size",
            f"{gbs} is not divisible by micro_batch_size {micro} x data-parallel size {dp} = {micro * dp}"
            f" (DP = {world} processes / (TP {tp} x PP {pp}))",
        )
    if model["num_attention_heads"] % tp:
        raise ConfigError("parallel.tensor_parallel", f"TP {tp} does not divide model.num_attention_heads {model['num_attention_heads']}")
    groups = model["num_query_groups"]
    if groups is not None and (groups % tp or model["num_attention_heads"] % groups):
        raise ConfigError("model.num_query_groups", f"{groups} must divide num_attention_heads and be divisible by TP {tp}")
    if model["hidden_size"] % model["num_attention_heads"]:
        raise ConfigError("model.hidden_size", f"{model['hidden_size']} is not divisible by num_attention_heads {model['num_attention_heads']}")
    if model["num_layers"] % pp:
        raise ConfigError("parallel.pipeline_parallel", f"PP {pp} does not divide model.num_layers {model['num_layers']}")
    if data["data"]["vocab_multiple"] % tp:
        raise ConfigError("data.vocab_multiple", f"{data['data']['vocab_multiple']} is not divisible by TP {tp} (Megatron pads the vocab to a multiple of make_vocab_size_divisible_by x TP)")
    if par["sequence_parallel"] and tp == 1:
        raise ConfigError("parallel.sequence_parallel", "needs tensor_parallel > 1")
    if data["launcher"] == "local" and par["nodes"] != 1:
        raise ConfigError("parallel.nodes", f"launcher local runs on this machine: nodes must be 1, got {par['nodes']}")
    if train["lr_warmup_iters"] >= train["train_iters"]:
        raise ConfigError("training.lr_warmup_iters", f"{train['lr_warmup_iters']} must be < train_iters {train['train_iters']}")
    if train["lr_decay_style"] == "WSD" and not 0 < train["wsd_decay_fraction"] <= 1:
        raise ConfigError("training.wsd_decay_fraction", f"must be in (0, 1], got {train['wsd_decay_fraction']}")
    spectra = data["optimizer"]["spectra"]
    if (str(spectra.get("clip_schedule")).startswith("wsd-") and train["lr_decay_style"] == "WSD"
            and spectra["decay_fraction"] != train["wsd_decay_fraction"]):
        raise ConfigError("optimizer.spectra.decay_fraction",
                          f"{spectra['decay_fraction']} differs from training.wsd_decay_fraction {train['wsd_decay_fraction']}: "
                          "the threshold would not decay with the learning rate")
