"""Training drivers, one concern per file: ``generator`` (the EAR loop and its flags), ``dit`` (the DiT
baseline's), ``loop`` (the steps those two loops share), ``recipe`` (EAR's optimisation recipe: lr from blr,
schedule, parameter groups, EMA), ``vae`` (the LiteVAE loop), ``latent_cache`` (encode a dataset once),
``checkpointing`` (atomic, pickle-free checkpoints).

The method they train lives beside the models: :class:`parscale_ear_hf.models.ear_training.EARTrainingModel`.
"""
