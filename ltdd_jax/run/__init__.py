"""The stage layer: the only reader of the config; stages, checks, resume records and grids."""
