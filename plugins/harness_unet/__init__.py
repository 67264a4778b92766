"""U-Net backbones: ADM-style class-conditional and Stable Diffusion (diffusers)."""
