"""rlkd: ranking-loss knowledge distillation (Peng & Zhang 2024, arXiv 2409.12545)."""

__version__ = "0.1.0"
