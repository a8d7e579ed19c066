"""The one runner: a run directory with its manifest, lock, timed and cached stages."""
