"""Flower ClientApp of fedsubtype (thin wiring to fedsubtype.federation.site_algo.SiteAlgo)."""
