"""What edits a forward: interventions (steer, ablate, cap, mixtures), capping configs, directions."""
