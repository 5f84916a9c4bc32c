"""One all-to-all that carries a list of moves between the flat buffers of all processes.

Every process derives its own program from the same global list of moves: what it sends,
to whom, in which order (the destination offset orders the moves of each pair, so sender
and receiver agree without talking), and how to assemble its destination buffer from the
received data and from what it keeps. Per call: one `torch.cat` to pack, one
`all_to_all_single` (uneven splits, which gloo and NCCL both support), one `torch.cat` to
assemble. Nothing is sent to oneself. `run_with` adds a few elements from every process to
every other (vector norms, a finiteness flag) to the same all-to-all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    pieces: list[tuple[bool, int, int, int]]  # (received?, offset, length, source rank), in destination order
    dst_size: int
    rank: int
    _assemble: dict[int, list[tuple[bool, int, int]]] = field(default_factory=dict)  # per extra length

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
        pieces, expected = [], 0
        for m in sorted((m for m in moves if m.dst == rank), key=lambda m: m.dst_off):
            if m.dst_off != expected:
                raise AssertionError(f"exchange plan leaves a gap at {expected} (next move at {m.dst_off})")
            expected += m.length
            received = m.src != rank
            pieces.append((received, recv_at[(m.src, m.dst_off)] if received else m.src_off, m.length, m.src))
        if expected != dst_size:
            raise AssertionError(f"exchange plan fills {expected} of {dst_size} elements")
        return cls([_coalesce(ranges) for ranges in send], send_splits, recv_splits, pieces, dst_size, rank)

    @property
    def elements_sent(self) -> int:
        return sum(self.send_splits)

    @property
    def elements_received(self) -> int:
        return sum(self.recv_splits)

    def run(self, src: torch.Tensor, group) -> torch.Tensor:
        """Every process of the group must call this, even one with nothing to send."""
        return self.run_with(src, src.new_empty(0), group)[0]

    def run_with(self, src: torch.Tensor, extra: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
        """`run`, and every process's small `extra` (the same length and dtype everywhere) to
        every other: appended to each peer's data in the same all-to-all, where a collective
        of its own would be one more synchronisation. Returns the assembled buffer and the
        extras of all processes (this one's included), one row per rank."""
        world, e = len(self.send_splits), extra.numel()
        received = {self.rank: extra.reshape(-1)}
        recv = src.new_empty(self.elements_received + e * (world - 1))
        if world > 1:
            peers = [r for r in range(world) if r != self.rank]
            parts = [piece for dst in peers for piece in (*(src[o : o + n] for o, n in self.send[dst]), extra.reshape(-1))]
            send = torch.cat(parts) if parts else src.new_empty(0)
            recv_splits = [n + e * (r != self.rank) for r, n in enumerate(self.recv_splits)]
            send_splits = [n + e * (r != self.rank) for r, n in enumerate(self.send_splits)]
            dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
            end = 0
            for r, n in enumerate(recv_splits):  # each peer's extra ends its data
                end += n
                if r != self.rank:
                    received[r] = recv[end - e : end]
        extras = torch.stack([received[r] for r in range(world)]) if e else extra.new_empty(world, 0)
        assemble = self._assemble.get(e)
        if assemble is None:
            before = lambda peer: e * sum(1 for r in range(peer) if r != self.rank)  # noqa: E731
            assemble = _coalesce_tagged([(r, off + before(s) if r else off, n) for r, off, n, s in self.pieces])
            self._assemble[e] = assemble
        if not assemble:
            return src.new_empty(0), extras
        return torch.cat([(recv if r else src)[o : o + n] for r, o, n in assemble]), extras


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
