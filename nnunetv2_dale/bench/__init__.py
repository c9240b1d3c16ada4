"""The noisy-label benchmark ``nnUNetv2_dale_bench`` (``cli``): noisy dataset copies, training and
scoring (``metrics``), reports (``report``), cost at real batch shapes (``cost``), fast-regime
dataset derivatives (``subset``) and the noise-mask oracles (``oracles``, measuring instruments,
never defaults). ``python -m nnunetv2_dale.bench`` runs the command line."""
