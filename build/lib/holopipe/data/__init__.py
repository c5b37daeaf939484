"""Data preparation: acquisition, regridding, augmentation, standardization, training examples."""
