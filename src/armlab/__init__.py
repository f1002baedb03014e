"""armlab: comparable data-selection training arms for nanochat-style LLM pretraining."""

__version__ = "0.1.0"
