"""Sample-quality metrics: validation loss, FID, KID, IS."""
