"""Sampling: images and grids, ADM's sample-npz protocol, the CUDA-graph backend, the diffusers pipeline."""
