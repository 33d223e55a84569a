"""Stand-ins of the real architectures and data (DESIGN 2): tiny random-init SD1.5, SDXL and PickScore
models and a Pick-a-Pic-schema mirror, for CI and for a dry run of a real profile on a cluster."""
