"""One all-to-all that carries a list of moves between the flat buffers of all processes.

Every process derives its own program from the same global list of moves: what it sends,
to whom, in which order (the destination offset orders the moves of each pair, so sender
and receiver agree without talking), and how to assemble its destination buffer from the
received data and from what it keeps. Per call: one `torch.cat` to pack, one
`all_to_all_single` (uneven splits, which gloo and NCCL both support), one `torch.cat` to
assemble. Nothing is sent to oneself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .plan import Move


def comm_device(group=None) -> torch.device:
    """Where collectives over `group` take their tensors: NCCL has no CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_flat(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    """Equal-size all-gather into one flat tensor: `all_gather_single` in recent torch, which
    deprecates the older name `all_gather_into_tensor` (same collective, gloo and NCCL)."""
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, group=group)


@dataclass
class Exchange:
    send: list[tuple[int, int]]  # (offset in the source buffer, length), grouped by destination
    send_splits: list[int]
    recv_splits: list[int]
    assemble: list[tuple[bool, int, int]]  # (from the received data?, offset, length), in destination order
    dst_size: int

    @classmethod
    def build(cls, moves: list[Move], rank: int, world: int, dst_size: int) -> "Exchange":
        outgoing = sorted((m for m in moves if m.src == rank and m.dst != rank), key=lambda m: (m.dst, m.dst_off))
        incoming = sorted((m for m in moves if m.dst == rank and m.src != rank), key=lambda m: (m.src, m.dst_off))
        send_splits, recv_splits = [0] * world, [0] * world
        for m in outgoing:
            send_splits[m.dst] += m.length
        recv_at, position = {}, 0
        for m in incoming:
            recv_splits[m.src] += m.length
            recv_at[(m.src, m.dst_off)] = position
            position += m.length
        pieces = []
        for m in sorted((m for m in moves if m.dst == rank), key=lambda m: m.dst_off):
            received = m.src != rank
            pieces.append((received, recv_at[(m.src, m.dst_off)] if received else m.src_off, m.length, m.dst_off))
        expected = 0
        for _, _, length, dst_off in pieces:
            if dst_off != expected:
                raise AssertionError(f"exchange plan leaves a gap at {expected} (next move at {dst_off})")
            expected += length
        if expected != dst_size:
            raise AssertionError(f"exchange plan fills {expected} of {dst_size} elements")
        return cls(
            send=_coalesce([(m.src_off, m.length) for m in outgoing]),
            send_splits=send_splits,
            recv_splits=recv_splits,
            assemble=_coalesce_tagged([(r, off, n) for r, off, n, _ in pieces]),
            dst_size=dst_size,
        )

    @property
    def elements_sent(self) -> int:
        return sum(self.send_splits)

    @property
    def elements_received(self) -> int:
        return sum(self.recv_splits)

    def run(self, src: torch.Tensor, group) -> torch.Tensor:
        """Every process of the group must call this, even one with nothing to send."""
        recv = src.new_empty(self.elements_received)
        if len(self.send_splits) > 1:
            send = torch.cat([src[o : o + n] for o, n in self.send]) if self.send else src.new_empty(0)
            dist.all_to_all_single(recv, send, self.recv_splits, self.send_splits, group=group)
        if not self.assemble:
            return src.new_empty(0)
        return torch.cat([(recv if received else src)[o : o + n] for received, o, n in self.assemble])


def _coalesce(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Merge ranges that continue each other, so packing takes fewer slices."""
    out: list[tuple[int, int]] = []
    for off, n in ranges:
        if out and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + n)
        elif n:
            out.append((off, n))
    return out


def _coalesce_tagged(ranges: list[tuple[bool, int, int]]) -> list[tuple[bool, int, int]]:
    out: list[tuple[bool, int, int]] = []
    for tag, off, n in ranges:
        if out and out[-1][0] == tag and out[-1][1] + out[-1][2] == off:
            out[-1] = (tag, out[-1][1], out[-1][2] + n)
        elif n:
            out.append((tag, off, n))
    return out
