"""entropylens: internal-policy entropy of language models (see DESIGN §1)."""

__version__ = "0.1.0"
