"""Delineate training: datasets, loops, evaluation, distillation. Imports rs_engine, never the reverse."""
