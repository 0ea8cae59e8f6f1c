"""Backbones, the Denoiser adapter (course_lib.models) and safetensors checkpoints (course_lib.checkpoint)."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest
import torch

from course_lib import models
from course_lib.conditioning import labels
from course_lib.checkpoint import CONFIG, WEIGHTS, CheckpointError, load_tensors, save_tensors
from course_lib.models import ARCHITECTURES, Denoiser, DiffusersUNet, MLP2D, build_denoiser, build_net
from course_lib.predictions import PARAMETERIZATIONS, Pred
from course_lib.processes import EDM, RectifiedFlow, SDDiscrete, VPCosine
from conftest import mlp_denoiser, tiny_unet

ALL_PROCESSES = [VPCosine(), SDDiscrete(), RectifiedFlow(), EDM()]
PROC_IDS = [p.name for p in ALL_PROCESSES]


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    t = torch.rand(shape[0], generator=g) * 0.98 + 0.01
    return x, t


# ----------------------------------------------------------------------------------------------------------------
# backbones
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [2, 5])
def test_mlp2d_shapes(dim):
    torch.manual_seed(0)
    net = MLP2D(dim=dim, hidden=32, depth=3)
    x = torch.randn(7, dim)
    out = net(x, torch.rand(7) * 1000)
    assert out.shape == (7, dim) and out.dtype == torch.float32
    assert net.class_emb is None


def test_mlp2d_class_conditional():
    torch.manual_seed(0)
    net = MLP2D(hidden=32, depth=2, num_classes=4)
    x, ts = torch.randn(6, 2), torch.full((6,), 300.0)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    out = net(x, ts, y)
    assert out.shape == (6, 2)
    assert net.class_emb.num_embeddings == 5  # index num_classes is the null label
    # labels matter, and no labels means the null label
    assert not torch.allclose(out, net(x, ts, (y + 1) % 4), atol=1e-5)
    torch.testing.assert_close(net(x, ts), net(x, ts, torch.full((6,), 4)))


def test_mlp2d_depends_on_time():
    torch.manual_seed(0)
    net = MLP2D(hidden=32, depth=2)
    x = torch.randn(4, 2)
    assert not torch.allclose(net(x, torch.full((4,), 10.0)), net(x, torch.full((4,), 900.0)), atol=1e-5)


def test_mlp2d_runs_in_float64():
    # analytic tests compare in float64; model.double() must work like for any nn.Module
    torch.manual_seed(0)
    net = MLP2D(hidden=16, depth=2, num_classes=2).double()
    out = net(torch.randn(3, 2, dtype=torch.float64), torch.rand(3, dtype=torch.float64) * 1000)
    assert out.dtype == torch.float64


@pytest.mark.parametrize("in_channels", [1, 3])
def test_unet_shapes(in_channels):
    net = tiny_unet(in_channels=in_channels)
    x = torch.randn(2, in_channels, 8, 8)
    with torch.no_grad():
        out = net(x, torch.tensor([10.0, 500.0]))
    assert out.shape == x.shape


def test_unet_class_conditional_and_attention():
    net = tiny_unet(num_classes=3, attention=True)
    x, ts = torch.randn(2, 1, 8, 8), torch.tensor([100.0, 700.0])
    with torch.no_grad():
        out = net(x, ts, torch.tensor([0, 2]))
        null = net(x, ts)
        assert out.shape == x.shape
        torch.testing.assert_close(null, net(x, ts, torch.tensor([3, 3])))
        assert not torch.allclose(out, null, atol=1e-6)
    assert any("Attn" in type(b).__name__ for b in net.unet.down_blocks)


def test_build_net_builds_registered_architectures():
    assert isinstance(build_net("mlp2d", hidden=16), MLP2D)
    assert isinstance(build_net("unet", sample_size=8, block_out_channels=(8, 16)), models.UNet)


def test_build_net_unknown_arch_lists_valid_ones():
    with pytest.raises(ValueError) as e:
        build_net("transformer")
    assert "transformer" in str(e.value)
    for arch in ARCHITECTURES:
        assert arch in str(e.value)


# ----------------------------------------------------------------------------------------------------------------
# Denoiser
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", PARAMETERIZATIONS)
@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=PROC_IDS)
def test_denoiser_pred_is_consistent_with_x_t(proc, kind):
    torch.manual_seed(0)
    model = Denoiser(MLP2D(hidden=32, depth=2), proc, kind)
    x, t = _inputs((16, 2))
    x = x * proc.sigma(t)[:, None]  # noise at the scale of the process (EDM: up to 80)
    with torch.no_grad():
        pred = model(x, t)
    assert isinstance(pred, Pred) and pred.x0.shape == x.shape and pred.eps.shape == x.shape
    scale = float(x.abs().max())
    torch.testing.assert_close(proc.marginal(pred.x0, t, pred.eps), x, rtol=1e-4, atol=1e-5 * scale)


def test_denoiser_on_unet_images():
    proc = SDDiscrete()
    model = Denoiser(tiny_unet(in_channels=3), proc, "eps")
    x, t = _inputs((2, 3, 8, 8))
    with torch.no_grad():
        pred = model(x, t)
        torch.testing.assert_close(pred.eps, model.raw(x, t))  # an eps network's output is eps_hat
    torch.testing.assert_close(proc.marginal(pred.x0, t, pred.eps), x, rtol=1e-4, atol=1e-4)


class _Spy(torch.nn.Module):
    """A backbone that records the time input it receives and returns zeros."""

    def forward(self, x, timestep, class_labels=None):
        self.seen, self.labels = timestep, class_labels
        return torch.zeros_like(x)


@pytest.mark.parametrize("proc", ALL_PROCESSES, ids=PROC_IDS)
def test_denoiser_feeds_the_backbone_the_process_timestep(proc):
    spy = _Spy()
    model = Denoiser(spy, proc, "eps")
    x, t = _inputs((3, 2))
    y = torch.tensor([0, 1, 2])
    model(x, t, labels(y, 3))
    torch.testing.assert_close(spy.seen, proc.timestep(t))
    assert torch.equal(spy.labels, y)
    with pytest.raises(TypeError, match="conditioning.labels"):  # a bare label tensor is refused at the boundary
        model(x, t, y)


def test_sd_backbone_sees_diffusers_timesteps():
    spy = _Spy()
    proc = SDDiscrete()
    Denoiser(spy, proc, "eps")(torch.zeros(2, 2), proc.t_of_timestep(torch.tensor([999, 0])).float())
    torch.testing.assert_close(spy.seen, torch.tensor([999.0, 0.0]), rtol=0, atol=1e-3)


def test_config_of_an_unregistered_backbone_is_an_error():
    with pytest.raises(ValueError, match="ARCHITECTURES"):
        Denoiser(_Spy(), RectifiedFlow(), "eps").config()
    from diffusers import UNet2DModel

    wrapped = DiffusersUNet(UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=8,
                                        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2))
    with pytest.raises(ValueError):
        Denoiser(wrapped, RectifiedFlow(), "eps").config()


# ----------------------------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------------------------

_mlp_denoiser = partial(mlp_denoiser, RectifiedFlow(), 1, torch.float32, hidden=32, kind="velocity")


@pytest.mark.parametrize("make", [
    lambda: _mlp_denoiser().eval(),
    lambda: mlp_denoiser(VPCosine(log_snr_min=-15.0), 1, torch.float32, hidden=32, num_classes=3, kind="v").eval(),
    lambda: Denoiser(tiny_unet(num_classes=2), EDM(sigma_max=40.0), "x0").eval(),
], ids=["mlp-rf", "mlp-classes-vp", "unet-edm"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, make):
    model = make()
    save_denoiser_dir = tmp_path / "ckpt"
    models.save_denoiser(save_denoiser_dir, model, extra={"step": 123, "note": "teacher"})
    loaded, config = models.load_denoiser(save_denoiser_dir)
    assert config["step"] == 123 and config["note"] == "teacher"
    assert config["denoiser"] == model.config()
    assert not loaded.training
    assert type(loaded.process) is type(model.process) and loaded.process.config() == model.process.config()
    assert loaded.parameterization == model.parameterization
    shape = (3, 2) if isinstance(model.net, MLP2D) else (2, 1, 8, 8)
    x, t = _inputs(shape)
    y = labels(torch.tensor([0, 1, 1][: shape[0]]), 3)
    with torch.no_grad():
        a, b = model(x, t, y), loaded(x, t, y)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.eps, b.eps)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_checkpoint_folder_holds_only_safetensors_and_json(tmp_path):
    models.save_denoiser(tmp_path / "c", _mlp_denoiser().eval())
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert files == sorted([WEIGHTS, CONFIG])
    raw = (tmp_path / "c" / WEIGHTS).read_bytes()
    assert raw[:1] != b"\x80" and not raw.startswith(b"PK")  # neither a pickle nor a torch.save zip
    header_len = int.from_bytes(raw[:8], "little")           # safetensors: u64 header length, then JSON
    header = json.loads(raw[8: 8 + header_len])
    assert "net.out.weight" in header
    config = json.loads((tmp_path / "c" / CONFIG).read_text())
    assert config["denoiser"]["arch"] == "mlp2d"             # a registered name, never a class path
    assert "MLP2D" not in json.dumps(config)


def test_loading_a_missing_folder_names_the_missing_file(tmp_path):
    with pytest.raises(CheckpointError) as e:
        models.load_denoiser(tmp_path / "nowhere", how_to_recreate="python scripts/train_toy.py")
    assert WEIGHTS in str(e.value) and "nowhere" in str(e.value)
    assert "python scripts/train_toy.py" in str(e.value)


def test_loading_without_config_names_config_json(tmp_path):
    models.save_denoiser(tmp_path, _mlp_denoiser().eval())
    (tmp_path / CONFIG).unlink()
    with pytest.raises(CheckpointError, match=CONFIG):
        models.load_denoiser(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupted_weights_raise_checkpoint_error_naming_the_file(tmp_path, damage):
    models.save_denoiser(tmp_path, _mlp_denoiser().eval())
    w = tmp_path / WEIGHTS
    raw = w.read_bytes()
    w.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"not a safetensors file" * 20, "empty": b""}[damage])
    with pytest.raises(CheckpointError) as e:
        models.load_denoiser(tmp_path, how_to_recreate="rerun notebook 00")
    assert str(w) in str(e.value) and "rerun notebook 00" in str(e.value)


def test_corrupted_config_raises_checkpoint_error(tmp_path):
    models.save_denoiser(tmp_path, _mlp_denoiser().eval())
    (tmp_path / CONFIG).write_text('{"denoiser": {"arch": ')
    with pytest.raises(CheckpointError, match=CONFIG):
        models.load_denoiser(tmp_path)


def test_weights_not_matching_the_config_raise_checkpoint_error(tmp_path):
    models.save_denoiser(tmp_path, _mlp_denoiser().eval())
    cfg = json.loads((tmp_path / CONFIG).read_text())
    cfg["denoiser"]["net"]["hidden"] = 64  # config now describes a wider net than the stored weights
    (tmp_path / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match"):
        models.load_denoiser(tmp_path)


def test_missing_tensor_raises_checkpoint_error(tmp_path):
    model = _mlp_denoiser().eval()
    sd = {k: v for k, v in model.state_dict().items() if k != "net.out.bias"}
    save_tensors(tmp_path, sd, {"denoiser": model.config()})
    with pytest.raises(CheckpointError, match="net.out.bias"):
        models.load_denoiser(tmp_path)


def test_config_without_a_denoiser_is_an_error(tmp_path):
    save_tensors(tmp_path, {"w": torch.zeros(2)}, {"something": "else"})
    with pytest.raises(CheckpointError, match="denoiser"):
        models.load_denoiser(tmp_path)


def test_save_tensors_round_trip_and_overwrite(tmp_path):
    t1 = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2, 3])}
    save_tensors(tmp_path, t1, {"k": 1})
    save_tensors(tmp_path, {"a": torch.ones(2)}, {"k": 2})  # overwriting leaves no temporary files behind
    tensors, config = load_tensors(tmp_path)
    assert config == {"k": 2} and list(tensors) == ["a"] and torch.equal(tensors["a"], torch.ones(2))
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == sorted([WEIGHTS, CONFIG])


def test_build_denoiser_from_config_has_the_same_structure():
    model = mlp_denoiser(EDM(sigma_max=10.0), 1, torch.float32, hidden=32, num_classes=2, kind="x0").eval()
    again = build_denoiser(model.config())
    assert again.config() == model.config()
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------------
# time inputs stay float32 (issue 9)
# ----------------------------------------------------------------------------------------------------------------

def test_as_times_never_casts_times_below_float32():
    from course_lib.processes import as_times

    for dtype, expected in [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        t = as_times(torch.tensor(0.749, dtype=torch.float64), torch.zeros(3, 2, dtype=dtype))
        assert t.dtype == expected and t.shape == (3,)


class _SpyList(torch.nn.Module):
    """A backbone that records every timestep tensor it receives and returns zeros (an eps net: x0 = x / alpha)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, timestep, class_labels=None):
        self.seen.append(timestep)
        return torch.zeros_like(x)


def test_bf16_ddim_on_the_sd_schedule_feeds_exact_integer_timesteps():
    from course_lib import grids, samplers

    spy, proc = _SpyList(), SDDiscrete()
    model = Denoiser(spy, proc, "eps")
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    out = samplers.ddim(model, x, grids.sd_grid(4, proc, "trailing"), proc)
    assert out.dtype == torch.bfloat16
    assert all(ts.dtype in (torch.float32, torch.float64) for ts in spy.seen)
    assert [ts.tolist() for ts in spy.seen] == [[999.0] * 2, [749.0] * 2, [499.0] * 2, [249.0] * 2]
    # what bf16 times would have given: 749 is not a bf16 number
    assert float(torch.tensor(749.0).bfloat16()) != 749.0


def test_to_pred_receives_float32_times_with_bf16_data():
    seen = []

    class Proc(SDDiscrete):
        def alpha(self, t):
            seen.append(t.dtype)
            return super().alpha(t)

    model = Denoiser(_SpyList(), Proc(), "eps")
    model(torch.zeros(2, 2).bfloat16(), torch.full((2,), 0.75).bfloat16())
    assert seen and all(d == torch.float32 for d in seen)
