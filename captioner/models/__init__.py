"""The captioning models.

Shape legend, used in every shape comment of this package:
    B batch, T tokens, N image regions or patches (N = h*w of the encoder grid), D width (d_model),
    H heads, Dh width per head (D / H), V vocabulary size, L layers, C channels.
"""
