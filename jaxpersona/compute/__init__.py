"""Batched computation on a model: tokenize and pad, the model handle, generation, likelihoods,
activations, sweeps, regime grids, training, BiPO, multi-turn drift, memory plans."""
