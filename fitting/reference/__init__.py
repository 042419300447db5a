"""Stage 1, the reference: load a micrograph (any common format and bit depth), find the
instrument data bar and a round aperture, read the pixel size from its tags."""
