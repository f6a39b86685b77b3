"""Virtual-site experiments: partitioners, scenario files, the FLamby-style runner and its report.

`fedsubtype-sim --scenario simulation/scenarios/NAME.yaml` runs Flower's simulation engine with one
virtual SuperNode per site, executing the same ClientApp and ServerApp as a real federation.
"""
