"""Describing images: the VGG Gram texture descriptor that ranks and refines candidates, and
FID/KID scores of synthetic sets against a reference."""
