"""Gradient checkpointing (diffusers' ``enable_gradient_checkpointing``; train's --grad-checkpointing): the same
loss and gradients, fewer saved activations."""

import argparse
import json

import pytest
import torch

from parscale_ear_hf.models.diffusion_head import DiffusionHead
from parscale_ear_hf.plan import measure_step
from parscale_ear_hf.training import generator
from parscale_ear_hf.training.objectives import EARTrainingModel

from conftest import make_latent_workspace, tiny_components


def training_model(parscale_n: int, head: str) -> EARTrainingModel:
    parts = tiny_components(parscale_n)
    energy_head = parts["energy_head"]
    if head == "diffusion":
        torch.manual_seed(1)
        energy_head = DiffusionHead(condition_dim=32, token_channels=4, width=32, depth=2)
        with torch.no_grad():  # MAR's init zeros the output: move it, so the loss depends on the backbone
            for p in energy_head.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return EARTrainingModel(parts["lite_hybrid"], parts["transformer"], energy_head, score_batch_mul=2).train()


def loss_and_grads(model: EARTrainingModel, latents, labels):
    """One training step's loss and gradients; every draw (mask, labels, head noise, dropout) seeded alike."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)  # dropout, also inside the recomputed blocks (checkpoint restores the RNG state)
    loss = model(latents, labels, generator=torch.Generator().manual_seed(5))
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("parscale_n", "head"), [(1, "energy"), (2, "energy"), (1, "diffusion")])
def test_checkpointing_keeps_the_loss_and_gradients_bit_for_bit(parscale_n, head):
    """The recomputation repeats the forward's ops on the same inputs with the same RNG state (dropout included),
    so on one CPU thread count it gives the very same floats: equality, not a tolerance."""
    model = training_model(parscale_n, head)
    latents, labels = torch.randn(3, 4, 4, 4), torch.tensor([1, 2, 3])
    loss, grads = loss_and_grads(model, latents, labels)
    assert not model.transformer.is_gradient_checkpointing
    model.enable_gradient_checkpointing()
    assert model.transformer.gradient_checkpointing and model.energy_head.gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(model, latents, labels)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        assert torch.equal(grads[name], grads_ckpt[name]), name
    # Dropout is really drawn: another seed changes the loss, so the equality above is not a dropout-free one.
    torch.manual_seed(4)
    assert not torch.equal(model(latents, labels, generator=torch.Generator().manual_seed(5)).detach(), loss)


def test_checkpointing_saves_only_the_block_inputs():
    model = training_model(1, "energy")
    latents, labels = torch.randn(3, 4, 4, 4), torch.tensor([1, 2, 3])

    def saved(checkpointing: bool) -> int:
        if checkpointing:
            model.enable_gradient_checkpointing()
        else:
            model.transformer.disable_gradient_checkpointing()
            model.energy_head.disable_gradient_checkpointing()
        torch.manual_seed(3)
        return measure_step(lambda: model(latents, labels, generator=torch.Generator().manual_seed(5)),
                            exclude=model.parameters()).saved_bytes  # fmt: skip

    plain, checkpointed = saved(False), saved(True)
    assert 0 < checkpointed < plain / 2


def test_no_checkpointing_without_grad():
    """Sampling (no grad) runs the blocks as they are, with the flag on."""
    model = training_model(1, "energy").eval()
    model.enable_gradient_checkpointing()

    def refuse(*args):
        raise AssertionError("checkpointed without grad")

    for part in (model.transformer, model.energy_head):
        part._gradient_checkpointing_func = refuse
    with torch.no_grad():
        hidden = model.transformer(torch.randn(2, 16, 4), torch.tensor([0, 1]), torch.ones(2, 16, dtype=torch.bool))
        tokens = model.energy_head.sample(hidden.flatten(0, 1), generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (32, 4)
    with pytest.raises(AssertionError, match="checkpointed without grad"):
        model.transformer(torch.randn(2, 16, 4), torch.tensor([0, 1]), torch.ones(2, 16, dtype=torch.bool))


def test_train_with_the_flag_ends_at_the_same_weights(tmp_path):
    """`train --grad-checkpointing` turns it on, and two updates end at the weights of the run without it."""
    make_latent_workspace(tmp_path, count=8)
    config = {
        "lite_hybrid": {"coarse_grid_size": 2, "hidden_dim": 16, "num_heads": 2},
        "transformer": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "buffer_size": 4},
        "energy_head": {"width": 32, "depth": 2, "noise_dim": 8},
    }
    (tmp_path / "model.json").write_text(json.dumps(config))
    parser = generator.add_arguments(argparse.ArgumentParser())

    def train(name: str, *flags: str) -> EARTrainingModel:
        return generator.run(parser.parse_args([
            "--latents", str(tmp_path / "latents"), "--model-config", str(tmp_path / "model.json"),
            "--output-dir", str(tmp_path / name), "--max-steps", "2", "--batch-size", "4", "--warmup-steps", "1",
            "--sample-steps", "1", "--cpu", *flags,
        ]))  # fmt: skip

    plain, checkpointed = train("plain"), train("checkpointed", "--grad-checkpointing")
    assert checkpointed.transformer.gradient_checkpointing and checkpointed.energy_head.gradient_checkpointing
    assert not plain.transformer.gradient_checkpointing
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        assert torch.equal(a, b), name
    logs = [(tmp_path / name / "train_log.jsonl").read_text() for name in ("plain", "checkpointed")]
    losses = [[json.loads(line)["loss"] for line in log.splitlines() if '"loss"' in line] for log in logs]
    assert losses[0] == losses[1] and len(losses[0]) == 2
