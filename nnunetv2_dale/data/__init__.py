"""Data: label-noise models (``noise``), the lesion-phantom generator (``phantoms``) and raw-dataset
reading helpers (``io``)."""
