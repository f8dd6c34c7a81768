"""distclip's internals: the clip step (`clip`, `update`, `step`, ...) and the sync backends. Not public: what
`distclip`, `distclip.keras` and `distclip.cluster` export is."""
