"""Image backbones returning multi-scale feature maps."""
