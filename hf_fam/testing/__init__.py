"""What checks compare FAM against, shipped so that the GPU checks (`benchmarks/cuda_checks.py`) and the test
suite share it: `fam_layer_reference`, a slow, family-agnostic FAM built from the model's own decoder layers."""
