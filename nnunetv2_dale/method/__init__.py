"""The DALE method inside nnU-Net: the trainer and its variants, the per-voxel label-confidence
memory (``memory``, ``coords``), the reliable/fuzzy R-sets (``rsets``), the objective (``loss``,
``alignment``, ``schedule``, ``sampling``) and its logging (``progress``). Imports nothing from
the benchmark or the audit."""
