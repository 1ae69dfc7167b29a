"""normkit's layers, one file per family; the public names are re-exported by ``normkit``."""
