"""The optimizer step's stability pipeline: `StepGuard` and its stages, peers on one floor.

Nothing here imports `hf_stability.callbacks`: the public callbacks are thin facades that own a stage, export its
checkpoint state and hand Trainer's events to the guard. Internal: names here may change between releases.
"""
