"""Distillation methods, one small file each, all built on the same processes, samplers, losses and loop."""
