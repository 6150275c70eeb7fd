"""Cached rows of several shapes: the training latents (and their loss weights) of a set trained in aspect-ratio
buckets (prepare/buckets.py), one stacked tensor per shape, and the order a run draws its micro-batches in.

Every micro-batch is drawn from one bucket. An epoch's micro-batches are each bucket's images in a shuffled order,
cut into batches (a bucket's last batch filled up from its own start), and the batches of all buckets shuffled
together; everything is seeded by (seed, epoch), which keeps a resume exact. A set of one shape draws as before
buckets existed (one shuffled stream of samples, train/loop.py's sample_indices)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tistudio.train.objective import seed_for

Shape = tuple[int, ...]


class Rows:
    """Rows of one or several shapes, numbered 0 .. count - 1 in the order given, each shape's rows stacked once."""

    def __init__(self, rows: Sequence[torch.Tensor]) -> None:
        shapes = [tuple(row.shape) for row in rows]
        self.shapes: list[Shape] = sorted(set(shapes))
        self.where: list[tuple[int, int]] = []  # row -> (shape index, place in that shape's stack)
        groups: list[list[torch.Tensor]] = [[] for _ in self.shapes]
        for row, shape in zip(rows, shapes, strict=True):
            group = self.shapes.index(shape)
            self.where.append((group, len(groups[group])))
            groups[group].append(row)
        self.stacks = [torch.stack(group) for group in groups]
        self.by_shape: list[list[int]] = [[] for _ in self.shapes]  # the rows of each shape, in order
        for index, (group, _) in enumerate(self.where):
            self.by_shape[group].append(index)

    @property
    def count(self) -> int:
        return len(self.where)

    @property
    def single(self) -> bool:
        return len(self.shapes) == 1

    @property
    def device(self) -> torch.device:
        return self.stacks[0].device

    def shape(self, index: int) -> Shape:
        return self.shapes[self.where[index][0]]

    def rows(self) -> list[torch.Tensor]:
        """Every row, in order."""
        return [self.stacks[group][place] for group, place in self.where]

    def take(self, indices: Sequence[int]) -> torch.Tensor:
        """The rows `indices`, stacked: they must share one shape (a micro-batch is drawn from one bucket)."""
        groups = {self.where[i][0] for i in indices}
        if len(groups) != 1:
            raise ValueError(f"rows {list(indices)} have {len(groups)} shapes; a batch takes rows of one shape")
        (group,) = groups
        places = torch.tensor([self.where[i][1] for i in indices], device=self.stacks[group].device)
        return self.stacks[group][places]

    def to(self, device: torch.device | str) -> Rows:
        moved = Rows.__new__(Rows)
        moved.shapes, moved.where, moved.by_shape = self.shapes, self.where, self.by_shape
        moved.stacks = [stack.to(device) for stack in self.stacks]
        return moved


def bucket_epoch(seed: int, epoch: int, members: Sequence[Sequence[int]], batch: int) -> list[list[int]]:
    """An epoch's micro-batches: each bucket's rows shuffled and cut into batches of `batch` (the last filled up
    from the bucket's own start, so that every batch is whole and of one shape), all batches then shuffled."""
    batches: list[list[int]] = []
    for number, rows in enumerate(members):
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed_for(seed, 6, epoch, number)))
        shuffled = [rows[i] for i in order.tolist()]
        whole = -(-len(shuffled) // batch) * batch
        filled = [shuffled[i % len(shuffled)] for i in range(whole)]
        batches += [filled[i : i + batch] for i in range(0, whole, batch)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed_for(seed, 7, epoch)))
    return [batches[i] for i in order.tolist()]


def batches_per_epoch(members: Sequence[Sequence[int]], batch: int) -> int:
    return sum(-(-len(rows) // batch) for rows in members)


def bucket_batch(seed: int, number: int, members: Sequence[Sequence[int]], batch: int) -> list[int]:
    """The rows of micro-batch `number` (counted over the whole run) of a bucketed set."""
    epoch, place = divmod(number, batches_per_epoch(members, batch))
    return bucket_epoch(seed, epoch, members, batch)[place]


def bucket_mode(asked: str, recorded: str | None, resumed: bool, size_conditioned: bool) -> str:
    """The --buckets a run trains with: as asked; "auto" is "on" for a family with size conditioning (SDXL, trained
    on buckets with the crop in its time_ids) and "off" for the others (SD1 and SD2 were trained on square crops,
    and on the demo world, a model that knows only squares, squares kept the person better: bench/buckets.py),
    except that a resumed run keeps what it began with (a run begun before buckets existed: "off")."""
    if asked != "auto":
        return asked
    if resumed:
        return recorded or "off"
    return "on" if size_conditioned else "off"
