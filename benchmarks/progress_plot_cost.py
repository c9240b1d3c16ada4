"""Time progress.png: nnU-Net's LocalLogger vs DALE's, 50 epochs of fake values, interleaved in one process.

    python benchmarks/progress_plot_cost.py
"""
import shutil
import statistics
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


def time_plots(epochs: int = 50, repeats: int = 2) -> dict[type, list[float]]:
    """Seconds per progress.png of nnU-Net's logger and DALE's, ``epochs`` of logged values, each
    drawn ``repeats`` times, interleaved."""
    out = tempfile.mkdtemp()
    times: dict[type, list[float]] = {LocalLogger: [], DALELocalLogger: []}
    try:
        for cls in (LocalLogger, DALELocalLogger) * repeats:
            logger = cls()
            fill(logger, epochs)
            start = time.perf_counter()
            logger.plot_progress_png(out)
            times[cls].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return times


def main() -> None:
    for cls, seconds in time_plots().items():
        print(cls.__name__, " ".join(f"{s:.2f} s" for s in seconds), f"(median {statistics.median(seconds):.2f} s)")


if __name__ == "__main__":
    main()
