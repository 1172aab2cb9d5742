"""Project tools that are not part of the awq_ao package: the main job, the architecture
sweep, the tiny configs it builds, and the lookups of the project's shared model and data.

Run from the repository root, e.g. ``python -m devtools.main_job`` or
``python -m devtools.arch_sweep``.
"""
