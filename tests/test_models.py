import pytest
import torch
from torch import nn

from msvq.models import LinearClassifier, ProjectionHead, SplitBatchNorm2d, resnet18


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _chunkwise_batchnorm(x, num_splits, split_bn):
    """Reference: one plain BatchNorm2d per chunk, each starting from split_bn's state."""
    outputs, modules = [], []
    for chunk in x.chunk(num_splits):
        bn = nn.BatchNorm2d(split_bn.num_features, momentum=split_bn.momentum)
        bn.load_state_dict(split_bn.state_dict())
        outputs.append(bn(chunk))
        modules.append(bn)
    return torch.cat(outputs), modules


def _split_bn_with_random_affine(num_features, num_splits):
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(num_features, num_splits)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def test_split_bn_normalises_each_chunk_separately():
    bn = _split_bn_with_random_affine(num_features=5, num_splits=4)
    x = torch.randn(16, 5, 6, 7) * 3 + torch.arange(16.0).view(16, 1, 1, 1)

    expected, _ = _chunkwise_batchnorm(x, 4, bn)
    actual = bn(x)

    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    # Chunks are contiguous: a strided grouping would mix the per-sample offsets.
    torch.testing.assert_close(actual[:4].mean(dim=(0, 2, 3)), bn.bias.detach(), atol=1e-5, rtol=0)


def test_split_bn_running_stats():
    bn = _split_bn_with_random_affine(num_features=3, num_splits=2)
    x = torch.randn(8, 3, 4, 4) * 2 + 1

    _, chunk_modules = _chunkwise_batchnorm(x, 2, bn)
    bn(x)

    expected_mean = torch.stack([m.running_mean for m in chunk_modules]).mean(dim=0)
    expected_var = torch.stack([m.running_var for m in chunk_modules]).mean(dim=0)
    torch.testing.assert_close(bn.running_mean, expected_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(bn.running_var, expected_var, atol=1e-6, rtol=1e-6)
    assert bn.num_batches_tracked.item() == 1


def test_split_bn_gradients_match_chunkwise_reference():
    bn = _split_bn_with_random_affine(num_features=3, num_splits=2)
    x = torch.randn(6, 3, 5, 5, requires_grad=True)
    upstream = torch.randn(6, 3, 5, 5)

    (bn(x) * upstream).sum().backward()
    grad_split = x.grad.clone()
    x.grad = None
    reference, _ = _chunkwise_batchnorm(x, 2, bn)
    (reference * upstream).sum().backward()

    torch.testing.assert_close(grad_split, x.grad, atol=1e-5, rtol=1e-5)


def test_split_bn_accepts_channels_last():
    bn = _split_bn_with_random_affine(num_features=4, num_splits=2)
    x = torch.randn(4, 4, 5, 6)

    contiguous_out = bn(x)
    channels_last_out = bn(x.to(memory_format=torch.channels_last))

    torch.testing.assert_close(channels_last_out, contiguous_out, atol=1e-6, rtol=1e-6)
    assert channels_last_out.is_contiguous(memory_format=torch.channels_last)


def test_split_bn_rejects_indivisible_batch():
    bn = SplitBatchNorm2d(3, num_splits=4)
    with pytest.raises(ValueError, match=r"batch size 6 .* num_splits 4"):
        bn(torch.randn(6, 3, 2, 2))


def test_split_bn_eval_matches_plain_batchnorm():
    bn = _split_bn_with_random_affine(num_features=3, num_splits=4).eval()
    plain = nn.BatchNorm2d(3).eval()
    plain.load_state_dict(bn.state_dict())
    x = torch.randn(5, 3, 4, 4)  # 5 is not divisible by 4: eval mode does not split.

    torch.testing.assert_close(bn(x), plain(x))
    assert list(bn.state_dict()) == list(plain.state_dict())


def test_split_weights_load_into_plain_net():
    torch.manual_seed(0)
    split_net = resnet18(width=4, bn_splits=2)
    split_net(torch.randn(4, 3, 16, 16))  # one training forward moves the running statistics
    plain_net = resnet18(width=4, bn_splits=1)

    plain_net.load_state_dict(split_net.state_dict(), strict=True)
    split_net.eval()
    plain_net.eval()
    x = torch.randn(3, 3, 16, 16)

    torch.testing.assert_close(plain_net(x), split_net(x))
    split_layers = [m for m in split_net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(type(m) is SplitBatchNorm2d and m.num_splits == 2 for m in split_layers)
    assert all(type(m) is nn.BatchNorm2d for m in plain_net.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize(
    ("width", "in_channels", "size", "maxpool", "final_spatial"),
    [(4, 3, 32, False, 4), (8, 1, 28, False, 4), (4, 3, 64, True, 4)],
)
def test_resnet18_shapes(width, in_channels, size, maxpool, final_spatial):
    net = resnet18(width=width, in_channels=in_channels, maxpool=maxpool)
    spatial = {}
    net.layer4.register_forward_hook(lambda module, inputs, output: spatial.update(size=output.shape[-1]))

    out = net(torch.randn(2, in_channels, size, size))

    assert out.shape == (2, 8 * width)
    assert net.feature_dim == 8 * width
    assert spatial["size"] == final_spatial
    assert net.conv1.kernel_size == (3, 3)
    assert net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.MaxPool2d) == maxpool
    assert not hasattr(net, "fc")


def test_resnet18_full_width_parameter_count():
    net = resnet18()
    # torchvision's resnet18 has 11,689,512 parameters; without fc (513,000) and with a
    # 3x3 instead of a 7x7 stem (1,728 instead of 9,408 weights) that is 11,168,832.
    assert sum(p.numel() for p in net.parameters()) == 11_168_832
    assert net.feature_dim == 512


def test_projection_head_layers():
    head = ProjectionHead(16, hidden_dim=32, out_dim=8)

    layer_types = [type(layer) for layer in head]
    assert layer_types == [nn.Linear, nn.ReLU, nn.Linear]
    assert head(torch.randn(5, 16)).shape == (5, 8)
    assert (head[0].in_features, head[0].out_features, head[2].out_features) == (16, 32, 8)


def test_linear_classifier_init():
    torch.manual_seed(0)
    classifier = LinearClassifier(512, 100)

    assert classifier.weight.shape == (100, 512)
    assert torch.equal(classifier.bias, torch.zeros(100))
    assert abs(classifier.weight.std().item() - 0.01) < 0.0005
    assert abs(classifier.weight.mean().item()) < 0.0005
