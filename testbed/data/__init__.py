"""Data: the dataset file format (h5data), the PyTorch dataset, synthetic scenes, importers, class statistics."""
