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
