"""open_clip models for the trainer and the experiments (build.py): by name or model-config file, with initial
weights, transforms and tokenizer."""
