"""Data: sources, relabel, split, faces, the decoded-image cache, augmentation, datasets."""
