"""Time progress.png: nnU-Net's LocalLogger vs DALE's, 50 epochs of fake values, interleaved in one process.

    python benchmarks/progress_plot_cost.py
"""
import tempfile
import time
from nnunetv2.training.logging.nnunet_logger import LocalLogger
from nnunetv2_dale.method.progress import DALELocalLogger
import numpy as np
def fill(lg, n=50):
    for e in range(n):
        for k in list(lg.my_fantastic_logging):
            v = [0.5, 0.6] if k in ("dice_per_class_or_region", "dale_mean_confidence") else float(np.random.rand())
            lg.log(k, v, e)
out = tempfile.mkdtemp()
for cls in (LocalLogger, DALELocalLogger, LocalLogger, DALELocalLogger):
    lg = cls(); fill(lg); t = time.perf_counter(); lg.plot_progress_png(out); print(cls.__name__, f"{time.perf_counter()-t:.2f} s")

