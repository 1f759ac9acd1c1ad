"""The SD-1.x networks (UNet, VAE, CLIP text encoder) and model loading. No sampling, no editing."""
