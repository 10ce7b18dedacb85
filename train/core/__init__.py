"""The trainer's core: the loop (trainer.py) and the parts it is made of, each in its own module: one step's
math (step.py), the learning-rate schedule (schedule.py), the engine (engine.py: device, AdamW, DeepSpeed
config), the policies, checkpoints (checkpoint.py: what and when), the stateful components (state.py),
preflight checks, the run log, collectives (distributed.py) and the export. Nothing is imported here."""
