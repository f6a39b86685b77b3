"""Flower ClientApp of fedsubtype (thin wiring to fedsubtype.federated.SiteAlgo)."""
