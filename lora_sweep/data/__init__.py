"""Folder -> bucketed, cached examples: the kohya-layout scan, captions, the bundled photos, kohya's bucket
algorithm and the shared latent/text cache. Knows nothing of the loss or the training loop.
"""
