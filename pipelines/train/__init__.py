"""Training: Lightning data module, LitModule and the train / evaluate / run stages."""
