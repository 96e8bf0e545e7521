"""How one sequence of T tokens is cut along time over the ranks of a group."""
from __future__ import annotations


def split_lengths(T: int, world: int, multiple: int = 1) -> list[int]:
    """Tokens per rank, in rank order: as even as whole blocks of ``multiple`` tokens allow
    (BSBR needs every cut at a chunk boundary: pass its chunk_size), the remainder of T
    that fills no whole block going to the last rank. Ranks may get 0 tokens when T is short."""
    for name, value, low in (("T", T, 0), ("world", world, 1), ("multiple", multiple, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    blocks, tail = divmod(T, multiple)
    per = [blocks // world + (1 if r < blocks % world else 0) for r in range(world)]
    lengths = [b * multiple for b in per]
    lengths[-1] += tail
    return lengths


def rank_slice(T: int, rank: int, world: int, multiple: int = 1) -> slice:
    """The time slice of rank ``rank`` under `split_lengths`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank: expected an int in [0, world) = [0, {world}), got {rank!r}")
    lengths = split_lengths(T, world, multiple)
    start = sum(lengths[:rank])
    return slice(start, start + lengths[rank])
