"""Getting taps out of forwards: hooks, the plug-in observer, the paths, the lockstep runner, the collector."""
