"""Command-line interface (``medseg``). The only place that reads the environment."""
