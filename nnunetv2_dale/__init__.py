"""nnunetv2-dale: DALE (data-driven alternating learning) as an nnU-Net v2 trainer.

Importing this package is cheap: torch and nnU-Net are imported only by the modules that need
them (``nnunetv2_dale.method.trainer`` and the command-line tools).
"""
__version__ = "0.4.0"
