"""The trace file on disk: HDF5 layout and read API, the background tap writer, files that never clobber."""
