"""The label audit ``nnUNetv2_dale_audit`` (``report``): a fold's label confidence mapped back to
the raw geometry (``export``), per-case rankings, maps and overlays for annotators."""
