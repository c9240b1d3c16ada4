"""progress.png: nnU-Net's three panels and DALE's fourth in one figure."""
from __future__ import annotations

import matplotlib.pyplot as plt
from nnunetv2.training.logging.nnunet_logger import LocalLogger

from nnunetv2_dale.method.progress import DALELocalLogger


def _fill(logger: LocalLogger, epochs: int = 4) -> None:
    for e in range(epochs):
        for key in list(logger.my_fantastic_logging):
            per_class = key in ("dice_per_class_or_region", "dale_mean_confidence")
            logger.log(key, [0.5, 0.6] if per_class else 0.1 * e, e)


def test_dale_panel_is_a_fourth_row_of_nnunets_figure(tmp_path):
    stock, dale = LocalLogger(), DALELocalLogger()
    _fill(stock)
    _fill(dale)
    (tmp_path / "stock").mkdir()
    stock.plot_progress_png(str(tmp_path / "stock"))
    dale.plot_progress_png(str(tmp_path))
    stock_image = plt.imread(tmp_path / "stock" / "progress.png")
    image = plt.imread(tmp_path / "progress.png")
    assert image.shape == stock_image.shape  # redrawn every epoch: nnU-Net's pixel count, not more

    def red(picture):  # pixels of a red line (seaborn's red): DALE's fuzzy membership, nnU-Net's val loss
        r, g, b = picture[..., 0], picture[..., 1], picture[..., 2]
        return int(((r > 0.7) & (g < 0.4) & (b < 0.4)).sum())

    quarter = image.shape[0] // 4  # nnU-Net's last quarter: its learning-rate panel, blue only
    assert red(image[-quarter:]) > 1000 and red(stock_image[-quarter:]) == 0  # the DALE row is drawn, last
    assert plt.subplots is not None and plt.subplots.__module__ == "matplotlib.pyplot"  # patch undone
