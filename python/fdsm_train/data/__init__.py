"""Datasets: generated toy densities, UCI tables from user CSVs, images (bundled digits or MNIST)."""
