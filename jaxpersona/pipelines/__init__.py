"""The pipelines, each a short list of cached stages on the runner: persona vectors, persona space,
consistency, regimes, screening, config sweeps."""
