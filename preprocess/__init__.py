"""Preprocessing stage: readers for raw structure files and the Ray Data job that builds shards."""
