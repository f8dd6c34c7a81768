"""`ClipOptimizer` and its callbacks, exported by `distclip.keras`."""
