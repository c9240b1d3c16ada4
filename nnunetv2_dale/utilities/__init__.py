"""Start-up checks (``preflight``), trainer registration with nnU-Net (``registration``) and the CPU
budget variables with the stock baseline trainer that honours them (``budget``)."""
