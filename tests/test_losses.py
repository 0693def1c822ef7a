import pytest
import torch
import torch.nn.functional as F

from toolkit.modules import cross_entropy, hard_labels


def test_one_hot_target_equals_class_index():
    torch.manual_seed(0)
    logits = torch.randn(16, 10, dtype=torch.float64)
    y = torch.randint(10, (16,))
    assert torch.equal(cross_entropy(logits, F.one_hot(y, 10).double()), cross_entropy(logits, y))


def test_soft_targets_are_expected_log_loss():
    torch.manual_seed(0)
    logits = torch.randn(8, 5, dtype=torch.float64)
    p = torch.softmax(torch.randn(8, 5, dtype=torch.float64), -1)
    expected = -(p * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(cross_entropy(logits, p), expected)
    assert torch.equal(hard_labels(p), p.argmax(-1))


def test_sequence_targets_flatten():
    logits = torch.randn(2, 7, 5)
    y = torch.randint(5, (2, 7))
    assert torch.allclose(cross_entropy(logits, y), F.cross_entropy(logits.reshape(14, 5), y.reshape(14)))


def test_soft_target_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="one probability row per example"):
        cross_entropy(torch.randn(4, 10), torch.rand(4, 9))
