"""Datasets: the synthetic shapes data, and loaders for ImageFolder, COCO json and image + mask pairs."""
