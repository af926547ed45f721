"""The whole map: parameters -> simulation -> Gaussians -> images, and the image gradient reaching the physics."""

from __future__ import annotations

import torch
from conftest import REPO

from diffmpm_cli.assets import build_assets
from diffmpm_cli.config import load_scene
from diffmpm_cli.pipeline import GROUPS, Pipeline


def snowman(*overrides):
    scene = load_scene(REPO / "scenes" / "sphere_to_snowman.yaml",
                       ["sim.steps=30", "sim.frames=[10]", "sim.control_stride=10", *overrides])
    return Pipeline(scene, build_assets(scene))


def test_forward_shapes_and_every_group_gets_a_gradient():
    pipe = snowman()
    params = pipe.initial_parameters(GROUPS)
    # controls that deform the body: at rest (F = I) the stress, and with it the gradient of E and nu, is exactly zero
    params["dFc"] = 0.05 * torch.randn(params["dFc"].shape, generator=torch.Generator().manual_seed(1))
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    out = pipe.forward(params)
    C = len(pipe.camera_names)
    assert out.images.shape == (2, C, 64, 64, 3) and out.alphas.shape == (2, C, 64, 64, 1)
    assert out.result.frames == [10, 30]
    alphas = out.alphas.detach()
    assert float(alphas.max()) > 0.9 and float(alphas.min()) < 0.01  # the body is in view, not filling it
    weights = torch.randn(out.images.shape, generator=torch.Generator().manual_seed(0))
    ((out.images * weights).sum() + out.alphas.sum()).backward()
    for name, value in params.items():
        assert value.grad is not None and torch.isfinite(value.grad).all(), name
        assert float(value.grad.abs().max()) > 0, f"no gradient reaches {name}"


def test_silhouette_loss_falls_under_plain_gradient_steps_on_dFc_alone():
    """The render signal really moves the physics: only the deformation-gradient controls are updated."""
    pipe = snowman("sim.frames=[]")
    _, target_alpha, _ = pipe.render_target()
    dFc = pipe.initial_parameters(["dFc"])["dFc"].requires_grad_(True)
    losses = []
    for _ in range(5):
        out = pipe.forward({"dFc": dFc})
        loss = (out.alphas[-1] - target_alpha).abs().mean()
        loss.backward()
        with torch.no_grad():
            dFc -= 0.04 * dFc.grad / dFc.grad.abs().max()
            dFc.grad = None
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses


def test_controls_of_any_size_leave_the_state_physical():
    """Random controls far larger than any optimiser step: an additive F + dFc with this spread inverted about half
    of the particles at the first control step; the multiplicative, isochoric controls invert none at any step and
    keep the particles from piling up (det F is their true volume ratio, which the material defends)."""
    from diffmpm_cli.optimize.evaluate import validity_metrics

    pipe = snowman()
    K, N = pipe.model.control_layers(pipe.steps), int(pipe.x0.shape[0])
    dFc = 3.0 * torch.randn(K, N, 3, 3, generator=torch.Generator().manual_seed(1))
    additive = torch.linalg.det(torch.eye(3) + dFc[0])
    assert float((additive <= 0).double().mean()) > 0.3  # what the old additive control would have done
    result = pipe.simulate({"dFc": dFc})
    found = validity_metrics(pipe, result)
    assert found["inverted_share_any_step"] == 0.0 and found["det_F_min_any_step"] > 0.0, found
    assert found["clumped_share"] <= 0.01 and found["physically_valid"], found
