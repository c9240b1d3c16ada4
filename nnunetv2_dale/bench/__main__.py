"""``python -m nnunetv2_dale.bench``: the same as ``nnUNetv2_dale_bench``."""
from nnunetv2_dale.bench.cli import main

main()
