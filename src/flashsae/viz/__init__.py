"""Pictures: training curves, atlases of decoder atoms, reconstructions, sweep trade-offs (matplotlib,
imported lazily) and the self-contained HTML report."""
