import pytest
import torch

from napari_dismm.errors import ModelConfigError
from napari_dismm.model.heads import SubspaceFusionHead, TaskHead, combine_magnifications
from napari_dismm.model.layers import SNN, PatchEmbedding, masked_softmax


def test_masked_softmax_zero_on_padding_and_no_nan_for_empty_rows():
    scores = torch.tensor([[1.0, 2.0, 50.0], [3.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = masked_softmax(scores, mask, dim=-1)
    assert out[0, 2] == 0
    torch.testing.assert_close(out[0, :2], torch.softmax(scores[0, :2], -1))
    assert torch.equal(out[1], torch.zeros(3))


def test_layers_shapes():
    assert PatchEmbedding(7, 5)(torch.randn(2, 3, 7)).shape == (2, 3, 5)
    snn = SNN(11, 6).eval()
    assert snn(torch.randn(4, 11)).shape == (4, 6)


def test_subspace_logits_add_up_to_fused_logits():
    head = SubspaceFusionHead(task="classification", d=5, n_outputs=3)
    f_t, f_e = torch.randn(4, 5), torch.randn(4, 5)
    o_t, o_e = head.subspace_logits(f_t, f_e)
    torch.testing.assert_close(o_t + o_e, head(f_t, f_e))
    manual = f_t @ head.linear.weight[:, :5].T + head.linear.bias / 2
    torch.testing.assert_close(o_t, manual)


def test_describe_survival():
    head = TaskHead(task="survival", in_features=3, n_outputs=4)
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    out = head.describe(logits)
    torch.testing.assert_close(out["hazards"][0], torch.full((4,), 0.5))
    torch.testing.assert_close(out["survival"][0], torch.tensor([0.5, 0.25, 0.125, 0.0625]))
    torch.testing.assert_close(out["risk"][0], torch.tensor(-0.9375))
    assert out["risk"][1] > out["risk"][0]  # high hazards = higher risk


def test_describe_classification():
    head = TaskHead(task="classification", in_features=3, n_outputs=2)
    out = head.describe(torch.tensor([[0.0, 0.0]]))
    torch.testing.assert_close(out["probabilities"], torch.tensor([[0.5, 0.5]]))


def test_max_confidence_picks_per_sample():
    a = torch.tensor([[5.0, 0.0], [0.1, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    out = combine_magnifications({"10x": a, "20x": b}, task="classification")
    torch.testing.assert_close(out, torch.stack([a[0], b[1]]))


@pytest.mark.parametrize("task", ["classification", "survival"])
def test_mean_rule_returns_logits_of_the_mean(task):
    logits = {"10x": torch.randn(3, 4), "20x": torch.randn(3, 4)}
    out = combine_magnifications(logits, task=task, how="mean")
    if task == "classification":
        expected = (logits["10x"].softmax(-1) + logits["20x"].softmax(-1)) / 2
        torch.testing.assert_close(out.softmax(-1), expected)
    else:
        expected = (logits["10x"].sigmoid() + logits["20x"].sigmoid()) / 2
        torch.testing.assert_close(out.sigmoid(), expected)


def test_single_magnification_passes_through_and_bad_rule_fails():
    x = torch.randn(2, 3)
    assert torch.equal(combine_magnifications({"20x": x}, task="classification"), x)
    with pytest.raises(ModelConfigError, match="median"):
        combine_magnifications({"20x": x, "10x": x}, task="classification", how="median")
    with pytest.raises(ModelConfigError, match="regression"):
        TaskHead(task="regression", in_features=2, n_outputs=2)
