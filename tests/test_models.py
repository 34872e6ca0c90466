import pytest
import torch

from raysemi.models import Discriminator, create_model, list_models, main_output


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_unet_has_the_reference_parameter_count():
    assert n_params(create_model("unet", in_channels=1, num_classes=4)) == 1_813_764


def test_transposed_variant_is_available_and_larger():
    assert n_params(create_model("unet", in_channels=1, num_classes=4, upsampling="transposed")) == 1_944_324


@pytest.mark.parametrize("name", ["unet", "unet_ds"])
def test_output_shapes(name):
    m = create_model(name, in_channels=1, num_classes=4).eval()
    out = m(torch.randn(2, 1, 48, 64))
    assert main_output(out).shape == (2, 4, 48, 64)
    if name == "unet_ds":
        assert len(out) == 4 and all(o.shape == (2, 4, 48, 64) for o in out)


def test_unknown_model_lists_known_ones():
    with pytest.raises(KeyError, match="unet_ds"):
        create_model("resnet")
    assert {"unet", "unet_ds"} <= set(list_models())


def test_discriminator_scores_any_patch_size():
    d = Discriminator(num_classes=4, in_channels=1)
    for size in (32, 256):
        assert d(torch.rand(3, 4, size, size), torch.rand(3, 1, size, size)).shape == (3, 2)


def test_feature_dropout_draws_one_fraction_for_the_batch():
    """As the reference: one 0.7-0.9 fraction a call, each sample's own peak. Two identical
    samples whose positions spread evenly from 0 to 1 keep the same positions (a draw per sample
    would differ by more than the 1/1000 spacing, almost surely), all below the fraction."""
    from raysemi.models.unet import feature_dropout

    x = torch.linspace(0.0, 1.0, 1000).view(1, 1, 1, 1000).repeat(2, 3, 1, 1)
    for seed in range(5):
        torch.manual_seed(seed)
        kept = feature_dropout(x)[:, 0] != 0
        assert torch.equal(kept[0], kept[1])
        share = kept[0].float().mean().item()
        assert 0.69 < share < 0.91  # the positions below the drawn fraction of the peak (1.0)


# -- per-group BatchNorm statistics -------------------------------------------------------------
def _unet_without_dropout(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = create_model("unet", in_channels=1, num_classes=4)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0  # dropout's draws are per sample but consume the generator differently
    return net


def _bn_buffers(net: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in net.named_buffers()]


@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_forward_computes_what_separate_forwards_compute(channels_last):
    """One train-mode forward of cat(x1, x2, x3) with BatchNorm groups (3, 6, 6) gives the three
    separate forwards' outputs, and leaves the same running statistics (updated group after
    group) and batch count; the same batch without groups does not (the control)."""
    from raysemi.models.batch_norm_groups import batch_norm_groups

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    separate, grouped, plain = (_unet_without_dropout().train().to(memory_format=fmt) for _ in range(3))
    torch.manual_seed(1)
    xs = [torch.randn(n, 1, 32, 32).to(memory_format=fmt) * s + s for n, s in ((3, 1.0), (6, 2.0), (6, 0.5))]
    expected = torch.cat([separate(x) for x in xs])
    with batch_norm_groups(grouped, (3, 6, 6)):
        got = grouped(torch.cat(xs))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for a, b in zip(_bn_buffers(grouped), _bn_buffers(separate)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert int(grouped.encoder.stages[0][1].num_batches_tracked) == 3
    assert (plain(torch.cat(xs)) - expected).abs().max() > 0.1
    # outside the block the network is an ordinary one again
    assert all(getattr(m, "group_sizes", None) is None for m in grouped.modules())
    torch.testing.assert_close(grouped(xs[1]), plain(xs[1]), rtol=1e-4, atol=1e-5)


def test_grouped_forward_in_eval_mode_uses_the_running_statistics():
    from raysemi.models.batch_norm_groups import batch_norm_groups

    net = _unet_without_dropout().eval()
    x = torch.randn(4, 1, 32, 32)
    with batch_norm_groups(net, (1, 3)):
        torch.testing.assert_close(net(x), torch.cat([net(x[:1]), net(x[1:])]), rtol=1e-5, atol=1e-6)
    assert int(net.encoder.stages[0][1].num_batches_tracked) == 0


def test_batch_norm_groups_refuses_layers_it_cannot_group_and_always_resets():
    from raysemi.models.batch_norm_groups import batch_norm_groups

    other = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="Sequential: per-group BatchNorm statistics need every BatchNorm layer"):
        with batch_norm_groups(other, (1, 1)):
            pass
    net = _unet_without_dropout()
    with pytest.raises(ValueError, match="group sizes must be positive"):
        with batch_norm_groups(net, (2, 0)):
            pass
    with pytest.raises(RuntimeError):  # sizes that do not add up to the batch: torch's own error
        with batch_norm_groups(net, (2, 3)):
            net(torch.randn(4, 1, 32, 32))
    assert all(getattr(m, "group_sizes", None) is None for m in net.modules())
