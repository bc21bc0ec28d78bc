"""Benchmarks: the paper's comparison table, speed and ablations (``python -m monai_wsss.benchmark {table,speed,ablation}``)."""

__all__: list[str] = []
