"""Training drivers, one concern per file: ``objectives`` (the losses the trainers optimise: EAR's, the DiT
baseline's, the LiteVAE's), ``generator`` (the EAR loop and its flags), ``dit`` (the DiT baseline's), ``vae`` (the
LiteVAE's), ``loop`` (the steps those three loops share), ``recipe`` (EAR's optimisation recipe: lr from blr, the
learning-rate schedule of every trainer, parameter groups, EMA), ``latent_cache`` (encode a dataset once),
``checkpointing`` (atomic, pickle-free checkpoints).
"""
