"""What the memory looks like: the progress.png panel and per-case buffer pictures.

``DALELocalLogger`` is nnU-Net's ``LocalLogger`` with DALE's per-epoch keys. Its
``plot_progress_png`` lets nnU-Net draw its usual three panels and adds a fourth, in the same
figure, with the fraction of voxels visited, the mean label confidence per class, the R-set
memberships, the phase and the alignment loss, so ``progress.png`` stays the one place to watch a
run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from nnunetv2.training.logging.nnunet_logger import LocalLogger

DALE_KEYS = ("dale_visited_fraction", "dale_mean_confidence", "dale_phase", "dale_reliable_fraction",
             "dale_fuzzy_fraction", "dale_align_loss", "dale_noise_estimate", "dale_gate", "dale_visits_per_voxel")


class DALELocalLogger(LocalLogger):
    def __init__(self, verbose: bool = False) -> None:
        super().__init__(verbose)
        self.ensure_keys()

    def ensure_keys(self) -> None:
        for key in DALE_KEYS:
            self.my_fantastic_logging.setdefault(key, [])

    def load_checkpoint(self, checkpoint: dict) -> None:
        super().load_checkpoint(checkpoint)
        self.ensure_keys()

    def plot_progress_png(self, output_folder: str) -> None:
        """nnU-Net's three panels plus DALE's, drawn into ONE figure of nnU-Net's size and saved
        once: nnU-Net's ``plt.subplots(3, 1)`` is answered with a four-row figure whose last row is
        ours. Drawing a second figure and pasting the images cost 4x nnU-Net's plot per epoch; a
        figure a third taller, +60 % (PNG encoding grows with the pixels): the picture is redrawn
        every epoch, so it keeps nnU-Net's pixel count (``benchmarks/cost_summary.py``)."""
        from unittest import mock

        import matplotlib.pyplot as plt

        subplots = plt.subplots

        def four_rows(nrows: int = 1, ncols: int = 1, **kwargs):
            if (nrows, ncols) != (3, 1):
                return subplots(nrows, ncols, **kwargs)
            fig, axes = subplots(4, 1, **kwargs)
            self._draw_dale_panel(axes[3])
            return fig, axes[:3]

        with mock.patch.object(plt, "subplots", four_rows):
            super().plot_progress_png(output_folder)

    def _draw_dale_panel(self, ax) -> None:
        log = self.my_fantastic_logging
        visited = log["dale_visited_fraction"]
        confidence = log["dale_mean_confidence"]
        x = list(range(len(visited)))
        ax.plot(x, visited, color="k", ls="-", label="voxels visited (fraction)", linewidth=4)
        per_class = np.array([c for c in confidence], dtype=float).reshape(len(confidence), -1)
        for k in range(per_class.shape[1]):
            ax.plot(x, per_class[:, k], ls="--", linewidth=3, label=f"mean label confidence, class {k}")
        ax.plot(x, log["dale_noise_estimate"][:len(x)], color="b", ls="-.", linewidth=3,
                label="noise estimate (median case)")
        ax.plot(x, log["dale_gate"][:len(x)], color="orange", linewidth=3, label="noise gate")
        ax.plot(x, log["dale_reliable_fraction"][:len(x)], color="g", linewidth=3, label="reliable membership (mean)")
        ax.plot(x, log["dale_fuzzy_fraction"][:len(x)], color="r", linewidth=3, label="fuzzy membership (mean)")
        ax.step(x, [p / 3 for p in log["dale_phase"][:len(x)]], color="gray", where="mid",
                label="phase (0 warm-up, 1/3 stable, 2/3 fuzzy, 1 joint)")
        ax2 = ax.twinx()
        ax2.plot(x, log["dale_align_loss"][:len(x)], color="m", ls=":", linewidth=3, label="alignment loss")
        ax2.set_ylabel("alignment loss")
        ax2.legend(loc=(0.5, 1))
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        ax.legend(loc=(0, 1))


def save_buffer_picture(path: Path, label: np.ndarray, q: np.ndarray, n: np.ndarray, title: str) -> None:
    """Middle slice of one case: label, temporal ensemble (p of the foreground / argmax), visits."""
    import matplotlib.pyplot as plt

    z = label.shape[0] // 2
    prob = q[z, ..., 0] if q.shape[-1] == 1 else q[z].argmax(-1) / max(q.shape[-1] - 1, 1)
    with plt.rc_context({"font.size": 10, "axes.titlesize": 11}):  # nnU-Net's logger sets a huge seaborn scale
        _draw_panels(path, [label[z], prob, n[z]], title)


def _draw_panels(path: Path, images: list[np.ndarray], title: str) -> None:
    import matplotlib.pyplot as plt

    label, prob, visits = images
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, img, name, vmax in zip(axes, (label, prob, visits), ("label", "temporal ensemble q", "visits"),
                                   (max(int(label.max()), 1), 1, max(int(visits.max()), 1))):
        im = ax.imshow(img.astype(np.float32), cmap="gray" if name != "visits" else "viridis", vmin=0, vmax=vmax)
        ax.set_title(name)
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
