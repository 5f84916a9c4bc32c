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
    send: list[list[tuple[int, int]]]  # per destination: (offset in the source buffer, length)
    send_splits: list[int]
    recv_splits: list[int]
    assemble: list[tuple[bool, int, int]]  # (from the received data?, offset, length), in destination order
    dst_size: int
    rank: int
    flagged_assemble: list[tuple[bool, int, int]]  # the same, where every peer's data ends with a flag

    @classmethod
    def build(cls, moves: list[Move], rank: int, world: int, dst_size: int) -> "Exchange":
        outgoing = sorted((m for m in moves if m.src == rank and m.dst != rank), key=lambda m: (m.dst, m.dst_off))
        incoming = sorted((m for m in moves if m.dst == rank and m.src != rank), key=lambda m: (m.src, m.dst_off))
        send_splits, recv_splits = [0] * world, [0] * world
        send: list[list[tuple[int, int]]] = [[] for _ in range(world)]
        for m in outgoing:
            send_splits[m.dst] += m.length
            send[m.dst].append((m.src_off, m.length))
        recv_at, position = {}, 0
        for m in incoming:
            recv_splits[m.src] += m.length
            recv_at[(m.src, m.dst_off)] = position
            position += m.length
        pieces = []
        for m in sorted((m for m in moves if m.dst == rank), key=lambda m: m.dst_off):
            received = m.src != rank
            pieces.append((received, recv_at[(m.src, m.dst_off)] if received else m.src_off, m.length, m.dst_off, m.src))
        expected = 0
        for _, _, length, dst_off, _ in pieces:
            if dst_off != expected:
                raise AssertionError(f"exchange plan leaves a gap at {expected} (next move at {dst_off})")
            expected += length
        if expected != dst_size:
            raise AssertionError(f"exchange plan fills {expected} of {dst_size} elements")
        # With flags, each earlier peer's data in the receive buffer is one element longer.
        flags_before = lambda src: sum(1 for peer in range(src) if peer != rank)  # noqa: E731
        return cls(
            send=[_coalesce(ranges) for ranges in send],
            send_splits=send_splits,
            recv_splits=recv_splits,
            assemble=_coalesce_tagged([(r, off, n) for r, off, n, _, _ in pieces]),
            dst_size=dst_size,
            rank=rank,
            flagged_assemble=_coalesce_tagged([(r, off + flags_before(src) if r else off, n) for r, off, n, _, src in pieces]),
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
            ranges = [r for ranges in self.send for r in ranges]
            send = torch.cat([src[o : o + n] for o, n in ranges]) if ranges else src.new_empty(0)
            dist.all_to_all_single(recv, send, self.recv_splits, self.send_splits, group=group)
        return self._assemble(src, recv, self.assemble)

    def run_flagged(self, src: torch.Tensor, flag: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
        """`run`, and every process's one-element `flag` (same dtype as src) to every other:
        one element more to each peer in the same all-to-all, instead of a collective of its own.
        Returns the assembled buffer and all the flags (this process's included), in rank order."""
        world = len(self.send_splits)
        if world == 1:
            return self._assemble(src, src.new_empty(0), self.assemble), flag.reshape(1)
        peers = [r for r in range(world) if r != self.rank]
        recv = src.new_empty(self.elements_received + len(peers))
        send = torch.cat([piece for dst in peers for piece in (*(src[o : o + n] for o, n in self.send[dst]), flag.reshape(1))])
        recv_splits = [n + (r != self.rank) for r, n in enumerate(self.recv_splits)]
        send_splits = [n + (r != self.rank) for r, n in enumerate(self.send_splits)]
        dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
        ends = torch.tensor(recv_splits).cumsum(0) - 1
        flags = recv[ends.to(recv.device)]  # the peers' flags: the last element of each peer's data
        flags[self.rank] = flag.reshape(())  # (no data from oneself: that index holds another's, replaced)
        return self._assemble(src, recv, self.flagged_assemble), flags

    def _assemble(self, src: torch.Tensor, recv: torch.Tensor, assemble) -> torch.Tensor:
        if not assemble:
            return src.new_empty(0)
        return torch.cat([(recv if received else src)[o : o + n] for received, o, n in assemble])


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
