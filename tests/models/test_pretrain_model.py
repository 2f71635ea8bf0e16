import pytest
import torch

from echocare_core.data.ontology import Ontology, load_ontology
from echocare_core.models.hierarchy import HierarchyHead
from echocare_core.models.pretrain import EchoCarePretrainModel, mim_l1_loss


@pytest.fixture(scope="module")
def ontology() -> Ontology:
    return load_ontology()


def test_default_ontology_levels(ontology):
    regions = [p[0] for p in ontology.paths if len(p) == 1]
    assert regions == ["Head", "Neck", "Thorax", "Abdomen", "Pelvis", "Limbs", "Back", "Fetus", "Other"]
    assert ontology.lookup("thorax/heart/APICAL four-chamber") == ontology.names().index(
        "Thorax/Heart/Apical four-chamber"
    )
    with pytest.raises(ValueError, match="Did you mean 'Thorax/Heart'"):
        ontology.lookup("Thorax/Hart")
    assert ontology.lookup("") == -1
    assert Ontology.from_tree(ontology.to_tree()) == ontology


def test_bad_ontology_tree():
    with pytest.raises(ValueError, match="must map organ names"):
        Ontology.from_tree({"Neck": ["Thyroid"]})


def test_probabilities_are_hierarchy_coherent(ontology):
    head = HierarchyHead(8, ontology)
    probs = head.probabilities(torch.randn(64, ontology.num_classes) * 4)
    parents = torch.tensor(ontology.parents)
    child = parents >= 0
    assert (probs[:, child] <= probs[:, parents[child]]).all()


def test_label_stopping_at_region_leaves_lower_levels_out(ontology):
    head = HierarchyHead(8, ontology)
    thorax = ontology.lookup("Thorax")
    logits = torch.randn(1, ontology.num_classes, requires_grad=True)
    loss, labelled = head.loss(logits, torch.tensor([thorax]))
    loss.sum().backward()
    below = [i for i, p in enumerate(ontology.paths) if p[0] == "Thorax" and len(p) > 1]
    other = [i for i, p in enumerate(ontology.paths) if p[0] == "Neck"]
    assert labelled.all()
    assert logits.grad[0, below].abs().max() == 0  # unknown organs/structures under Thorax
    assert logits.grad[0, other].abs().max() > 0  # other regions' subtrees are known negatives
    # an unlabelled image contributes nothing
    logits.grad = None
    loss, labelled = head.loss(logits, torch.tensor([-1]))
    assert not labelled.any() and loss.item() == 0


def test_confidently_wrong_scores_still_get_gradient(ontology):
    head = HierarchyHead(8, ontology)
    logits = torch.full((1, ontology.num_classes), -30.0, requires_grad=True)
    loss, _ = head.loss(logits, torch.tensor([ontology.lookup("Neck/Thyroid/Transverse")]))
    loss.sum().backward()
    assert torch.isfinite(loss).all() and logits.grad[0, ontology.lookup("Neck/Thyroid/Transverse")] < -0.01


def test_mim_loss_counts_masked_pixels_only():
    images = torch.rand(2, 1, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, :8] = 1
    pred = images.clone()
    pred[:, :, 8:] += 5.0  # wrong only where nothing is masked
    assert mim_l1_loss(images, pred, mask).item() == pytest.approx(0.0, abs=1e-6)
    pred[:, :, :8] += 1.0
    assert mim_l1_loss(images, pred, mask).item() == pytest.approx(1.0, rel=1e-4)


def test_pretrain_model_forward_backward(ontology, tiny_encoder_cfg):
    model = EchoCarePretrainModel(tiny_encoder_cfg, ontology)
    x = torch.randn(3, 1, 64, 64)
    token_mask = (torch.rand(3, 32, 32) > 0.5).float()  # one entry per 2-pixel patch
    anatomy = torch.tensor([ontology.lookup("Neck/Thyroid"), -1, -1])
    loss, parts, pred = model(x, token_mask, anatomy, hie_weight=0.5)
    assert pred.shape == x.shape and parts["labelled"].item() == 1
    torch.testing.assert_close(loss, parts["loss_mim"] + 0.5 * parts["loss_hie"])
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.mask_token.grad.abs().sum() > 0
    # no labelled image: the head still takes part (zero gradient), as DDP requires
    model.zero_grad()
    loss, parts, _ = model(x, token_mask, torch.tensor([-1, -1, -1]))
    loss.backward()
    assert parts["loss_hie"].item() == 0 and model.hierarchy.fc.weight.grad is not None
