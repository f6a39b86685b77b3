"""Training: the loop, its configuration, the model file, and the one train → predict → score → save pipeline."""
