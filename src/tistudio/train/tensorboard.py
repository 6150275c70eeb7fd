"""TensorBoard logs of a training run (RUN/tensorboard), the convention every peer trainer follows: the loss and
learning rate of every step, the fixed-batch loss and the likeness of every evaluation, and the previews. Written
through torch's SummaryWriter (the `tensorboard` package: pip install 'tistudio[tensorboard]'); view them with
`tensorboard --logdir runs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tistudio.errors import StorageError
from tistudio.progress import Event, Progress


def check_folder(folder: Path) -> None:
    """That the run's TensorBoard folder can be made or used (checked before training starts)."""
    if folder.exists() and not folder.is_dir():
        raise StorageError(f"{folder} is a file; TensorBoard's logs go in a folder of that name: move the file away")


class Board:
    """One run's TensorBoard writer. A resumed run starts after its saved step: TensorBoard then hides what an
    earlier sitting logged after that step (those steps are trained again)."""

    def __init__(self, folder: Path, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        check_folder(folder)
        self.writer: Any = SummaryWriter(str(folder), purge_step=start_step + 1 if start_step else None)

    def losses(self, rows: list[tuple[int, float, float]]) -> None:
        """(step, loss, learning rate) of steps as loss.csv gets them."""
        for step, loss, lr in rows:
            if loss == loss:  # a non-finite step is in loss.csv, not on the chart
                self.writer.add_scalar("train/loss", loss, step)
            self.writer.add_scalar("train/learning_rate", lr, step)
        self.writer.flush()

    def progress(self, progress: Progress) -> None:
        """Evaluations and previews, as the run reports them."""
        if progress.event == Event.EVAL and progress.loss is not None:
            self.writer.add_scalar("eval/fixed_batch_loss", progress.loss, progress.step)
            if progress.likeness is not None:
                self.writer.add_scalar("eval/likeness", progress.likeness, progress.step)
        elif progress.event == Event.PREVIEW and progress.path:
            import numpy as np
            from PIL import Image

            with Image.open(progress.path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image("preview", pixels, progress.step, dataformats="HWC")
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> Board:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
