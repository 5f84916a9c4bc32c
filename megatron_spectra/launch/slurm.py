"""SLURM scripts: one task per node runs torchrun; the torchruns meet by c10d rendezvous on
the allocation's first node. Rendering is pure (config in, text out); submitting is not.

    render_sbatch(config)              # the whole script `spectra launch` submits
    render_job(config)                 # its body: what runs inside the allocation (job.sh)
    render_array(configs, sweep_dir)   # one array job running each run's job.sh
"""

from __future__ import annotations

import shlex
from pathlib import Path

from .command import describe, shell_join, to_command
from .config import Config
from .errors import ConfigError

# Exported in every job. The comments are the documentation: cluster-specific values go in
# the config's slurm.env, which is exported after these and so overrides them.
NETWORK_ENV = """\
# Megatron overlaps tensor-parallel communication with compute only when the GPU runs
# kernels in issue order: one hardware work queue.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# A failed or timed-out collective aborts the process (and srun the job) instead of hanging.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
# Cluster-specific (set them in the config's slurm.env, the values below are examples):
#   NCCL_SOCKET_IFNAME=ib0|bond0|eth0   interface for NCCL's TCP bootstrap (not loopback/docker)
#   NCCL_IB_HCA=mlx5_0,mlx5_1,...       the InfiniBand HCAs to use (H100 nodes: 8 x 400G NDR)
#   NCCL_IB_GID_INDEX=3                 RoCE clusters (RDMA over Ethernet)
#   NCCL_NET_GDR_LEVEL=PHB              GPUDirect RDMA distance; usually detected correctly
#   FI_PROVIDER=efa FI_EFA_USE_DEVICE_RDMA=1   AWS p5 (EFA) with the aws-ofi-nccl plugin
#   NCCL_NVLS_ENABLE=0                  only if NVLink SHARP fails on your fabric manager
"""


def _q(path) -> str:
    return shlex.quote(str(path))


def render_job(config: Config) -> str:
    d = config.data
    run_dir, port = config.run_dir, d["slurm"]["master_port"]
    lines = [
        "#!/bin/bash",
        f"# {describe(config)}",
        "# Written by `spectra launch`; runs inside a SLURM allocation (sbatch, or a task of a sweep's array).",
        "set -uo pipefail",
        f"RUN_DIR={_q(run_dir)}",
        f'mkdir -p "$RUN_DIR/logs"' + (f" {_q(config.checkpoint_dir)}" if d["output"]["checkpoints"] else ""),
        *d["slurm"]["setup"],
        "",
        "# Rendezvous: every node's torchrun meets on the allocation's first node.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        # Array tasks may share nodes: spread their ports by job id.
        f"export MASTER_PORT=$(( {port} + SLURM_JOB_ID % 1000 ))",
        "",
        NETWORK_ENV.rstrip(),
        *[f"export {k}={shlex.quote(str(v))}" for k, v in d["slurm"]["env"].items()],
        "",
        'echo "$(date -Is) job $SLURM_JOB_ID on $SLURM_JOB_NODELIST" >> "$RUN_DIR/logs/launcher.log"',
        "rm -f \"$RUN_DIR/exit_code\"",
        "srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\",
        "  " + shell_join(to_command(config, "slurm")) + ' \\',
        '  2>&1 | tee -a "$RUN_DIR/logs/train.log"',
        "rc=${PIPESTATUS[0]}",
        'echo "$rc" > "$RUN_DIR/exit_code"',
        'exit "$rc"',
    ]
    return "\n".join(lines) + "\n"


def _header(config: Config, job_name: str, output: str, extra: list[str] = ()) -> list[str]:
    d, s = config.data, config.data["slurm"]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={d['parallel']['nodes']}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={d['parallel']['gpus_per_node']}",
        f"#SBATCH --time={s['time']}",
        f"#SBATCH --output={output}",
    ]
    for key in ("partition", "account", "qos", "cpus_per_task", "mem", "constraint"):
        if s[key] not in (None, ""):  # "" is an unset ${VAR:-} placeholder
            lines.append(f"#SBATCH --{key.replace('_', '-')}={s[key]}")
    if s["exclusive"]:
        lines.append("#SBATCH --exclusive")
    return lines + [f"#SBATCH {x}" for x in s["directives"]] + list(extra)


def render_sbatch(config: Config) -> str:
    header = _header(config, f"spectra-{config.name}", f"{config.run_dir}/logs/slurm-%j.out")
    body = render_job(config).split("\n", 1)[1]  # drop the body's own shebang
    return "\n".join(header) + "\n\n" + body


# Keys an array job shares: SLURM gives every task of an array the same resources.
SHARED_KEYS = ("parallel.nodes", "parallel.gpus_per_node", "slurm.partition", "slurm.account", "slurm.qos",
               "slurm.time", "slurm.cpus_per_task", "slurm.mem", "slurm.constraint", "slurm.exclusive", "slurm.directives")


def render_array(configs: list[Config], sweep_dir: Path, indices: list[int], job_name: str) -> str:
    """An array over `indices` (positions in configs); task i runs configs[i]'s job.sh."""
    first = configs[0]
    for key in SHARED_KEYS:
        for c in configs[1:]:
            if c.get(key) != first.get(key):
                raise ConfigError(key, f"differs between runs {first.name} and {c.name}: one SLURM array needs the same resources")
    limit = first.data["slurm"]["array_parallelism"]
    spec = ",".join(str(i) for i in indices) + (f"%{limit}" if limit else "")
    header = _header(first, job_name, f"{sweep_dir}/logs/slurm-%A_%a.out", [f"#SBATCH --array={spec}"])
    cases = [f"  {i}) RUN_DIR={_q(configs[i].run_dir)} ;;" for i in indices]
    body = [
        "",
        "# Each array task runs one run of the sweep, by SLURM_ARRAY_TASK_ID.",
        'case "$SLURM_ARRAY_TASK_ID" in',
        *cases,
        '  *) echo "no run for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
        "esac",
        'exec bash "$RUN_DIR/job.sh"',
    ]
    return "\n".join(header + body) + "\n"
