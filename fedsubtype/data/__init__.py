"""Cases in, tensors out: the manifest, image I/O, validation, regions, preprocessing, cache, dataset, splits, importers."""
