"""Detection: the z-plane sweep engine, the inference job, coarse-to-fine search, particles, the physics baseline."""
