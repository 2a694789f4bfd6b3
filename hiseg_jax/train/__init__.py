"""The one trainer shared by every model: optimiser, sharding, checkpoints."""
