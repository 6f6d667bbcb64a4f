"""Data: domains (labelled image sources), image decoding, manifests, MedMNIST, the fractal source, the decode cache, streaming, augmentation, pseudonyms, and the leakage audit."""
