"""Recovery after layer removal: KD from the original model (distill.py), the offline
teacher cache (teacher_cache.py) and the student under torchrun (parallel.py)."""
