"""cft: Critical Token Fine-tuning — find the tokens that decide a reasoning chain, train only on them."""

__version__ = "0.1.0"
