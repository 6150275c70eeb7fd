"""Test helper run as a subprocess: the tistudio CLI, with optional slow-downs so that a test's signals and kills
can land inside a save or inside a step.

    python driver.py [--slow-replace SECONDS] [--slow-step SECONDS] -- CLI ARGS...

(``--cli`` in place of ``--`` where a launcher would take the ``--`` itself, as torchrun does.)
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    args = sys.argv[1:]
    split = args.index("--") if "--" in args else args.index("--cli")
    options, cli = args[:split], args[split + 1 :]
    settings = dict(zip(options[::2], options[1::2], strict=True))
    os.environ["HF_HUB_OFFLINE"] = "1"
    from tistudio import storage

    if "--slow-replace" in settings:
        delay = float(settings["--slow-replace"])
        original_replace = os.replace

        def slow_replace(src, dst):  # the temporary file is complete; the rename waits
            time.sleep(delay)
            original_replace(src, dst)

        storage.os.replace = slow_replace  # type: ignore[attr-defined]
    if "--slow-step" in settings:
        delay = float(settings["--slow-step"])
        from tistudio.train.objective import NoisePrediction

        original_loss = NoisePrediction.loss

        def slow_loss(*a, **k):
            time.sleep(delay)
            return original_loss(*a, **k)

        NoisePrediction.loss = slow_loss  # type: ignore[method-assign]
    from tistudio.cli import main as cli_main

    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main())
