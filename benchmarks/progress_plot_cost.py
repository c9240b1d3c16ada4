"""Time progress.png: nnU-Net's LocalLogger vs DALE's, 50 epochs of fake values, interleaved in one process.

    python benchmarks/progress_plot_cost.py
"""
import tempfile
import time

import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunetv2_dale.method.progress import DALELocalLogger


def fill(logger: LocalLogger, epochs: int = 50) -> None:
    """Log random values for every key the logger plots."""
    for epoch in range(epochs):
        for key in list(logger.my_fantastic_logging):
            value = [0.5, 0.6] if key in ("dice_per_class_or_region", "dale_mean_confidence") else float(np.random.rand())
            logger.log(key, value, epoch)


def main() -> None:
    out = tempfile.mkdtemp()
    for cls in (LocalLogger, DALELocalLogger, LocalLogger, DALELocalLogger):
        logger = cls()
        fill(logger)
        start = time.perf_counter()
        logger.plot_progress_png(out)
        print(cls.__name__, f"{time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
