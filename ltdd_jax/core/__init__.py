"""Pure kernels below every method: DSA, one network's training, the ensemble trainer, matching."""
