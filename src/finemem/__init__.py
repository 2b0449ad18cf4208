"""finemem: RL training of LLM memory managers (Fine-Mem). Core library; no heavy imports here."""

__version__ = "0.1.0"
