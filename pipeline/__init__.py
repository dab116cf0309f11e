"""rded: RDED dataset distillation as a streaming batch job."""

__version__ = "0.1.0"
