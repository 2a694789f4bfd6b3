"""Reusable neural-network layers: attention, deformable attention, position encodings, MLPs."""
