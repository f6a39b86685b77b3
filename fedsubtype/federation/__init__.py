"""Federation: the site's algorithm, the coordinator's round loop, configs, credentials, Flower processes, transport, run store."""
