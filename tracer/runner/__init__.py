"""One run: configuration, pre-flight, execution of the paths, progress and signals."""
