"""Pictures: training curves and atlases of decoder atoms (matplotlib, imported lazily)."""
